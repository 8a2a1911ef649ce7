"""Hugging Face ``transformers.Trainer`` and ``accelerate``: thin adapters, no subclasses.

Trainer::

    from flora.integrations.hf import FloraAccumulationCallback, create_flora_optimizer

    args = TrainingArguments(..., learning_rate=3e-4, weight_decay=0.01,
                             gradient_accumulation_steps=16, max_grad_norm=1.0)
    # GPT-2 names; LLaMA: ["self_attn", "mlp"]; BERT: ["attention", "intermediate", "output"]
    optimizer = create_flora_optimizer(model, args, rank=32, target_modules=["attn", "mlp"])
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(optimizer, None),          # Trainer builds the scheduler
                      callbacks=[FloraAccumulationCallback(rank=32)])

The optimizer takes ``learning_rate``, ``weight_decay``, ``adam_beta1``/``adam_beta2`` and
``adam_epsilon`` from the arguments; the Trainer's scheduler drives its param groups. The
callback compresses gradient accumulation when ``gradient_accumulation_steps > 1``: each
backward pass is a micro-batch, and accelerate's ``sync_gradients`` flag (which the Trainer sets
before every micro-batch, including the shorter last accumulation of an epoch) ends the cycle.
The decompressed gradient is in ``p.grad`` when the cycle ends. With a projection
(``distribution="gaussian"``) its norm is larger than the true accumulated gradient's by about
``sqrt(1 + (d+1)/r)`` (the default low-rank sketch's is close to it), so by default
(``clip="estimate"``) the callback clips instead of the Trainer: it hands ``max_grad_norm`` to
the accumulator, which scales the gradients by ``min(1, max_grad_norm / grad_norm)`` with an
unbiased estimate of the true squared norm (:attr:`GradientAccumulator.grad_norm`), sets the
Trainer's ``max_grad_norm`` to 0 for the run (restored at its end), and logs that estimate as
``grad_norm`` (the Trainer's figure, the norm of the decompressed gradient the optimizer
steps with, as ``grad_norm_decompressed``). ``clip="decompressed"`` leaves clipping and
logging to the Trainer. Checkpoints need nothing extra: the Trainer saves at cycle
boundaries, and the callback sets the cycle counter (which selects the projections) to the
resumed ``global_step``. Not supported: compressed accumulation under multi-process DDP in the
Trainer (use :class:`flora.GradientAccumulator` with the DDP module in your own loop).

accelerate::

    accelerator = Accelerator(gradient_accumulation_steps=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    acc = GradientAccumulator(model, 8, rank=32, is_last_micro_batch=accelerate_sync())
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from flora.accumulation import GradientAccumulator
from flora.optim import Flora, FloraAdamW
from flora.policy import warn_unmatched_patterns

__all__ = ["FloraAccumulationCallback", "accelerate_sync", "create_flora_optimizer"]


def accelerate_sync() -> Callable[[], bool]:
    """A callable returning accelerate's current ``sync_gradients`` flag (set by
    ``accelerator.accumulate`` and by the Trainer before each micro-batch)."""
    from accelerate.state import GradientState

    state = GradientState()
    return lambda: bool(state.sync_gradients)


def _is_target(param_name: str, targets: str | Sequence[str] | None) -> bool:
    """``optim_target_modules`` semantics: a string is a regex matched against the whole
    module name; a list matches when one of its entries is a substring of the module name."""
    if targets is None:
        return True
    module = param_name.rsplit(".", 1)[0]
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(t in module for t in targets)


def create_flora_optimizer(
    model: nn.Module,
    args: Any,
    *,
    optimizer: str = "flora-adamw",
    rank: int = 32,
    kappa: int = 1000,
    target_modules: str | Sequence[str] | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """``Flora`` or ``FloraAdamW`` configured from ``TrainingArguments``.

    Param groups: parameters of ``target_modules`` (all matrices when None) are compressed,
    the others keep ordinary state (``compress=False``); parameters with fewer than 2 dims
    (biases, norms) get no weight decay, as in the Trainer's default grouping. ``options``
    go to the optimizer (e.g. ``seed``, ``side``, ``momentum_variant``).
    """
    if optimizer not in ("flora", "flora-adamw"):
        raise ValueError(f"optimizer must be 'flora' or 'flora-adamw', got {optimizer!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if target_modules is not None:  # a string is one regex; a list's entries each on its own
        names = [n for n, _ in named]
        entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        modules = (re.sub(r"\.\d+\.", ".*.", n.rsplit(".", 1)[0] + ".")[:-1] for n in names)
        warn_unmatched_patterns(
            entries,
            names,
            "target_modules",
            matches=lambda e, n: _is_target(n, e if e is target_modules else [e]),
            shown=list(dict.fromkeys(modules)),  # module names, layer indices folded
        )
    groups: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, p in named:
        key = (_is_target(name, target_modules), p.dim() >= 2)
        groups.setdefault(key, []).append((name, p))
    param_groups = [
        {
            "params": params,
            "compress": target,
            "weight_decay": args.weight_decay if decay else 0.0,
        }
        for (target, decay), params in groups.items()
    ]
    common = {"lr": args.learning_rate, "rank": rank, "kappa": kappa, **options}
    if optimizer == "flora-adamw":
        return FloraAdamW(
            param_groups,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            **common,
        )
    return Flora(param_groups, beta1=args.adam_beta1, **common)


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - only when transformers is missing
        return object
    return TrainerCallback


class FloraAccumulationCallback(_callback_base()):  # type: ignore[misc]
    """Compressed gradient accumulation inside ``transformers.Trainer`` (see module doc)."""

    def __init__(
        self, rank: int = 32, seed: int = 0, clip: str = "estimate", **options: Any
    ) -> None:
        if clip not in ("estimate", "decompressed"):
            raise ValueError(f"clip must be 'estimate' or 'decompressed', got {clip!r}")
        self.rank, self.seed, self.clip, self.options = rank, seed, clip, options
        self.accumulator: GradientAccumulator | None = None
        self._trainer_max_grad_norm: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.gradient_accumulation_steps <= 1 or model is None:
            return
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise NotImplementedError(
                "FloraAccumulationCallback does not support multi-process training yet; "
                "use flora.GradientAccumulator(ddp_model, ...) in your own loop"
            )
        options = dict(self.options)
        if self.clip == "estimate" and args.max_grad_norm and args.max_grad_norm > 0:
            self._trainer_max_grad_norm = args.max_grad_norm
            args.max_grad_norm = 0.0  # the accumulator clips, with the true-norm estimate
            options["max_grad_norm"] = self._trainer_max_grad_norm
        if self.accumulator is None:
            self.accumulator = GradientAccumulator(
                model,
                args.gradient_accumulation_steps,
                rank=self.rank,
                seed=self.seed,
                is_last_micro_batch=accelerate_sync(),
                **options,
            )
        self.accumulator.cycle = state.global_step  # the projections of a resumed run

    def on_log(self, args, state, control, logs=None, **kwargs):
        acc = self.accumulator
        if self.clip != "estimate" or acc is None or acc.grad_norm is None or not logs:
            return
        if "grad_norm" in logs:
            entries = [logs]
            if state.log_history and state.log_history[-1].get("grad_norm") == logs["grad_norm"]:
                entries.append(state.log_history[-1])  # the Trainer's copy, already stored
            for entry in entries:
                entry["grad_norm_decompressed"] = entry["grad_norm"]
                entry["grad_norm"] = float(acc.grad_norm)

    def on_train_end(self, args, state, control, **kwargs):
        if self._trainer_max_grad_norm is not None:
            args.max_grad_norm = self._trainer_max_grad_norm
            self._trainer_max_grad_norm = None
        if self.accumulator is not None:
            self.accumulator.remove()
            self.accumulator = None
