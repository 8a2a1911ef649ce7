r"""Seeded random projections: the only source of randomness in Flora.

A projection is a matrix :math:`P \in \mathbb{R}^{r \times d}` with
:math:`\mathbb{E}[P^\top P] = I_d`, of one of three families:

* ``"gaussian"`` (default, the paper's): i.i.d. :math:`\mathcal{N}(0, 1/r)` entries;
* ``"rademacher"``: i.i.d. :math:`\pm 1/\sqrt{r}` entries;
* ``"orthonormal"``: :math:`P = \sqrt{d/r}\, Q^\top` with :math:`Q \in \mathbb{R}^{d \times r}`
  the Q factor of a seeded Gaussian :math:`d \times r` matrix (signs fixed by
  :math:`\operatorname{diag} R > 0`, which makes the row space Haar-distributed), so
  :math:`P P^\top = (d/r) I_r` exactly and :math:`(r/d) P^\top P` is the orthogonal projector
  onto the row space. Needs :math:`r \le d`. The QR runs in float64 on the projection's
  device, so CPU and CUDA agree to float64 rounding (not bit for bit as the others);
* ``"coordinates"``: :math:`P = \sqrt{d/r}\, S` with :math:`S` the rows of the identity at
  ``r`` distinct coordinates drawn without replacement (the first ``r`` of a keyed
  permutation of ``0..d-1``, in increasing order): orthonormal like the previous family,
  integer-exact on every device, and its subspace is ``r`` whole rows (or columns) of the
  matrix. Needs :math:`r \le d`.

It is a **pure function** of

* the user seed,
* a stable key of the parameter (:func:`parameter_key` of its name, or of its position),
* the window index (the resampling period for momentum, the cycle for accumulation),
* a stream name (``"momentum"``, ``"accumulation"``, ...), so two uses never share a matrix,
* its shape ``(rank, dim)`` and the distribution.

Nothing depends on Python's ``hash()``, on a ``torch.Generator`` or on the device: the
entries come from a counter-based generator keyed by a BLAKE2b digest of the tuple above,
computed in int64 tensor arithmetic that never overflows. Two generators exist, and the
version is part of every state that holds a compressed buffer, so checkpoints written with
the first keep decoding with it (``generator=`` of :func:`projection_matrix`):

* **v2** (``generator=2``, :data:`GENERATOR`, used by every new state):
  Philox4x32-10 (Salmon, Moraes, Dror & Shaw, SC 2011; checked against the Random123
  known-answer vectors), counter ``(index, c1, c2, c3)`` and key ``(k0, k1)`` from the
  digest; its 32-bit words become uniforms :math:`(2\lfloor w / 2^9 \rfloor + 1) / 2^{24}`
  (exact in float32, in :math:`(0, 1)`), and Gaussians by a Box–Muller transform in float32
  (float64 only when a float64 matrix is asked for). No float64 arithmetic otherwise, so it
  runs where float64 does not (Apple MPS) and fast where float64 is slow. The Rademacher and
  coordinate families are integer-exact: bit-identical on every device. Gaussian and
  orthonormal matrices agree across devices to float32 rounding of ``log``, ``cos``, ``sin``
  (and the QR).
* **v1** (``generator=1``, checkpoints written before v2): a two-stage 32-bit integer hash
  of the element's index followed by a Box–Muller transform in float64 and one rounding to
  the requested dtype.

Either way the same arguments give the same matrix after a restart.

Sides. A matrix :math:`G \in \mathbb{R}^{m \times n}` is compressed on the

* ``"left"`` with :math:`P \in \mathbb{R}^{r \times m}`:
  :math:`C = P G \in \mathbb{R}^{r \times n}`,
  :math:`\hat G = P^\top C`;
* ``"right"`` with :math:`P \in \mathbb{R}^{r \times n}`: :math:`C = G P^\top \in
  \mathbb{R}^{m \times r}`, :math:`\hat G = C P`.

The range finder's test matrix (:func:`range_basis`) is not a projection that a state must
regenerate as a family; it only needs random entries of equal variance. :func:`sign_matrix`
draws it as Rademacher signs, one bit of a Philox word each: 32 entries per word instead of
one Gaussian (or one sign) per word, integer-exact on every device (Halko, Martinsson &
Tropp 2011, §4.6, allow any such sub-Gaussian test matrix). The accumulator's low-rank
sketch keeps Gaussian test matrices: with random signs it trained slightly worse in LM
pre-training (``docs/results.md``).

A fifth kind of basis is not seed-only: :func:`range_basis` (``distribution="gradient"`` of
the optimizers) finds the dominant ``r``-dimensional subspace of a matrix — the gradient at a
window's first step — with a seeded randomized range finder. Its rows are orthonormal and
scaled like the ``"orthonormal"`` family (:math:`P P^\top = (d/r) I_r`), so every formula
below applies unchanged; but it depends on data, so the optimizer stores it in its state.

Transfer between windows (Algorithm 2, step 1) maps :math:`C` compressed with :math:`P` to
:math:`P' P^\top C` (left) or :math:`C P P'^\top` (right), computed through the small
:math:`r \times r` product.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Generator
from typing import Any, Literal

import torch
from torch import Tensor

from flora.philox import philox4x32, philox4x32_streams, random_words, stream_words
from flora.reductions import run_sums

__all__ = [
    "DISTRIBUTIONS",
    "GENERATOR",
    "GENERATORS",
    "ORTHONORMAL",
    "SIDES",
    "down",
    "gaussian_from_words",
    "parameter_key",
    "projection_matrices",
    "projection_matrix",
    "range_basis",
    "sign_matrix",
    "sketch_reconstruct",
    "sketch_sizes",
    "transfer",
    "up",
]

Side = Literal["left", "right"]
Distribution = Literal["gaussian", "rademacher", "orthonormal", "coordinates"]
SIDES: tuple[str, ...] = ("left", "right")
DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "rademacher", "orthonormal", "coordinates")
#: the data-dependent basis of :func:`range_basis`, which an optimizer keeps in its state
GRADIENT = "gradient"
#: the accumulator's low-rank sketch (:func:`sketch_sizes`, :func:`sketch_reconstruct`)
SKETCH = "sketch"
#: families whose rows are orthogonal with P P^T = (d/r) I exactly
ORTHONORMAL: tuple[str, ...] = ("orthonormal", "coordinates", GRADIENT)

_MASK32 = 0xFFFFFFFF
# Odd multiplier < 2**31: a 32-bit value times it stays below 2**59, so int64 never overflows
# and the low 32 bits are exact on every backend.
_MUL = 0x045D9F3B
_VERSION = "flora-projection/v1"
#: the projection generators a state may name: 1 (hash + float64 Box-Muller), 2 (Philox)
GENERATORS: tuple[int, ...] = (1, 2)
#: the generator new states use
GENERATOR = 2


def parameter_key(name_or_position: str | int) -> int:
    """Stable 63-bit key of a parameter from its name (preferred) or its position.

    Uses BLAKE2b, never Python's salted ``hash()``, so the key is identical in every process.
    """
    if isinstance(name_or_position, bool) or not isinstance(name_or_position, (str, int)):
        raise TypeError(
            f"name_or_position must be a str or an int, got {type(name_or_position).__name__}"
        )
    text = (
        f"name:{name_or_position}"
        if isinstance(name_or_position, str)
        else f"position:{name_or_position}"
    )
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _stream_keys(seed: int, key: int, window: int, stream: str, distribution: str) -> list[int]:
    text = f"{_VERSION}|{seed}|{key}|{window}|{stream}|{distribution}"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def _mix32(x: Tensor) -> Tensor:
    """In-place 32-bit integer finaliser on an int64 tensor holding values in [0, 2**32)."""
    x.bitwise_xor_(x >> 16).mul_(_MUL).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16).mul_(_MUL).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def _hash(counter: Tensor, k0: int, k1: int) -> Tensor:
    # keyed two-stage bijection of the 32-bit counter
    return _mix32(_mix32(counter ^ k0).bitwise_xor_(k1))


def _check_generator(generator: object) -> None:
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be an int, got {type(generator).__name__}")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator}")


def _validate(rank: int, dim: int, seed: int, key: int, window: int) -> None:
    for name, value in (("rank", rank), ("dim", dim), ("seed", seed), ("key", key)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if rank * dim >= 2**32:
        raise ValueError(f"projection of shape ({rank}, {dim}) exceeds 2**32 entries")


def projection_matrix(
    rank: int,
    dim: int,
    *,
    seed: int,
    key: int,
    window: int,
    stream: str = "momentum",
    distribution: Distribution = "gaussian",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: int = GENERATOR,
) -> Tensor:
    r"""The projection :math:`P \in \mathbb{R}^{\text{rank} \times \text{dim}}` for these keys.

    Entry ``(i, j)`` depends only on the arguments and on its flat index ``i * dim + j``
    (the orthonormal family: through the QR of the whole Gaussian matrix). ``generator``
    picks the counter-based generator (module docstring): 2, the default, or 1 for states
    written before it.

    Example:
        >>> p = projection_matrix(4, 6, seed=0, key=parameter_key("w"), window=0)
        >>> p.shape
        torch.Size([4, 6])
        >>> torch.equal(p, projection_matrix(4, 6, seed=0, key=parameter_key("w"), window=0))
        True
    """
    _validate(rank, dim, seed, key, window)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    _check_generator(generator)
    device = torch.device("cpu") if device is None else torch.device(device)
    if distribution in ORTHONORMAL and rank > dim:
        raise ValueError(f"an orthonormal projection needs rank <= dim, got {rank} > {dim}")
    if generator == 2:
        return _projection_v2(rank, dim, seed, key, window, stream, distribution, device, dtype)
    numel = rank * dim
    k0, k1, k2, k3 = _stream_keys(seed, key, window, stream, distribution)
    if distribution == "rademacher":
        bits = _hash(torch.arange(numel, dtype=torch.int64, device=device), k0, k1) >> 31
        signs = 1.0 - 2.0 * bits.to(torch.float64)
        return (signs * (1.0 / math.sqrt(rank))).to(dtype).view(rank, dim)
    if distribution == "coordinates":
        # _hash is a bijection of 32-bit counters, so the keys of 0..d-1 are distinct
        order = torch.argsort(_hash(torch.arange(dim, dtype=torch.int64, device=device), k0, k1))
        chosen = order[:rank].sort().values
        p = torch.zeros(rank, dim, dtype=torch.float64, device=device)
        p[torch.arange(rank, device=device), chosen] = math.sqrt(dim / rank)
        return p.to(dtype)
    pairs = (numel + 1) // 2
    counter = torch.arange(pairs, dtype=torch.int64, device=device)
    u1 = _hash(counter, k0, k1).to(torch.float64).add_(0.5).mul_(2.0**-32)  # (0, 1)
    u2 = _hash(counter, k2, k3).to(torch.float64).add_(0.5).mul_(2.0**-32)
    radius = u1.log_().mul_(-2.0).sqrt_().mul_(1.0 / math.sqrt(rank))
    theta = u2.mul_(2.0 * math.pi)
    normal = torch.stack((radius * theta.cos(), radius * theta.sin()), dim=-1)
    normal = normal.view(-1)[:numel].view(rank, dim)
    if distribution == "orthonormal":
        q, r = torch.linalg.qr(normal.T)  # (dim, rank), (rank, rank)
        signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
        normal = (q * signs).T.mul_(math.sqrt(dim / rank))
    return normal.to(dtype)


def sign_matrix(
    rows: int,
    cols: int,
    *,
    seed: int,
    key: int,
    window: int,
    stream: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""A seeded Rademacher test matrix ``(rows, cols)``, entries :math:`\pm 1/\sqrt{rows}`
    (the scale of the ``"gaussian"`` family, so :math:`\mathbb{E}\lVert S x\rVert^2 =
    \lVert x\rVert^2`).

    Entry ``e = i * cols + j`` is :math:`1 - 2 b`, :math:`b` bit ``e % 32`` (least
    significant first) of word ``e // 32`` of the Philox stream ``("flora-signs/v1", seed,
    key, window, stream)`` (:func:`flora.philox.random_words`), scaled: integer-exact on
    every device, a pure function of the arguments, and one Philox word per 32 entries.
    For randomized test matrices (the sketch of :func:`range_basis`), not a projection
    family.
    """
    _validate(rows, cols, seed, key, window)
    device = torch.device("cpu") if device is None else torch.device(device)
    numel = rows * cols
    words = random_words(
        (numel + 31) // 32, stream_words("flora-signs/v1", seed, key, window, stream),
        device=device,
    )  # fmt: skip
    shifts = torch.arange(32, dtype=torch.int64, device=device)
    bits = (words.unsqueeze(-1) >> shifts).bitwise_and_(1).view(-1)[:numel]
    signs = bits.to(dtype).mul_(-2.0).add_(1.0)
    return signs.mul_(1.0 / math.sqrt(rows)).view(rows, cols)


