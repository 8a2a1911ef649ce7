"""The ``flora train`` loop: a small GPT on text with Flora (or a baseline optimizer).

Checkpoints (``<out>/checkpoint.pt``) hold the model, optimizer, scheduler, accumulator, the
batch generator's state and the loss history, with a SHA-256 of their bytes (a damaged file is
refused on ``--resume``). They are written atomically: a temporary file, ``fsync``, then
``os.replace``, so an existing checkpoint is never replaced by a partial one, and a failed
write (a full disk) removes the temporary file and keeps the previous checkpoint. A resumed
run draws the same batches and continues exactly as an uninterrupted one; a finished run can
be extended with a larger ``--steps`` (the cosine schedule then ends at the new length).

Signals: the first Ctrl-C (SIGINT) or SIGTERM finishes the current step (or cuts a final
evaluation short), saves a checkpoint and exits with 130 (SIGINT) or 143 (SIGTERM); a save in
progress is never interrupted. A second Ctrl-C during training stops at once, keeping the
last checkpoint. A new run refuses to replace another run's checkpoint unless ``--resume`` or
``--overwrite`` is given, and a non-finite loss stops the run with an error (the last
checkpoint is kept).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
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
import flora.lean
from flora.data import Corpus, get_batch, load_corpus
from flora.gpt import GPT, SIZES, GPTConfig, lean_config
from flora.model_memory import peak_gradient_bytes
from flora.state_plan import format_bytes

__all__ = ["OPTIMIZERS", "TrainConfig", "TrainError", "TrainResult", "load_checkpoint", "train"]

OPTIMIZERS = ("flora", "flora-adamw", "adamw", "adafactor")
DEFAULT_LR = {"flora": 2e-2, "flora-adamw": 2e-3, "adamw": 2e-3, "adafactor": 2e-2}
CHECKPOINT_FORMAT = "flora-train/2"  # a SHA-256-checked payload
LEGACY_FORMAT = "flora-train/1"  # no checksum: still loaded
#: settings a resumed run must share with its checkpoint (``steps`` may grow)
RESUME_KEYS = (
    "size", "n_layer", "n_head", "n_embd", "block_size", "optimizer", "lr", "rank", "kappa",
    "accumulate", "accumulate_rank", "batch_size", "seed", "dtype", "files", "lean",
)  # fmt: skip
MAX_SEED = 2**63 - 2  # torch.manual_seed's range, leaving room for the accumulator's seed + 1
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainError(Exception):
    """A problem reported as one ``flora: error:`` line, never a traceback. ``exit_code`` is
    2 for bad input (the default) and 1 for a run that failed (a full disk, a NaN loss)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    overwrite: bool = False  # replace a checkpoint in ``out`` (without it: refused)
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    stop_at: int | None = None  # stop (with a checkpoint) after this step
    plot: bool = True
    progress: bool = True
    lean: bool = False  # the lean preset (flora.lean): bf16 everything, step-in-backward

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
        if not (self.corpus_mb > 0 and math.isfinite(self.corpus_mb)):
            raise TrainError(f"--corpus-mb must be a positive number, got {self.corpus_mb}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TrainError(f"--seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise TrainError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.resume and self.overwrite:
            raise TrainError("--resume and --overwrite exclude each other")
        if self.dtype not in ("float32", "bfloat16"):
            raise TrainError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.lean and self.optimizer not in ("flora", "flora-adamw"):
            raise TrainError(
                f"--lean needs --optimizer flora or flora-adamw, got {self.optimizer!r}"
            )
        if self.lean and self.dtype != "bfloat16":
            raise TrainError("--lean trains in bfloat16: leave --dtype out or pass bfloat16")
        check_device(self.device)

    def model_config(self) -> GPTConfig:
        """The model's config; with ``--lean``, in the lean preset's vocabulary blocks
        (:func:`flora.gpt.lean_config`; one block for a byte vocabulary unless n_embd < 64)."""
        base = SIZES[self.size]
        try:
            config = GPTConfig(
                n_layer=self.n_layer or base.n_layer,
                n_head=self.n_head or base.n_head,
                n_embd=self.n_embd or base.n_embd,
                block_size=self.block_size or base.block_size,
                vocab_size=256,
            )
        except ValueError as err:
            raise TrainError(str(err)) from err
        return lean_config(config) if self.lean else config


def check_device(spec: str) -> torch.device:
    """``spec`` as a device that can hold tensors here, else TrainError: the same check for
    every device type (a 1-element allocation), and ``meta`` is refused (it holds no data)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise TrainError(f"--device {spec!r} is not a device: {err}") from err
    if device.type == "meta":
        raise TrainError("--device meta holds no data, so it cannot train; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda requested but no CUDA device is available")
    try:
        torch.empty(1, device=device)
    except Exception as err:  # any backend's failure is the same user error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainError(f"--device {spec!r} is not usable on this machine: {first}") from err
    return device


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float | None
    memory: dict[str, int | None]
    checkpoint: Path
    interrupted: bool
    exit_code: int = 0  # 130 after SIGINT, 143 after SIGTERM


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


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can sync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(data: bytes | memoryview, path: Path) -> None:
    """Write ``data`` to ``path`` through ``<path>.tmp``, ``fsync`` and ``os.replace``; on an
    OSError the temporary file is removed, ``path`` is untouched and TrainError (exit 1)
    says why."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        kept = " (the previous checkpoint is kept)" if path.exists() else ""
        raise TrainError(f"cannot write {path}: {err.strerror or err}{kept}", 1) from err
    _fsync_dir(path.parent)


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Save ``obj`` with a SHA-256 of its serialized bytes (checked by load_checkpoint)."""
    payload = io.BytesIO()
    torch.save(obj, payload)
    data = payload.getvalue()
    wrapped = io.BytesIO()
    torch.save(
        {"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "data": data},
        wrapped,
    )
    _write_atomic(wrapped.getbuffer(), path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The contents of a `flora train` checkpoint, its SHA-256 checked; TrainError if it is
    missing, damaged or incomplete."""
    if not path.is_file():
        raise TrainError(f"--resume: no checkpoint at {path}")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling/zip error means the file is unusable
        raise TrainError(
            f"checkpoint {path} is corrupt or unreadable ({type(err).__name__})"
        ) from err
    fmt = outer.get("format") if isinstance(outer, dict) else None
    if fmt == LEGACY_FORMAT:  # written before checksums: loaded as it is
        ckpt = outer
    elif fmt == CHECKPOINT_FORMAT:
        data = outer.get("data")
        if not isinstance(data, bytes) or hashlib.sha256(data).hexdigest() != outer.get("sha256"):
            raise TrainError(
                f"checkpoint {path} is corrupt: its SHA-256 does not match its contents"
            )
        try:
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise TrainError(f"checkpoint {path} is corrupt ({type(err).__name__})") from err
    else:
        raise TrainError(f"{path} is not a flora train checkpoint (format {CHECKPOINT_FORMAT})")
    needed = {"config", "step", "model", "optimizer", "scheduler", "accumulator", "generator"}
    if (
        not isinstance(ckpt, dict)
        or not needed <= set(ckpt)
        or not isinstance(ckpt["config"], dict)
    ):
        missing = sorted(needed - set(ckpt)) if isinstance(ckpt, dict) else sorted(needed)
        raise TrainError(f"checkpoint {path} is incomplete (missing {missing or ['config']})")
    return ckpt


def check_writable_folder(out: Path) -> None:
    """The folder exists and takes a real write (64 KiB, synced): a 0-byte probe would pass
    on a full disk."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as err:
        raise TrainError(f"cannot write to output folder {out}: {err.strerror or err}") from err


class _Signals:
    """SIGINT and SIGTERM for the whole run, final evaluation and save included (see the
    module docstring). ``phase`` is "train", "evaluate" or "save"."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal
        self.phase = "train"
        self.final = False  # in the final evaluation and save
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNAL_EXIT:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if self.phase == "save":
            return  # never interrupt a save; the run stops after it
        if self.phase == "evaluate" and self.final:
            raise _SkipEvaluation
        if not first and signum == signal.SIGINT and self.phase == "train":
            raise KeyboardInterrupt  # second Ctrl-C: stop now, keep the last checkpoint

    @property
    def exit_code(self) -> int:
        return _SIGNAL_EXIT.get(self.received, 130)  # type: ignore[arg-type]


class _SkipEvaluation(Exception):
    """A signal arrived during the final evaluation: save without it."""


class _Progress:
    """A one-line progress bar on a terminal, and a log line at the first step and every
    tenth of the run."""

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
        if step % self.every == 0 or step == self.total or step == 1:
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
    """Train per ``cfg``; raises :class:`TrainError` for bad input or a failed run."""
    cfg.validate()
    out = Path(cfg.out)
    check_writable_folder(out)
    ckpt_path = out / "checkpoint.pt"
    if not cfg.resume and not cfg.overwrite and ckpt_path.exists():
        raise TrainError(
            f"{ckpt_path} holds another run's checkpoint: pass --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None:
        saved = ckpt["config"]
        for key in RESUME_KEYS:
            if saved.get(key) != getattr(cfg, key):
                raise TrainError(
                    f"--resume: the checkpoint was trained with {key}={saved.get(key)!r}, "
                    f"this run has {key}={getattr(cfg, key)!r}"
                )
        if not isinstance(ckpt["step"], int) or cfg.steps < ckpt["step"]:
            raise TrainError(
                f"--resume: the checkpoint is at step {ckpt['step']}, beyond --steps {cfg.steps}"
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
    acc = None
    setup = None
    if cfg.lean:  # bf16 weights and state, step-in-backward: the accumulator steps
        setup = flora.lean.lean_setup(
            model, cfg.optimizer, accumulate=cfg.accumulate, rank=cfg.rank,
            accumulate_rank=cfg.accumulate_rank, seed=cfg.seed,
            lr=cfg.lr or DEFAULT_LR[cfg.optimizer], kappa=cfg.kappa,
        )  # fmt: skip
        opt, acc = setup.optimizer, setup.accumulator
    else:
        opt = build_optimizer(cfg, model)
    warmup = max(1, min(20, cfg.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    if cfg.accumulate > 1 and acc is None:
        acc = flora.GradientAccumulator(
            model, cfg.accumulate, rank=cfg.accumulate_rank or cfg.rank, seed=cfg.seed + 1
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history, vals = 0, [], []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            schedule.load_state_dict(ckpt["scheduler"])
            if acc is not None:
                acc.load_state_dict(ckpt["accumulator"])
            gen.set_state(ckpt["generator"])
            step = int(ckpt["step"])
            history = [(int(s), float(v)) for s, v in ckpt["history"]]
            vals = [(int(s), float(v)) for s, v in ckpt["val_history"]]
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise TrainError(
                f"--resume: {ckpt_path} does not fit this run ({type(err).__name__}: {first})"
            ) from err

    n_params = sum(p.numel() for p in model.parameters())
    echo(f"corpus: {corpus.description}")
    echo(f"held out: {corpus.held_out_description}")
    echo(
        f"model: GPT {mcfg.n_layer} layers, d={mcfg.n_embd}, {mcfg.n_head} heads, "
        f"context {mcfg.block_size}, {n_params / 1e6:.2f}M parameters, {cfg.dtype} on {device}"
    )
    echo(
        f"optimizer: {cfg.optimizer} lr {cfg.lr or DEFAULT_LR[cfg.optimizer]:g}"
        + (f", rank {cfg.rank}, kappa {cfg.kappa}" if cfg.optimizer.startswith("flora") else "")
        + (f"; compressed accumulation of {cfg.accumulate} micro-batches" if acc else "")
    )
    if setup is not None:
        echo(str(setup))
    if ckpt is not None:
        echo(f"resumed from {ckpt_path} at step {step}")
        if ckpt["config"].get("steps") != cfg.steps:
            echo(
                f"extending the run from {ckpt['config'].get('steps')} to {cfg.steps} steps: "
                "the cosine schedule now ends at the new length"
            )

    def checkpoint() -> None:
        phase, signals.phase = signals.phase, "save"
        try:
            _save_atomic(
                {
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
        finally:
            signals.phase = phase

    @torch.no_grad()
    def evaluate() -> float:
        phase, signals.phase = signals.phase, "evaluate"
        model.eval()
        try:
            g = torch.Generator().manual_seed(1234)
            total = 0.0
            for _ in range(cfg.eval_batches):
                x, y = get_batch(corpus.val, cfg.batch_size, mcfg.block_size, g)
                total += float(model(x.to(device), y.to(device)))
            return total / cfg.eval_batches
        finally:
            model.train()
            signals.phase = phase

    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    progress = _Progress(cfg.steps, cfg.progress, echo)
    grad_bytes = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, cfg.steps // 5)
    start, tokens = time.perf_counter(), 0
    val = None
    with _Signals() as signals:
        echo(
            f"training to step {cfg.steps}"
            + (" (Ctrl-C or SIGTERM: checkpoint and stop)" if signals.installed else "")
        )
        while step < last and signals.received is None:
            loss_sum = 0.0
            for _ in range(cfg.accumulate):
                x, y = get_batch(corpus.train, cfg.batch_size, mcfg.block_size, gen)
                x, y = x.to(device), y.to(device)
                with acc.micro_batch() if acc is not None else contextlib.nullcontext():
                    loss = model(x, y)
                    (loss / cfg.accumulate).backward()
                loss_sum += loss.detach().item()
                tokens += x.numel()
            if not math.isfinite(loss_sum):
                raise TrainError(
                    f"the training loss became {loss_sum} at step {step + 1}; stopped (the "
                    f"checkpoint in {ckpt_path}, if any, is from before). Try a smaller --lr",
                    1,
                )
            if setup is None:  # (lean: the accumulator stepped inside backward)
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
        signals.final = True
        if step == cfg.steps and (not vals or vals[-1][0] != step):
            try:
                if signals.received is not None:  # arrived during the last step
                    raise _SkipEvaluation
                val = evaluate()
                vals.append((step, val))
            except _SkipEvaluation:
                echo("final evaluation cut short by a signal; saving")
        elif vals and vals[-1][0] == step:
            val = vals[-1][1]
        checkpoint()
    interrupted = signals.received is not None

    if setup is not None:  # step-in-backward: one parameter's gradient at a time
        grad_bytes = peak_gradient_bytes(model)
    accumulation = acc.plan().state_bytes if acc is not None and cfg.accumulate > 1 else 0
    memory: dict[str, int | None] = {
        "parameters": tensor_bytes(model.parameters()),
        "gradients" + (" at their peak" if setup is not None else ""): grad_bytes,
        "optimizer state": optimizer_state_bytes(opt),
        "accumulation buffers": accumulation,
        "AdamW state (reference)": 2 * tensor_bytes(model.parameters()),
        "peak CUDA": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    if acc is not None:
        acc.remove()
    train_loss = history[-1][1] if history else float("nan")
    if interrupted:
        name = signal.Signals(signals.received).name  # type: ignore[arg-type]
        echo(f"interrupted ({name}): checkpoint saved at step {step} in {ckpt_path}; "
             "continue with --resume")  # fmt: skip
    if val is not None:
        echo(f"held-out loss {val:.4f} nats/byte ({val / math.log(2):.3f} bits/byte)")
    echo("")
    if isinstance(opt, flora.optim.base.FloraOptimizerBase):
        echo(str(opt.plan()))
        echo("")
    if acc is not None:
        echo(str(acc.plan()))
        echo("")
    echo("memory:                                       bytes/parameter")
    for name, value in memory.items():
        if value is not None:
            echo(f"  {name:28s} {format_bytes(value):>12s}  {value / n_params:8.3f}")
    if setup is not None:
        total = sum(memory[k] for k in list(memory)[:4])  # type: ignore[misc]
        echo(f"  {'total (without activations)':28s} {format_bytes(total):>12s}  "
             f"{total / n_params:8.3f}")  # fmt: skip
    if cfg.plot and history:
        echo(_plot(history, vals, out))
    echo(f"checkpoint: {ckpt_path}")
    ratio = memory["optimizer state"] / memory["AdamW state (reference)"]  # type: ignore[operator]
    echo(
        f"final: step {step}, train loss {train_loss:.4f}, held-out loss "
        + (f"{val:.4f}" if val is not None else "n/a")
        + f", optimizer state/AdamW {ratio:.3f}"
    )
    return TrainResult(
        step, train_loss, val, memory, ckpt_path, interrupted,
        signals.exit_code if interrupted else 0,
    )  # fmt: skip
