"""The ``flora train`` loop: a small GPT on text with Flora (or a baseline optimizer).

Checkpoints (``<out>/checkpoint.pt``) hold the model, optimizer, scheduler, accumulator, the
batch generator's state and the loss history, and are written atomically (a temporary file,
then ``os.replace``), so an existing checkpoint is never replaced by a partial one. A resumed
run draws the same batches and continues exactly as an uninterrupted one. Ctrl-C finishes the
current step, saves a checkpoint and exits.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import flora
from flora.data import Corpus, get_batch, load_corpus
from flora.gpt import GPT, SIZES, GPTConfig
from flora.plan import format_bytes

__all__ = ["OPTIMIZERS", "TrainConfig", "TrainError", "TrainResult", "train"]

OPTIMIZERS = ("flora", "flora-adamw", "adamw", "adafactor")
DEFAULT_LR = {"flora": 2e-2, "flora-adamw": 2e-3, "adamw": 2e-3, "adafactor": 2e-2}
CHECKPOINT_FORMAT = "flora-train/1"
#: settings a resumed run must share with its checkpoint
RESUME_KEYS = (
    "size", "n_layer", "n_head", "n_embd", "block_size", "optimizer", "lr", "rank", "kappa",
    "accumulate", "accumulate_rank", "batch_size", "steps", "seed", "dtype", "files",
)  # fmt: skip


class TrainError(Exception):
    """A problem with the user's input: reported as one line, never a traceback."""


