r"""Memory profile (paper Appendix C.3, Figure 2): bytes by category while training a GPT
with gradient accumulation, for AdamW, LoRA and Flora, with activation checkpointing (AC)
and the step-in-backward mode on and off.

Exact accounting (no allocator readings, so identical on every run and machine):

* **parameters** — every parameter (LoRA: base weights plus adapters);
* **gradients** — the largest total of live ``.grad`` tensors, read in a post-accumulate-grad
  hook of every parameter (registered before the accumulator's, so it sees each gradient
  before the accumulator compresses and frees it) and at each ``optimizer.step()``, when
  every decompressed gradient is alive (never, in step-in-backward mode);
* **accumulation** — what is held between micro-batches to accumulate: the ``.grad`` tensors
  of plain accumulation, or ``GradientAccumulator.buffer_bytes()`` (compressed buffers plus
  the gradients of uncompressed parameters);
* **optimizer state** — :func:`flora_experiments.memory.optimizer_state_bytes`;
* **activations** — distinct storages autograd saved for backward by the end of a forward
  (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded). With AC (reentrant
  ``torch.utils.checkpoint``) only block inputs are saved in forward and each block is
  recomputed in backward, so one block's activations (measured without AC) are added.

The "sum" column adds the five peaks, an upper bound of the peak (they do not all peak at the
same moment). On a GPU, ``torch.cuda.max_memory_allocated`` is reported as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flora_experiments.memory import optimizer_state_bytes, parameter_bytes
from flora_experiments.report import Results

__all__ = ["SETUPS", "ProfileConfig", "measure", "run"]

# (label, optimizer, activation checkpointing, step in backward)
SETUPS: tuple[tuple[str, str, bool, bool], ...] = (
    ("AdamW", "adamw", False, False),
    ("AdamW + AC", "adamw", True, False),
    ("AdamW + step-in-backward", "adamw", False, True),
    ("LoRA", "lora", False, False),
    ("LoRA + AC", "lora", True, False),
    ("Flora", "flora", False, False),
    ("Flora + AC", "flora", True, False),
    ("Flora + step-in-backward", "flora", False, True),
    ("Flora + AC + step-in-backward", "flora", True, True),
)
CATEGORIES = ("parameters", "gradients", "accumulation", "optimizer_state", "activations")


@dataclass
class ProfileConfig:
    n_layer: int = 8
    n_embd: int = 512
    n_head: int = 8
    block_size: int = 512
    vocab_size: int = 256
    micro_batch: int = 1
    accumulate: int = 16
    steps: int = 2
    rank: int = 64
    seed: int = 0

    @classmethod
    def quick(cls) -> ProfileConfig:
        return cls(n_layer=4, n_embd=256, n_head=4, block_size=256, accumulate=4, rank=32)


def _storage(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class _Meter:
    """Counts saved activations and live gradients of one model."""

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.param_storages = {_storage(p) for p in self.params}
        self.grad_peak = 0
        self.saved: set[tuple[str, int]] = set()
        self.saved_bytes = 0
        self.handles = [
            p.register_post_accumulate_grad_hook(self._on_grad)
            for p in self.params
            if p.requires_grad
        ]

    def live_grad_bytes(self) -> int:
        return sum(
            p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None
        )

    def _on_grad(self, _: torch.Tensor) -> None:
        self.grad_peak = max(self.grad_peak, self.live_grad_bytes())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if key not in self.param_storages and key not in self.saved:
            self.saved.add(key)
            self.saved_bytes += t.untyped_storage().nbytes()
        return t

    def saving(self) -> torch.autograd.graph.saved_tensors_hooks:
        self.saved, self.saved_bytes = set(), 0
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def _model(cfg: ProfileConfig) -> nn.Module:
    from flora.gpt import GPT, GPTConfig

    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size))


def _block_activation_bytes(cfg: ProfileConfig, batch: torch.Tensor) -> int:
    """Bytes one block saves for backward (the recompute cost of AC), without AC."""
    model = _model(cfg)
    meter = _Meter(model)
    marks: list[int] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: marks.append(meter.saved_bytes))
        block.register_forward_hook(lambda *_: marks.append(meter.saved_bytes))
    with meter.saving():
        model(batch, batch)
    return max(b - a for a, b in zip(marks[::2], marks[1::2], strict=True))


def measure(label: str, optimizer: str, ac: bool, sib: bool, cfg: ProfileConfig) -> dict[str, Any]:
    """Train ``cfg.steps`` steps of ``cfg.accumulate`` micro-batches; bytes by category."""
    import flora

    model = _model(cfg)
    model.activation_checkpointing = ac
    if optimizer == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.rank, lora_alpha=cfg.rank, target_modules=["attn", "proj", "fc", "out"]
            ),
        )
    meter = _Meter(model)  # its hooks run before the accumulator's
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "flora":
        opt: torch.optim.Optimizer = flora.Flora(model.named_parameters(), rank=cfg.rank)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-3)
    acc = None
    if optimizer == "flora" or sib:
        acc = flora.GradientAccumulator(
            model, cfg.accumulate, rank=cfg.rank, compress=optimizer == "flora",
            optimizer=opt if sib else None, step_in_backward=sib,
        )  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    accumulation = activations = 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(cfg.steps):
        for i in range(cfg.accumulate):
            x = torch.randint(0, cfg.vocab_size, (cfg.micro_batch, cfg.block_size), generator=gen)
            with meter.saving():
                loss = model(x, x)
            activations = max(activations, meter.saved_bytes)
            if acc is not None:
                with acc.micro_batch():
                    (loss / cfg.accumulate).backward()
            else:
                (loss / cfg.accumulate).backward()
            if i < cfg.accumulate - 1:  # what waits for the next micro-batch
                held = acc.buffer_bytes() if acc is not None else meter.live_grad_bytes()
                accumulation = max(accumulation, held)
        if not sib:  # every (decompressed) gradient is alive now, at the optimizer step
            meter.grad_peak = max(meter.grad_peak, meter.live_grad_bytes())
            opt.step()
        opt.zero_grad(set_to_none=True)
    if ac:
        activations += _block_activation_bytes(cfg, x)
    row = {
        "setup": label,
        "parameters": parameter_bytes(model.parameters()),
        "gradients": meter.grad_peak,
        "accumulation": accumulation,
        "optimizer_state": optimizer_state_bytes(opt),
        "activations": activations,
        "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    row["sum"] = sum(row[c] for c in CATEGORIES)
    if acc is not None:
        acc.remove()
    for h in meter.handles:
        h.remove()
    return row


def run(cfg: ProfileConfig, *, name: str, data_root=None) -> Results:
    rows = [measure(*setup, cfg) for setup in SETUPS]
    res = Results(
        name=name,
        title="Memory by category (Appendix C.3, Figure 2): GPT with gradient accumulation",
        columns=[
            ("setup", "setup"),
            *((c, f"{c.replace('_', ' ')} (bytes)") for c in CATEGORIES),
            ("sum", "sum of peaks"),
            ("vs", "sum / AdamW"),
            ("cuda_peak", "CUDA peak"),
        ],
        seed=cfg.seed,
        rows=rows,
    )
    base = rows[0]["sum"]
    for row in rows:
        row["vs"] = row["sum"] / base
    res.bars = {row["setup"]: {c: row[c] for c in CATEGORIES} for row in rows}
    res.notes.append(
        f"GPT: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, context "
        f"{cfg.block_size}, byte vocabulary; micro-batch {cfg.micro_batch}, {cfg.accumulate} "
        f"micro-batches per step, {cfg.steps} steps; rank {cfg.rank} for LoRA (attention and "
        "MLP matrices, base frozen), Flora's momentum and its accumulation. Exact accounting, "
        "see experiments/src/flora_experiments/profile.py for each category's definition."
    )
    return res
