r"""Sums of squares over a matrix's rows or columns, the way they are fast on each device.

On the CPU, torch's reduction over a row-major matrix's rows (``dim=-2``, one value per
column) is many times slower than over its columns: ``torch.linalg.vector_norm(x, dim=-2)``
of a 768 x 3072 float32 matrix takes about 30 times as long as ``dim=-1`` on two cores, and
about half of a ``torch.optim.Adafactor`` step on GPT-2-small shapes is spent there
(``benchmarks/results/optimizer_step_cpu.md``). :func:`column_sum_of_squares` forms the
column sums as products instead, ``1^T (X \odot X)``, over blocks of rows of at most
:data:`BLOCK_NUMEL` entries, so that the squared temporary stays small; other devices take
the reduction itself, and so does a tensor of at most one block. The sums are the same up
to rounding (a different order of additions), not bit for bit.

:data:`ShardSums` and :func:`run_sums` are how a step written for an FSDP2 row shard asks
for sums over the shards (an optimizer gathers them from all its parameters into one
all-reduce).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import torch
from torch import Tensor

__all__ = ["BLOCK_NUMEL", "ShardSums", "column_sum_of_squares", "run_sums", "sum_of_squares"]

#: entries of the squared block :func:`column_sum_of_squares` forms at a time (1 MiB of
#: float32)
BLOCK_NUMEL = 2**18


def column_sum_of_squares(x: Tensor) -> Tensor:
    r""":math:`\sum_i x_{ij}^2` over the rows of ``x`` (``(..., m, n)``), kept as
    ``(..., 1, n)``."""
    if x.device.type != "cpu" or x.numel() <= BLOCK_NUMEL:
        # small (one block, where the slow kernel costs little) or not on the CPU: 2 ops
        return torch.linalg.vector_norm(x, dim=-2, keepdim=True).square_()
    m = x.size(-2)  # >= 1 here: the tensor has more than BLOCK_NUMEL entries
    rows = max(1, BLOCK_NUMEL // (math.prod(x.shape[:-2]) * x.size(-1)))
    ones = x.new_ones(1, min(rows, m))
    total = ones @ (x[..., :rows, :] * x[..., :rows, :])
    for start in range(rows, m, rows):
        block = x[..., start : start + rows, :]
        total.add_(ones[:, : block.size(-2)] @ (block * block))
    return total


def sum_of_squares(x: Tensor, dim: int) -> Tensor:
    """The sums of squares of ``x`` over ``dim`` (-1 or -2), kept: per row or per column."""
    if dim == -2:
        return column_sum_of_squares(x)
    if dim != -1:
        raise ValueError(f"dim must be -1 or -2, got {dim}")
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()


ShardSums = Generator[Tensor, None, Any]
"""A step body on an FSDP2 row shard, written as a generator: every tensor it yields must be
summed in place over the ranks that hold the parameter's shards before the body resumes (a
global statistic made of local sums); the body's return value is its result. One body per
parameter lets an optimizer's ``step()`` sum what all parameters need at the same point with
one all-reduce (``FloraOptimizerBase._run_shard_bodies``) instead of one per parameter."""


def run_sums(body: ShardSums, sum_: Callable[[Tensor], Any] | None) -> Any:
    """Drive ``body`` to its end on its own, summing each tensor it yields with ``sum_`` (a
    blocking all-reduce; ``None`` for a body that must not ask for one); its result."""
    try:
        wanted = next(body)
        while True:
            if sum_ is None:
                raise RuntimeError("an unsharded step asked for a sum over shards")
            sum_(wanted)
            wanted = body.send(None)
    except StopIteration as stop:
        return stop.value
