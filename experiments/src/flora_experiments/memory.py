"""Exact byte accounting of what an optimizer or a model holds (no allocator readings).

``optimizer_state_bytes`` walks an optimizer's ``state`` — tensors, containers and the
attributes of helper objects such as GaLore's projectors — and counts every storage once, so
peers that keep projection matrices or quantization tables are charged for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["optimizer_state_bytes", "parameter_bytes", "tensor_bytes"]


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def tensor_bytes(obj: Any, seen: set[tuple[str, int]] | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (tensors, dicts, lists,
    tuples, sets and objects' ``__dict__``; a storage shared by several views counts once)."""
    seen = set() if seen is None else seen
    if depth > 8:
        return 0
    if isinstance(obj, Tensor):
        if obj.device.type == "meta":
            return 0
        local = getattr(obj, "_local_tensor", obj)  # DTensor: this rank's shard
        key = _storage_key(local)
        if key in seen:
            return 0
        seen.add(key)
        return local.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        return sum(tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of everything the optimizer keeps per parameter (``optimizer.state``), with the
    parameters themselves excluded should a state refer to one."""
    seen = {_storage_key(p) for g in optimizer.param_groups for p in g["params"]}
    return tensor_bytes(dict(optimizer.state), seen)


def parameter_bytes(params: Iterable[Tensor], trainable_only: bool = False) -> int:
    return sum(
        p.numel() * p.element_size() for p in params if p.requires_grad or not trainable_only
    )
