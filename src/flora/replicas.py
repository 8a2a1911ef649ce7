"""One check that every process of a ``torch.distributed`` job uses the same settings.

Flora's projections are pure functions of (seed, parameter name, window, rank, ...), so
replicas stay identical only if every process draws the same ones. Processes that disagree
(``Flora(seed=rank)``, a rank that differs) would drift apart silently or abort inside a
collective with mismatched sizes. :func:`check_same_settings` gathers each process's settings
once (one ``all_gather_object``) and raises the same ``ValueError`` on every process, naming
the first setting that differs.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["check_same_settings"]


def check_same_settings(settings: dict[str, Any], *, what: str, group: Any = None) -> None:
    """Raise ValueError on every process unless all processes of ``group`` (default: the
    world) pass equal ``settings``; a no-op without an initialized group of >= 2 processes.
    Every process of the group must call it (it is a collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world < 2:
        return
    mine = {key: repr(value) for key, value in settings.items()}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    reference = gathered[0]
    for rank, theirs in enumerate(gathered):
        if theirs == reference:
            continue
        keys = [k for k in reference if reference.get(k) != theirs.get(k)]
        keys += [k for k in theirs if k not in reference]
        key = keys[0]
        raise ValueError(
            f"{what}: the processes disagree on {key}: rank 0 has {reference.get(key)}, "
            f"rank {rank} has {theirs.get(key)}. Every process must use the same settings "
            "(same seed on every rank: the projections must be identical)"
        )
