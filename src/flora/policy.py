"""Which parameters Flora compresses, and on which side: the one compress-or-not policy.

Rules, applied in this order to a parameter of shape ``shape`` named ``name``:

1. ``compress=False`` in its parameter group: not compressed.
2. Fewer than 2 dimensions (biases, norms): not compressed, ordinary state.
3. ``name`` matches one of the group's ``exclude`` regular expressions (``re.search``):
   not compressed.
4. N-d tensors are viewed as the matrix ``(shape[0], prod(shape[1:]))`` — output channels
   by everything else, as ``nn.Linear`` and ``nn.Conv*d`` lay out their weights.
5. Side: ``"auto"`` compresses the smaller of the two matrix dimensions (``"left"`` when
   ``m <= n``), so the compressed state is ``r x max(m, n)`` as in the paper; ``"left"`` or
   ``"right"`` force a side.
6. The compressed dimension must exceed the rank, otherwise compression saves nothing and the
   parameter keeps ordinary state (the plan says so, and the optimizer warns).

Embeddings and output heads are matrices and are compressed by these rules unless excluded by
name; unlike flora-opt there is no hidden aspect-ratio cut-off.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from flora.projection import DISTRIBUTIONS

__all__ = ["SIDES", "Decision", "check_options", "compile_patterns", "decide", "matrix_shape"]

SIDES = ("auto", "left", "right")


@dataclass(frozen=True)
class Decision:
    """The policy's verdict for one parameter."""

    name: str
    shape: tuple[int, ...]
    compressed: bool
    reason: str
    side: str | None = None
    rank: int | None = None

    @property
    def matrix_shape(self) -> tuple[int, int] | None:
        return matrix_shape(self.shape)

    @property
    def compressed_dim(self) -> int | None:
        """Length of the dimension the projection removes (m on the left, n on the right)."""
        if not self.compressed:
            return None
        m, n = self.matrix_shape  # type: ignore[misc]
        return m if self.side == "left" else n

    @property
    def state_shape(self) -> tuple[int, int] | None:
        """Shape of a compressed state: ``(r, n)`` on the left, ``(m, r)`` on the right."""
        if not self.compressed:
            return None
        m, n = self.matrix_shape  # type: ignore[misc]
        return (self.rank, n) if self.side == "left" else (m, self.rank)  # type: ignore[return-value]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int] | None:
    """The matrix view ``(shape[0], prod(shape[1:]))`` of a tensor with >= 2 dims, else None."""
    if len(shape) < 2:
        return None
    return int(shape[0]), int(math.prod(shape[1:]))


def compile_patterns(exclude: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validate ``exclude`` (one regex or a sequence of them) and return it as a tuple."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        exclude = (exclude,)
    if not isinstance(exclude, Sequence):
        raise TypeError(f"exclude must be a str or a sequence of str, got {type(exclude).__name__}")
    patterns = tuple(exclude)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"exclude patterns must be str, got {type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"exclude pattern {pattern!r} is not a valid regex: {err}") from err
    return patterns


def check_options(
    *, rank: int, seed: int, side: str, distribution: str, flags: dict[str, object]
) -> None:
    """Raise TypeError/ValueError naming the argument for bad compression options (shared by
    the accumulator and the DDP hook; the optimizers validate per parameter group)."""
    for name, value, low in (("rank", rank, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def decide(
    name: str,
    shape: Sequence[int],
    *,
    rank: int,
    compress: bool = True,
    exclude: Sequence[str] = (),
    side: str = "auto",
) -> Decision:
    """Apply the policy (see the module docstring) to one parameter."""
    shape = tuple(int(s) for s in shape)
    if not compress:
        return Decision(name, shape, False, "compression disabled (compress=False)")
    view = matrix_shape(shape)
    if view is None:
        return Decision(name, shape, False, f"{len(shape)}-D tensor: kept uncompressed")
    for pattern in exclude:
        if re.search(pattern, name):
            return Decision(name, shape, False, f"excluded by pattern {pattern!r}")
    m, n = view
    if side == "auto":
        side = "left" if m <= n else "right"
    elif side not in ("left", "right"):
        raise ValueError(f"side must be 'auto', 'left' or 'right', got {side!r}")
    dim = m if side == "left" else n
    if rank >= dim:
        return Decision(
            name, shape, False, f"rank {rank} >= compressed dim {dim}: no saving", side, rank
        )
    return Decision(name, shape, True, f"{side}: {dim} -> {rank}", side, rank)
