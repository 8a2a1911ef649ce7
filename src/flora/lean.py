r"""The lean preset: full-parameter training with as few bytes per parameter as Flora allows.

:func:`lean_setup` turns on, for a model and one of Flora's optimizers, everything that shrinks the
memory of training besides activations:

* **bf16 weights without float32 masters** — the model is cast to bf16 and the optimizer
  writes each step back with stochastic rounding (``rounding="stochastic"``,
  :mod:`flora.rounding`): 2 bytes per parameter instead of 4 (+ 4 for a master copy);
* **bf16 optimizer state** — moments (``moment_dtype``) and a gradient basis
  (``basis_dtype``) in bf16, rounded stochastically;
* **compressed gradient accumulation with step-in-backward** — a
  :class:`~flora.GradientAccumulator` of ``accumulate`` micro-batches (compressed when
  ``accumulate > 1``) that steps each parameter inside ``backward()`` of the last micro-batch
  and frees its gradient at once, so at most about one parameter's gradient exists at a time;
  a tied weight's later uses (a head tied to the embedding) are routed apart
  (:func:`flora.accumulation.route_shared_uses`), so their gradients are not held in
  backward either.

The returned :class:`Lean` says what it turned on (``print(setup)``). The training loop then
runs the micro-batches inside ``setup.accumulator.micro_batch()`` and does **not** call
``optimizer.step()``: the accumulator steps the parameters, then calls ``step()`` once per
cycle with no gradient left, so LR schedulers and step hooks see one step per cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flora.accumulation import GradientAccumulator, route_shared_uses
from flora.optim import Flora, FloraAdamW, FloraLion, FloraSGD
from flora.optim.base import FloraOptimizerBase
from flora.options import check_int

__all__ = ["LEAN_OPTIMIZERS", "Lean", "lean_setup"]

#: the optimizers the preset can build, by name
LEAN_OPTIMIZERS: dict[str, type[FloraOptimizerBase]] = {
    "flora": Flora,
    "flora-adamw": FloraAdamW,
    "flora-sgd": FloraSGD,
    "flora-lion": FloraLion,
}


@dataclass
class Lean:
    """What :func:`lean_setup` built: the optimizer, the accumulator and the settings turned on."""

    optimizer: FloraOptimizerBase
    accumulator: GradientAccumulator
    settings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "lean preset: " + "; ".join(self.settings)


def lean_setup(
    model: nn.Module,
    optimizer: str | type[FloraOptimizerBase] = "flora",
    *,
    accumulate: int = 16,
    rank: int = 32,
    accumulate_rank: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Lean:
    """Cast ``model`` to bf16 in place and build the lean optimizer and accumulator.

    ``optimizer`` is a name of :data:`LEAN_OPTIMIZERS` or one of their classes; ``options``
    go to it (``lr``, ``kappa``, ...), except the three the preset sets (``rounding``,
    ``moment_dtype``, ``basis_dtype``), which raise ValueError if given. The accumulator uses
    ``accumulate_rank`` (default ``rank``) and ``seed + 1``, so its projections never
    coincide with the momentum's.
    """
    if isinstance(optimizer, str):
        if optimizer not in LEAN_OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {tuple(LEAN_OPTIMIZERS)} or their class, "
                f"got {optimizer!r}"
            )
        cls = LEAN_OPTIMIZERS[optimizer]
    elif isinstance(optimizer, type) and issubclass(optimizer, FloraOptimizerBase):
        cls = optimizer
    else:
        raise TypeError(f"optimizer must be a name or a Flora optimizer class, got {optimizer!r}")
    check_int("accumulate", accumulate, 1)
    fixed = {"rounding", "moment_dtype", "basis_dtype"} & set(options)
    if fixed:
        raise ValueError(f"the lean preset sets {sorted(fixed)} itself; leave them out")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:  # a tied head's gradient is then not held in backward
        routed, unrouted = route_shared_uses(model), ""
    except TypeError as e:  # a holder it cannot reroute: said in the settings
        routed, unrouted = [], str(e)
    model.to(torch.bfloat16)
    opt = cls(
        model.named_parameters(),
        rank=rank,
        seed=seed,
        rounding="stochastic",
        moment_dtype=torch.bfloat16,
        basis_dtype=torch.bfloat16,
        **options,
    )
    compress = accumulate > 1
    acc = GradientAccumulator(
        model,
        accumulate,
        rank=accumulate_rank or rank,
        seed=seed + 1,
        compress=compress,
        optimizer=opt,
        step_in_backward=True,
    )
    settings = [
        "bf16 weights without float32 masters (stochastic rounding)",
        "bf16 moments and gradient basis (stochastic rounding)",
        (
            f"compressed accumulation (low-rank sketch) of {accumulate} micro-batches "
            f"(rank {accumulate_rank or rank})"
            if compress
            else "no accumulation (accumulate=1)"
        ),
        "step-in-backward (each gradient freed once its parameter is stepped)",
    ]
    if routed:
        settings.append(f"tied weights' later uses routed apart ({', '.join(routed)})")
    if unrouted:
        settings.append(f"tied weights held in backward ({unrouted})")
    return Lean(opt, acc, settings)
