"""Buckets of same-shaped matrices for the multi-tensor step (``foreach``).

A transformer's layers share shapes, so its matrices fall into a few buckets with the same
(group, shape, dtype, device, state layout, step count). A bucket's state tensors live
stacked, ``(B, ...)``, and each parameter's ``optimizer.state[p][key]`` is the view
``stack[i]`` of its row: the stacked step updates every parameter's state in place with one
batched op per formula, and ``state_dict()``, the per-parameter loop (``foreach=False``, and
the steps the engine leaves to it) and user code see ordinary per-parameter tensors.

A stack is rebuilt (the current per-parameter tensors copied into a new one) whenever a
parameter's state tensor is no longer its view — after ``load_state_dict``, a new window's
basis, or when the bucket's members change — so the per-parameter state stays the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Bucket", "StackedStates", "add_scaled_"]


@dataclass
class Bucket:
    """One multi-tensor step's inputs: ``B`` same-shaped compressed matrices."""

    params: list[Tensor]  # the matrices (m, n), updated in place
    grads: Tensor  # (B, m, n): their gradients, stacked (the step may overwrite them)
    stacks: dict[str, Tensor]  # the stacked state tensors, (B, ...) each
    proj: Tensor  # (B, r, d): each matrix's projection of this step, in the state dtype
    side: str  # where the momentum is compressed: "left" or "right"
    step: int | Tensor  # the members' step count after this step (0-D tensor if compiled)


class StackedStates:
    """Per bucket (keyed by its parameters' ids) the stacked state tensors and their views."""

    def __init__(self) -> None:
        # bucket signature -> (keys, {key: stack}, [per-member {key: view}])
        self._stacks: dict[tuple[int, ...], tuple[tuple[str, ...], dict[str, Tensor], list]] = {}
        self._bucket_of: dict[int, tuple[int, ...]] = {}  # id(param) -> its bucket's signature

    def clear(self) -> None:
        self._stacks.clear()
        self._bucket_of.clear()

    def stacks(
        self, params: Sequence[Tensor], states: Sequence[dict[str, Any]], keys: Sequence[str]
    ) -> dict[str, Tensor]:
        """The stacks of ``keys`` for these parameters, rebuilt if any state tensor changed."""
        signature = tuple(id(p) for p in params)
        keys = tuple(keys)
        cached = self._stacks.get(signature)
        if cached is not None and cached[0] == keys:
            views = cached[2]
            if all(
                st.get(k) is v for st, member in zip(states, views, strict=True)
                for k, v in member.items()
            ):  # fmt: skip
                return cached[1]
        for pid in signature:  # members leave their old buckets, which are forgotten
            old = self._bucket_of.get(pid)
            if old is not None and old != signature:
                self._stacks.pop(old, None)
                for other in old:
                    if self._bucket_of.get(other) == old:
                        del self._bucket_of[other]
        stacked = {k: torch.stack([st[k] for st in states]) for k in keys}
        views = []
        for i, st in enumerate(states):
            member = {k: stacked[k][i] for k in keys}
            st.update(member)
            views.append(member)
        self._stacks[signature] = (keys, stacked, views)
        for pid in signature:
            self._bucket_of[pid] = signature
        return stacked


def add_scaled_(params: list[Tensor], directions: Tensor, lr: float | Tensor) -> None:
    """``params[i] -= lr * directions[i]``; a tensor ``lr`` (compiled steps) scales the
    stack first, a float goes in as ``alpha`` (one rounding, as the loop's ``add_``)."""
    if isinstance(lr, Tensor):
        torch._foreach_add_(params, directions.mul_(-lr).unbind(0))
    else:
        torch._foreach_add_(params, directions.unbind(0), alpha=-lr)