def gaussian_from_words(words: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    r"""``numel`` standard normals in ``dtype`` from Philox words ``(4, blocks)`` (or
    ``(4, B, blocks)``: ``(B, numel)``, stream by stream).

    Each word :math:`w` becomes :math:`u = (2\lfloor w/2^9 \rfloor + 1)/2^{24} \in (0, 1)`
    (exact in float32); words 0 and 1 of counter :math:`c` give entries :math:`4c, 4c+1` as
    :math:`\sqrt{-2\ln u_0}\,(\cos 2\pi u_1, \sin 2\pi u_1)` (Box–Muller), words 2 and 3
    entries :math:`4c+2, 4c+3`.
    """
    uniform = ((words >> 9) * 2 + 1).to(dtype).mul_(2.0**-24)
    radius = uniform[0::2].log_().mul_(-2.0).sqrt_()  # words 0, 2
    theta = uniform[1::2].mul_(2.0 * math.pi)  # words 1, 3
    normal = torch.stack((radius * theta.cos(), radius * theta.sin()), dim=-1)  # (2, .., 2)
    return normal.movedim(0, -2).reshape(*words.shape[1:-1], -1)[..., :numel]


def projection_matrices(
    rank: int,
    dim: int,
    *,
    seed: int,
    keys: list[int],
    windows: list[int],
    stream: str = "momentum",
    distribution: Distribution = "gaussian",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The stack ``(B, rank, dim)`` of :func:`projection_matrix` (generator 2) for ``B``
    parameter keys and windows, generated together: one Philox pass, one transform and one
    batched QR instead of ``B`` of each. The words are the same; the float32 transform and
    the QR may round a few entries differently from one matrix at a time (vectorized and
    scalar code paths), by an ulp."""
    if len(keys) != len(windows) or not keys:
        raise ValueError("keys and windows must be equally long, non-empty lists")
    for key, window in zip(keys, windows, strict=True):
        _validate(rank, dim, seed, key, window)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if distribution in ORTHONORMAL and rank > dim:
        raise ValueError(f"an orthonormal projection needs rank <= dim, got {rank} > {dim}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if distribution == "coordinates":  # a sort per matrix: one at a time
        return torch.stack([
            _projection_v2(rank, dim, seed, k, w, stream, distribution, device, dtype)
            for k, w in zip(keys, windows, strict=True)
        ])  # fmt: skip
    return _projections_v2(rank, dim, seed, keys, windows, stream, distribution, device, dtype)


def _projections_v2(
    rank: int,
    dim: int,
    seed: int,
    keys: list[int],
    windows: list[int],
    stream: str,
    distribution: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    streams = torch.tensor(
        [
            stream_words("flora-projection/v2", seed, k, w, stream, distribution)
            for k, w in zip(keys, windows, strict=True)
        ],
        dtype=torch.int64,
        device=device,
    )
    blocks = (rank * dim + 3) // 4  # four words per counter
    counter = torch.arange(blocks, dtype=torch.int64, device=device).expand(len(keys), blocks)
    words = philox4x32_streams(counter, streams)  # (4, B, blocks)
    return _from_words(words, rank, dim, distribution, dtype)


def _from_words(
    words: Tensor, rank: int, dim: int, distribution: str, dtype: torch.dtype
) -> Tensor:
    """Projections ``(B, rank, dim)`` from Philox words ``(4, B, blocks)``."""
    count, numel = words.shape[1], rank * dim
    if distribution == "rademacher":  # the top bit of each word, entries in counter order
        bits = words.permute(1, 2, 0).reshape(count, -1)[:, :numel] >> 31
        return (1 - 2 * bits).to(dtype).mul_(1.0 / math.sqrt(rank)).view(count, rank, dim)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    normal = gaussian_from_words(words, numel, work).mul_(1.0 / math.sqrt(rank))
    normal = normal.view(count, rank, dim)
    if distribution == "orthonormal":
        q, r = torch.linalg.qr(normal.mT)  # (B, dim, rank), (B, rank, rank)
        diagonal = torch.diagonal(r, dim1=-2, dim2=-1)
        signs = torch.where(diagonal < 0, -1.0, 1.0).to(q.dtype).unsqueeze(-2)
        normal = (q * signs).mT.mul_(math.sqrt(dim / rank))
    return normal.to(dtype)


def _projection_v2(
    rank: int,
    dim: int,
    seed: int,
    key: int,
    window: int,
    stream: str,
    distribution: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    c1, c2, c3, k0, k1 = stream_words(
        "flora-projection/v2", seed, key, window, stream, distribution
    )
    if distribution == "coordinates":  # a 63-bit sort key per coordinate from two words
        words = philox4x32(torch.arange(dim, dtype=torch.int64, device=device), c1, c2, c3, k0, k1)
        order = torch.argsort((words[0] << 31) | (words[1] >> 1), stable=True)
        chosen = order[:rank].sort().values
        p = torch.zeros(rank, dim, dtype=dtype, device=device)
        p[torch.arange(rank, device=device), chosen] = math.sqrt(dim / rank)
        return p
    blocks = (rank * dim + 3) // 4  # four words per counter
    words = philox4x32(torch.arange(blocks, dtype=torch.int64, device=device), c1, c2, c3, k0, k1)
    return _from_words(words.unsqueeze(1), rank, dim, distribution, dtype)[0]


def range_basis(
    x: Tensor,
    rank: int,
    side: Side,
    *,
    seed: int,
    key: int,
    window: int,
    stream: str = "momentum",
    power_iterations: int = 1,
    shard: tuple[int, int, Callable[[Tensor], Any]] | None = None,
    generator: int = GENERATOR,
) -> Tensor:
    r"""Rows spanning the dominant ``rank``-dimensional subspace of ``x`` (m, n) on ``side``.

    A randomized range finder with subspace iteration (Halko, Martinsson & Tropp, 2011,
    Algorithms 4.3/4.4 and 5.1), for the left side (the column space of :math:`a = x`; the
    right side takes :math:`a = x^\top`, of shape ``(d, o)``), with :math:`k = \min(2r, d)`
    sketch columns and :math:`q` = ``power_iterations``:

    .. math::
        Q &= \operatorname{qr}(a\,\Omega^\top) \quad(\Omega \in \mathbb{R}^{k \times o}
            \text{ the seeded } \texttt{sign\_matrix}
            (k, o, \text{stream} = \text{stream} + \texttt{"/sketch"}))\\
        Q &= \operatorname{qr}\bigl(a\,(a^\top Q)\bigr) \quad (q \text{ times})\\
        U_B &= \text{the } r \text{ leading eigenvectors of } B B^\top,
            \quad B = Q^\top a \in \mathbb{R}^{k \times o}\\
        P &= \sqrt{d/r}\;\bigl(Q\,U_B\bigr)^\top \in \mathbb{R}^{r \times d}

    so :math:`P P^\top = (d/r) I_r` and :math:`(r/d) P^\top P` is the orthogonal projector on
    the ``rank`` leading left singular vectors of ``a`` (exactly so when ``a`` has rank
    :math:`\le k`, otherwise to the range finder's accuracy). The arithmetic runs in ``x``'s
    dtype on ``x``'s device; a zero ``x`` still gives orthonormal rows (Householder QR). The
    result is deterministic for a given ``x`` and device, but not a function of the seed alone.

    ``shard=(offset, rows, sum_)`` (right side only): ``x`` holds rows ``offset ..`` of a
    matrix of ``rows`` rows split across processes (FSDP2), and ``sum_`` all-reduces a
    tensor in place; every product above is a sum over rows, so each process uses its columns
    of :math:`\Omega` and three all-reduces (of ``(d, k)``, ``(d, k)`` per power iteration and
    ``(k, k)``) give every process the same basis as one device, to rounding. ``generator``
    is the state's: ``1`` (states written before v2) draws :math:`\Omega` as the Gaussian
    :func:`projection_matrix` of generator 1, as those states did.
    """
    body = range_basis_steps(
        x, rank, side, seed=seed, key=key, window=window, stream=stream,
        power_iterations=power_iterations, shard=None if shard is None else shard[:2],
        generator=generator,
    )  # fmt: skip
    return run_sums(body, None if shard is None else shard[2])


def range_basis_steps(
    x: Tensor,
    rank: int,
    side: Side,
    *,
    seed: int,
    key: int,
    window: int,
    stream: str = "momentum",
    power_iterations: int = 1,
    shard: tuple[int, int] | None = None,
    generator: int = GENERATOR,
) -> Generator[Tensor, None, Tensor]:
    """:func:`range_basis` as a generator: with ``shard=(offset, rows)`` it yields each
    product that is a sum over the rows (``2 + power_iterations`` of them), to be summed in
    place over the processes before it resumes; its return value is the basis. Lets an
    optimizer sum the range finders of all its matrices together (one all-reduce a round)."""
    _check_side(side)
    if x.dim() != 2:
        raise ValueError(f"x must be a matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if isinstance(power_iterations, bool) or not isinstance(power_iterations, int):
        raise TypeError(f"power_iterations must be an int, got {type(power_iterations).__name__}")
    if power_iterations < 0:
        raise ValueError(f"power_iterations must be >= 0, got {power_iterations}")
    if shard is not None and side != "right":
        raise ValueError("shard: a row-sharded matrix's basis is found on the right side only")
    a = x if side == "left" else x.T  # basis of a's column space
    dim, other = a.shape
    offset, total = shard if shard is not None else (0, other)
    _validate(rank, dim, seed, key, window)
    if rank > dim:
        raise ValueError(f"a gradient basis needs rank <= dim, got {rank} > {dim}")
    k = min(2 * rank, dim)
    if generator == 1:  # states written before v2 keep their Gaussian sketch
        sketch = projection_matrix(
            k, total, seed=seed, key=key, window=window, stream=f"{stream}/sketch",
            device=a.device, dtype=a.dtype, generator=generator,
        )  # fmt: skip
    else:
        sketch = sign_matrix(
            k, total, seed=seed, key=key, window=window, stream=f"{stream}/sketch",
            device=a.device, dtype=a.dtype,
        )  # fmt: skip
    sketch = sketch[:, offset : offset + other]
    y = a @ sketch.T  # (dim, k)
    if shard is not None:
        yield y
    q = torch.linalg.qr(y).Q
    for _ in range(power_iterations):
        y = a @ (a.T @ q)
        if shard is not None:
            yield y
        q = torch.linalg.qr(y).Q
    b = q.T @ a  # (k, other)
    gram = b @ b.T
    if shard is not None:
        yield gram
    u_b = torch.linalg.eigh(gram).eigenvectors.flip(-1)[:, :rank]  # descending eigenvalues
    return (q @ u_b).T.mul_(math.sqrt(dim / rank)).contiguous()


def sketch_sizes(rank: int, kept: int, dim: int) -> tuple[int, int]:
    r"""Sizes ``(k, l)`` of the two sketches that fit the numbers of a rank-``rank`` buffer.

    A matrix :math:`a \in \mathbb{R}^{o \times d}` (``o = kept``, ``d = dim``, the
    compressed dimension) whose compressed buffer would hold :math:`r\,o` numbers is
    sketched instead as :math:`Y = a\,\Omega^\top \in \mathbb{R}^{o \times k}` and
    :math:`W = \Psi\,a \in \mathbb{R}^{l \times d}` with :math:`l = 2k + 1` (Tropp,
    Yurtsever, Udell & Cevher, "Practical sketching algorithms for low-rank matrix
    approximation", SIAM J. Matrix Anal. Appl. 38(4), 2017: for a budget of
    :math:`T = k + l` sketch vectors of a square matrix, :math:`k = (T - 1)/3`) and the
    largest :math:`k` with :math:`k\,o + l\,d \le r\,o`, capped so that
    :math:`k \le \min(o, d)` and :math:`l \le o`. Square matrices get
    :math:`k = \lfloor (r - 1)/3 \rfloor`. ``ValueError`` when not even :math:`k = 1` fits.
    """
    for name, value in (("rank", rank), ("kept", kept), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    k = min((rank * kept - dim) // (kept + 2 * dim), dim, kept)
    if k < 1:
        raise ValueError(
            f"a sketch of a ({kept}, {dim}) matrix in {rank} x {kept} numbers has no room: "
            f"rank must be >= {math.ceil((kept + 3 * dim) / kept)}"
        )
    return k, min(2 * k + 1, kept)


def sketch_reconstruct(y: Tensor, w: Tensor, psi: Tensor) -> Tensor:
    r"""The low-rank matrix that two linear sketches of ``a`` determine (Tropp et al. 2017, the
    two-sketch approximation; also the generalized Nyström method): with
    :math:`Y = a\,\Omega^\top` (``y``, (o, k)), :math:`W = \Psi a`
    (``w``, (l, d)) and :math:`\Psi` (``psi``, (l, o)),

    .. math::
        Q = \operatorname{qr}(Y), \qquad \Psi Q = U T \ (\text{QR}), \qquad
        \hat a = Q\, T^{-1} U^\top W \ (= Q\,(\Psi Q)^{+} W).

    :math:`\hat a` has rank :math:`\le k`; it equals :math:`a` when :math:`a` has rank
    :math:`\le k` (then :math:`a = Q Q^\top a`), and otherwise
    :math:`\mathbb{E}\lVert a - \hat a\rVert_F^2 \le (1 + \frac{k}{l - k - 1})
    \min_{\varrho < k - 1} (1 + \frac{\varrho}{k - \varrho - 1})\,
    \tau_{\varrho + 1}^2(a)` for Gaussian test matrices, with :math:`\tau_j^2` the energy
    of the singular values from the :math:`j`-th on (their bound). Both sketches are
    linear in :math:`a`, so sums of sketches (micro-batches, an all-reduce) sketch the sum.
    A Householder QR gives an orthonormal :math:`Q` also when :math:`Y` is rank-deficient
    or zero (then :math:`\hat a = 0`)."""
    q = torch.linalg.qr(y).Q  # (o, k)
    u, t = torch.linalg.qr(psi @ q)  # (l, k), (k, k)
    x = torch.linalg.solve_triangular(t, u.mT @ w, upper=True)  # (k, d)
    return q @ x


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def down(x: Tensor, proj: Tensor, side: Side) -> Tensor:
    """Compress ``x`` (m, n): ``P @ x`` -> (r, n) on the left, ``x @ P.T`` -> (m, r) on the right.

    A stack of matrices ``(B, m, n)`` with a stack of projections ``(B, r, d)`` works the same,
    matrix by matrix (a batched product)."""
    _check_side(side)
    return proj @ x if side == "left" else x @ proj.mT


def up(c: Tensor, proj: Tensor, side: Side) -> Tensor:
    """Decompress ``c``: ``P.T @ c`` -> (m, n) on the left, ``c @ P`` -> (m, n) on the right
    (stacks as in :func:`down`)."""
    _check_side(side)
    return proj.mT @ c if side == "left" else c @ proj


def transfer(c: Tensor, proj_old: Tensor, proj_new: Tensor, side: Side) -> Tensor:
    """Move a compressed state to a new basis: ``P' P.T c`` (left) or ``c P P'.T`` (right)."""
    _check_side(side)
    if side == "left":
        return (proj_new @ proj_old.mT) @ c
    return c @ (proj_old @ proj_new.mT)