@dataclass
class TrainConfig:
    files: list[str] = field(default_factory=list)  # empty: the stdlib source
    size: str = "small"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    optimizer: str = "flora"
    lr: float | None = None
    rank: int = 16
    kappa: int = 100
    accumulate: int = 1
    accumulate_rank: int | None = None
    batch_size: int = 16
    steps: int = 300
    eval_every: int | None = None  # None: 5 times per run; 0: only at the end
    eval_batches: int = 20
    corpus_mb: float = 4.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "runs/flora"
    resume: bool = False
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    stop_at: int | None = None  # stop (with a checkpoint) after this step
    plot: bool = True
    progress: bool = True

    def validate(self) -> None:
        positive = ("rank", "kappa", "accumulate", "batch_size", "steps", "eval_batches")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrainError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value}"
                )
        for name in ("n_layer", "n_head", "n_embd", "block_size", "accumulate_rank", "stop_at"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise TrainError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value}"
                )
        for name in ("eval_every", "save_every"):
            if (getattr(self, name) or 0) < 0:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(
                f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.size not in SIZES:
            raise TrainError(f"--size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"--lr must be a positive number, got {self.lr}")
        if not self.corpus_mb > 0:
            raise TrainError(f"--corpus-mb must be positive, got {self.corpus_mb}")
        if self.dtype not in ("float32", "bfloat16"):
            raise TrainError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise TrainError(f"--device {self.device!r} is not a device: {err}") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError("--device cuda requested but no CUDA device is available")

    def model_config(self) -> GPTConfig:
        base = SIZES[self.size]
        try:
            return GPTConfig(
                n_layer=self.n_layer or base.n_layer,
                n_head=self.n_head or base.n_head,
                n_embd=self.n_embd or base.n_embd,
                block_size=self.block_size or base.block_size,
                vocab_size=256,
            )
        except ValueError as err:
            raise TrainError(str(err)) from err


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float | None
    memory: dict[str, int | None]
    checkpoint: Path
    interrupted: bool


# ---------------------------------------------------------------- building blocks
def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    lr = cfg.lr or DEFAULT_LR[cfg.optimizer]
    if cfg.optimizer == "flora":
        return flora.Flora(model.named_parameters(), lr=lr, rank=cfg.rank, kappa=cfg.kappa)
    if cfg.optimizer == "flora-adamw":
        return flora.FloraAdamW(model.named_parameters(), lr=lr, rank=cfg.rank, kappa=cfg.kappa)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    return torch.optim.Adafactor(model.parameters(), lr=lr)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for s in opt.state.values() for v in s.values())


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling/zip error means the file is unusable
        raise TrainError(
            f"checkpoint {path} is corrupt or unreadable ({type(err).__name__})"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a flora train checkpoint")
    return ckpt


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TrainError(f"cannot write to output folder {out}: {err.strerror or err}") from err


class _Progress:
    """A one-line progress bar on a terminal, and a log line every tenth of the run."""

    def __init__(self, total: int, enabled: bool, echo: Callable[[str], None]) -> None:
        self.total, self.echo = total, echo
        self.tty = enabled and sys.stderr.isatty()
        self.every = max(1, total // 10)

    def update(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        text = f"step {step:5d}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s"
        if self.tty:
            done = int(30 * step / self.total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {text}")
            sys.stderr.flush()
        if step % self.every == 0 or step == self.total:
            if self.tty:
                sys.stderr.write("\r" + " " * (len(text) + 33) + "\r")
            self.echo(text)


def _plot(history: list[tuple[int, float]], vals: list[tuple[int, float]], out: Path) -> str:
    lines = ["step,train_loss,val_loss"]
    val_at = dict(vals)
    lines += [f"{s},{loss:.6f},{val_at.get(s, '')}" for s, loss in history]
    (out / "loss.csv").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"loss history in {out / 'loss.csv'} (install matplotlib for loss.png)"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s for s, _ in history], [v for _, v in history], label="train", lw=1)
    if vals:
        ax.plot([s for s, _ in vals], [v for _, v in vals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return f"loss plot in {out / 'loss.png'} (data in loss.csv)"


# ---------------------------------------------------------------- the loop
def train(cfg: TrainConfig, echo: Callable[[str], None] = print) -> TrainResult:
    """Train per ``cfg``; raises :class:`TrainError` for bad input."""
    cfg.validate()
    out = Path(cfg.out)
    _check_out(out)
    ckpt_path = out / "checkpoint.pt"
    ckpt = _load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None:
        saved = ckpt["config"]
        for key in RESUME_KEYS:
            if saved.get(key) != getattr(cfg, key):
                raise TrainError(
                    f"--resume: the checkpoint was trained with {key}={saved.get(key)!r}, "
                    f"this run has {key}={getattr(cfg, key)!r}"
                )
    mcfg = cfg.model_config()
    try:
        corpus: Corpus = load_corpus(cfg.files, max_bytes=int(cfg.corpus_mb * 2**20))
        corpus.check_block_size(mcfg.block_size)
    except ValueError as err:
        raise TrainError(str(err)) from err

    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(device=device, dtype=dtype)
    opt = build_optimizer(cfg, model)
    warmup = max(1, min(20, cfg.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    acc = None
    if cfg.accumulate > 1:
        acc = flora.GradientAccumulator(
            model, cfg.accumulate, rank=cfg.accumulate_rank or cfg.rank, seed=cfg.seed + 1
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history, vals = 0, [], []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        if acc is not None:
            acc.load_state_dict(ckpt["accumulator"])
        gen.set_state(ckpt["generator"])
        step = int(ckpt["step"])
        history = [(int(s), float(v)) for s, v in ckpt["history"]]
        vals = [(int(s), float(v)) for s, v in ckpt["val_history"]]

    n_params = sum(p.numel() for p in model.parameters())
    echo(f"corpus: {corpus.description}")
    echo(
        f"model: GPT {mcfg.n_layer} layers, d={mcfg.n_embd}, {mcfg.n_head} heads, "
        f"context {mcfg.block_size}, {n_params / 1e6:.2f}M parameters, {cfg.dtype} on {device}"
    )
    echo(
        f"optimizer: {cfg.optimizer} lr {cfg.lr or DEFAULT_LR[cfg.optimizer]:g}"
        + (f", rank {cfg.rank}, kappa {cfg.kappa}" if cfg.optimizer.startswith("flora") else "")
        + (f"; compressed accumulation of {cfg.accumulate} micro-batches" if acc else "")
    )
    if ckpt is not None:
        echo(f"resumed from {ckpt_path} at step {step}")

    def checkpoint() -> None:
        _save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "config": asdict(cfg),
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": schedule.state_dict(),
                "accumulator": acc.state_dict() if acc is not None else None,
                "generator": gen.get_state(),
                "history": [[s, v] for s, v in history],
                "val_history": [[s, v] for s, v in vals],
            },
            ckpt_path,
        )

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        g = torch.Generator().manual_seed(1234)
        total = 0.0
        for _ in range(cfg.eval_batches):
            x, y = get_batch(corpus.val, cfg.batch_size, mcfg.block_size, g)
            total += float(model(x.to(device), y.to(device)))
        model.train()
        return total / cfg.eval_batches

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, stop
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True

    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    echo(f"training to step {cfg.steps}" + (" (Ctrl-C: checkpoint and stop)" if previous else ""))
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    progress = _Progress(cfg.steps, cfg.progress, echo)
    grad_bytes = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, cfg.steps // 5)
    start, tokens = time.perf_counter(), 0
    try:
        while step < last and not stop["requested"]:
            loss_sum = 0.0
            for _ in range(cfg.accumulate):
                x, y = get_batch(corpus.train, cfg.batch_size, mcfg.block_size, gen)
                x, y = x.to(device), y.to(device)
                with acc.micro_batch() if acc is not None else contextlib.nullcontext():
                    loss = model(x, y)
                    (loss / cfg.accumulate).backward()
                loss_sum += loss.detach().item()
                tokens += x.numel()
            grad_bytes = tensor_bytes(p.grad for p in model.parameters())
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            history.append((step, loss_sum / cfg.accumulate))
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            progress.update(step, history[-1][1], schedule.get_last_lr()[0], rate)
            if eval_every and step % eval_every == 0 and step < cfg.steps:
                vals.append((step, evaluate()))
                echo(f"step {step:5d}  held-out loss {vals[-1][1]:.4f}")
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    interrupted = stop["requested"] and step < last
    val = None
    if step == cfg.steps and (not vals or vals[-1][0] != step):
        val = evaluate()
        vals.append((step, val))
    elif vals and vals[-1][0] == step:
        val = vals[-1][1]
    checkpoint()

    memory: dict[str, int | None] = {
        "parameters": tensor_bytes(model.parameters()),
        "gradients": grad_bytes,
        "optimizer state": optimizer_state_bytes(opt),
        "accumulation buffers": (acc.plan().state_bytes if acc is not None else 0),
        "AdamW state (reference)": 2 * tensor_bytes(model.parameters()),
        "peak CUDA": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    if acc is not None:
        acc.remove()
    train_loss = history[-1][1] if history else float("nan")
    if interrupted:
        echo(f"interrupted: checkpoint saved at step {step} in {ckpt_path}; continue with --resume")
    if val is not None:
        echo(f"held-out loss {val:.4f} nats/byte ({val / math.log(2):.3f} bits/byte)")
    echo("")
    if isinstance(opt, flora.optim.base.FloraOptimizerBase):
        echo(str(opt.plan()))
        echo("")
    if acc is not None:
        echo(str(acc.plan()))
        echo("")
    echo("memory:")
    for name, value in memory.items():
        if value is not None:
            echo(f"  {name:24s} {format_bytes(value):>12s}")
    if cfg.plot and history:
        echo(_plot(history, vals, out))
    echo(f"checkpoint: {ckpt_path}")
    ratio = memory["optimizer state"] / memory["AdamW state (reference)"]  # type: ignore[operator]
    echo(
        f"final: step {step}, train loss {train_loss:.4f}, held-out loss "
        + (f"{val:.4f}" if val is not None else "n/a")
        + f", optimizer state/AdamW {ratio:.3f}"
    )
    return TrainResult(step, train_loss, val, memory, ckpt_path, interrupted)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
