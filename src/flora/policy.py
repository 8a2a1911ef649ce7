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
   ``"right"`` force a side. A row-sharded (FSDP2) matrix is compressed on the right.
6. The compressed dimension must exceed the rank, otherwise compression saves nothing and the
   parameter keeps ordinary state (the plan says so, and the optimizer warns).

Embeddings and output heads are matrices and are compressed by these rules unless excluded by
name; unlike flora-opt there is no hidden aspect-ratio cut-off.

Checks shared by the optimizers, the accumulator and the DDP hook: parameter names must be
unique (names key the projections; two parameters under one name would share one and their
compression noise would be correlated), a pattern that matches no parameter is warned about,
and :func:`momentum_growth` says when a compressed momentum can grow without bound.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from flora.options import SIDE_CHOICES, check_bool, check_choice, check_int
from flora.projection import DISTRIBUTIONS, ORTHONORMAL

__all__ = [
    "Decision",
    "check_options",
    "check_unique_names",
    "compile_patterns",
    "decide",
    "matrix_shape",
    "momentum_growth",
    "warn_unmatched_patterns",
]


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
    def kept_dim(self) -> int | None:
        """Length of the dimension a compressed state keeps (n on the left, m on the right)."""
        if not self.compressed:
            return None
        m, n = self.matrix_shape  # type: ignore[misc]
        return n if self.side == "left" else m

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


def check_unique_names(names: Iterable[str], what: str) -> None:
    """Raise ValueError listing the names that occur more than once."""
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ValueError(
            f"{what} must be unique (they key the projections), but "
            + ", ".join(repr(n) for n in dupes[:5])
            + (" ..." if len(dupes) > 5 else "")
            + " occur more than once; e.g. prefix each module's names"
        )


def warn_unmatched_patterns(
    patterns: Sequence[Any],
    names: Sequence[str],
    what: str,
    *,
    matches: Callable[[Any, str], bool] = lambda pattern, name: (
        re.search(pattern, name) is not None
    ),
    shown: Sequence[str] | None = None,
    stacklevel: int = 3,
) -> None:
    """Warn (UserWarning) about each of ``patterns`` that ``matches`` (default: ``re.search``)
    finds in none of ``names``, showing a few of ``shown`` (default: the names)."""
    unmatched = [pat for pat in patterns if not any(matches(pat, n) for n in names)]
    if unmatched and names:
        shown = list(names if shown is None else shown)
        sample = ", ".join(shown[:8]) + (", ..." if len(shown) > 8 else "")
        warnings.warn(
            f"{what} {unmatched} match no parameter (names look like: {sample})",
            UserWarning,
            stacklevel=stacklevel,
        )


def momentum_growth(
    beta1: float,
    kappa: int,
    dim: int,
    rank: int,
    *,
    variant: str = "history",
    distribution: str = "gaussian",
) -> float:
    r"""How much a compressed momentum's noise can grow per window: :math:`\beta_1^\kappa
    \sqrt{1 + (d+1)/r}`, or :math:`\beta_1^\kappa` for ``variant="subspace"`` with an
    orthonormal projection (``"orthonormal"`` or ``"coordinates"``).

    Each transfer to a new projection multiplies the stale momentum's error by about
    :math:`\sqrt{1 + (d+1)/r}` (``d`` the compressed dimension, ``r`` the rank) while the
    momentum decays by :math:`\beta_1^\kappa` over a window; at 1 or more the compressed
    momentum can grow without bound (e.g. ``rank=4, kappa=2`` on an 8x64 matrix). The
    subspace variant's transfer with an orthonormal projection is an orthogonal projection
    (:mod:`flora.momentum`), which never inflates the momentum.
    """
    if variant == "subspace" and distribution in ORTHONORMAL:
        return float(beta1) ** kappa
    return float(beta1) ** kappa * math.sqrt(1 + (dim + 1) / rank)


def check_options(
    *,
    rank: int,
    seed: int,
    side: str,
    distribution: str,
    flags: dict[str, object],
    distributions: Sequence[str] = DISTRIBUTIONS,
) -> None:
    """Raise TypeError/ValueError naming the argument for bad compression options (shared by
    the accumulator and the DDP hook; the optimizers validate per parameter group)."""
    check_int("rank", rank, 1)
    check_int("seed", seed, 0)
    for name, flag in flags.items():
        check_bool(name, flag)
    check_choice("side", side, SIDE_CHOICES)
    check_choice("distribution", distribution, distributions)


def decide(
    name: str,
    shape: Sequence[int],
    *,
    rank: int,
    compress: bool = True,
    exclude: Sequence[str] = (),
    side: str = "auto",
    row_sharded: bool = False,
) -> Decision:
    """Apply the policy (see the module docstring) to one parameter.

    ``row_sharded``: the parameter's rows are split across processes (FSDP2's ``Shard(0)``).
    Then ``side="auto"`` compresses on the right, along the unsharded columns, so that every
    process updates its own rows without communication, and ``side="left"`` is refused. The
    plan says so; a single-device run that should resume under FSDP2 (or the reverse) passes
    ``side="right"``, and a checkpoint compressed on another side is refused on load.
    """
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
    check_choice("side", side, SIDE_CHOICES)
    why = ""
    if row_sharded:
        if side == "left":
            raise ValueError(
                f"side='left' on the row-sharded (FSDP2) parameter {name}: its rows are split "
                "across processes; use side='auto' or 'right'"
            )
        side, why = "right", " (rows sharded)"
    elif side == "auto":
        side = "left" if m <= n else "right"
    dim = m if side == "left" else n
    if rank >= dim:
        return Decision(
            name, shape, False, f"rank {rank} >= compressed dim {dim}: no saving", side, rank
        )
    return Decision(name, shape, True, f"{side}{why}: {dim} -> {rank}", side, rank)
