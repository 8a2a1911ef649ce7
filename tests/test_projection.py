"""Properties of the seeded projection (flora.projection).

- determinism: same arguments, same matrix, across calls and across processes; golden
  values pin both generators so a restart (or a new release) decodes old checkpoints;
- generator v2: the entries are the pure-Python Philox's words (tests/test_philox.py)
  through the stated transforms; no float64 arithmetic for float32 matrices; the
  Gaussian's spectrum follows Marchenko-Pastur (a one-round Philox fails the same test);
- independence: changing the seed, parameter key, window or stream changes the matrix and
  leaves it uncorrelated with the old one;
- distribution: entries have mean 0 and variance 1/r (Gaussian; Rademacher is +-1/sqrt(r));
- unbiasedness at the rate of Theorem 2.4: the mean of P^T P G over N draws approaches G
  with error ~ 1/sqrt(N), and a single draw's error shrinks like 1/sqrt(r);
- v1: float32 is the float64 matrix rounded once; CUDA equals CPU (GPU machines);
- down/up/transfer shapes and their definitions on both sides; bad arguments are refused;
- the gradient basis (range finder): exact on a low-rank matrix, sharpened by power
  iterations, orthonormal even for a zero matrix, its subspace independent of the sketch.
"""

import subprocess
import sys

import pytest
import torch
from reference import philox_python

from flora.philox import philox4x32
from flora.projection import (
    GENERATOR,
    down,
    gaussian_from_words,
    parameter_key,
    projection_matrices,
    projection_matrix,
    range_basis,
    sign_matrix,
    sketch_reconstruct,
    sketch_sizes,
    transfer,
    up,
)

KEY = parameter_key("layers.0.attn.weight")


def test_deterministic_within_a_process():
    a = projection_matrix(8, 100, seed=3, key=KEY, window=2)
    assert torch.equal(a, projection_matrix(8, 100, seed=3, key=KEY, window=2))


def test_deterministic_across_processes():
    code = (
        "import torch;from flora.projection import projection_matrix, parameter_key;"
        "p=projection_matrix(8,100,seed=3,key=parameter_key('layers.0.attn.weight'),window=2);"
        "print(repr(p.double().sum().item()), repr(p[0,:3].tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    p = projection_matrix(8, 100, seed=3, key=KEY, window=2)
    assert out.stdout.split()[0] == repr(p.double().sum().item())


def test_golden_values_pin_the_generator():
    """Changing a generator would silently break every saved checkpoint: pin v1 (v2 is
    pinned by the pure-Python reference below)."""
    assert parameter_key("w") == 9108506241023605964
    p = projection_matrix(
        2, 3, seed=0, key=parameter_key("w"), window=0, dtype=torch.float64, generator=1
    )
    expected = torch.tensor(
        [
            [-0.6214874682, 1.1319275423, -0.4819477915],
            [0.8420405867, -0.5203269762, -0.3078044474],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "change",
    [dict(seed=4), dict(key=parameter_key("other")), dict(window=3), dict(stream="accumulation")],
)
def test_each_input_gives_an_independent_matrix(change):
    base = dict(seed=3, key=KEY, window=2, stream="momentum")
    a = projection_matrix(16, 512, **base).flatten()
    b = projection_matrix(16, 512, **{**base, **change}).flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 4 / (a.numel() ** 0.5)  # ~4 sigma for independent entries


@pytest.mark.parametrize("rank", [4, 32])
def test_gaussian_entries_have_variance_one_over_rank(rank):
    p = projection_matrix(rank, 4096, seed=0, key=KEY, window=0, dtype=torch.float64)
    n = p.numel()
    assert abs(p.mean().item()) < 4 / (rank * n) ** 0.5
    assert abs(p.var().item() * rank - 1) < 4 * (2 / n) ** 0.5
    z = (p * rank**0.5).abs()
    assert abs((z < 1).double().mean().item() - 0.682689) < 0.02  # normal, not uniform


def test_rademacher_entries():
    p = projection_matrix(8, 1000, seed=0, key=KEY, window=0, distribution="rademacher")
    assert set((p * 8**0.5).round().unique().tolist()) == {-1.0, 1.0}
    assert abs(p.mean().item()) < 4 / (8000**0.5 * 8**0.5)


def test_unbiased_reconstruction_converges_at_one_over_sqrt_n():
    g = torch.randn(24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def mean_error(n):
        acc = torch.zeros_like(g)
        for w in range(n):
            p = projection_matrix(4, 24, seed=0, key=KEY, window=w, dtype=torch.float64)
            acc += up(down(g, p, "left"), p, "left")
        return ((acc / n - g).norm() / g.norm()).item()

    e100, e1600 = mean_error(100), mean_error(1600)
    assert e1600 < 0.25
    assert 2.5 < e100 / e1600 < 6.5  # ratio 4 expected for 1/sqrt(N)


def test_single_draw_error_shrinks_like_one_over_sqrt_rank():
    """Theorem 2.4: (P^T P)_ij - delta_ij has spread ~ 1/sqrt(r) (off-diagonal variance 1/r)."""
    spreads = {}
    for rank in (8, 128):
        offdiag = []
        for w in range(20):
            p = projection_matrix(rank, 64, seed=1, key=KEY, window=w, dtype=torch.float64)
            m = p.T @ p
            offdiag.append(m[~torch.eye(64, dtype=torch.bool)])
        spreads[rank] = torch.cat(offdiag).var().item()
    assert abs(spreads[8] * 8 - 1) < 0.1
    assert abs(spreads[128] * 128 - 1) < 0.1


def test_float32_is_float64_rounded_once():
    """v1: one float64 computation, rounded once; v2: float32 arithmetic for float32, equal
    to the float64 matrix to float32 accuracy (the integer-exact families bit for bit)."""
    kw = dict(seed=5, key=KEY, window=1)
    p64 = projection_matrix(8, 300, dtype=torch.float64, generator=1, **kw)
    p32 = projection_matrix(8, 300, dtype=torch.float32, generator=1, **kw)
    assert torch.equal(p32, p64.to(torch.float32))
    for distribution in ("gaussian", "orthonormal", "rademacher", "coordinates"):
        p64 = projection_matrix(8, 300, dtype=torch.float64, distribution=distribution, **kw)
        p32 = projection_matrix(8, 300, dtype=torch.float32, distribution=distribution, **kw)
        if distribution in ("rademacher", "coordinates"):
            assert torch.equal(p32, p64.to(torch.float32)), distribution
        else:
            torch.testing.assert_close(p32.double(), p64, rtol=0, atol=2e-6)


# ---------------------------------------------------------------- generator v2 (Philox)
def test_v2_entries_are_the_reference_words_through_the_stated_transforms():
    """The golden values of v2, derived here: the stream's words from the pure-Python
    Philox, then the Box-Muller, sign and sort transforms of the module docstring."""
    import hashlib
    import math

    rank, dim, key = 3, 10, parameter_key("w")

    def words(distribution, blocks):
        text = f"flora-projection/v2|0|{key}|0|momentum|{distribution}".encode()
        digest = hashlib.blake2b(text, digest_size=20).digest()
        c1, c2, c3, k0, k1 = (int.from_bytes(digest[i : i + 4], "little") for i in range(0, 20, 4))
        return [philox_python((c, c1, c2, c3), (k0, k1)) for c in range(blocks)]

    def uniform(w):
        return (2 * (w >> 9) + 1) / 2**24

    normals = []
    for w in words("gaussian", (rank * dim + 3) // 4):
        for a, b in ((w[0], w[1]), (w[2], w[3])):
            radius = math.sqrt(-2 * math.log(uniform(a)))
            normals += [radius * math.cos(2 * math.pi * uniform(b)),
                        radius * math.sin(2 * math.pi * uniform(b))]  # fmt: skip
    expected = torch.tensor(normals[: rank * dim], dtype=torch.float64).view(rank, dim)
    expected /= math.sqrt(rank)
    kw = dict(seed=0, key=key, window=0)
    p = projection_matrix(rank, dim, **kw)
    torch.testing.assert_close(p.double(), expected, rtol=0, atol=2e-6)
    signs = [1 - 2 * (x >> 31) for w in words("rademacher", (rank * dim + 3) // 4) for x in w]
    expected = torch.tensor(signs[: rank * dim], dtype=torch.float32).view(rank, dim)
    p = projection_matrix(rank, dim, distribution="rademacher", **kw)
    assert torch.equal(p, expected * torch.tensor(1 / math.sqrt(rank), dtype=torch.float32))
    sort_keys = [(w[0] << 31) | (w[1] >> 1) for w in words("coordinates", dim)]
    chosen = sorted(sorted(range(dim), key=lambda j: sort_keys[j])[:rank])
    p = projection_matrix(rank, dim, distribution="coordinates", **kw)
    assert p.nonzero()[:, 1].tolist() == chosen


@pytest.mark.parametrize("distribution", ["gaussian", "orthonormal", "rademacher", "coordinates"])
def test_v2_uses_no_float64(distribution):
    """Every op of a float32 v2 projection (and of the range finder) avoids float64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[torch.dtype] = set()

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    seen.add(t.dtype)
            return out

    x = torch.randn(40, 24)
    with Dtypes():
        projection_matrix(8, 64, seed=1, key=KEY, window=0, distribution=distribution)
        range_basis(x, 4, "left", seed=1, key=KEY, window=0)
    assert torch.float64 not in seen and GENERATOR == 2


def _marchenko_pastur_ks(p):
    """Kolmogorov-Smirnov distance of the spectrum of (r/d) P P^T (unit-variance entries)
    to the Marchenko-Pastur law of ratio r/d."""
    import math

    rank, dim = p.shape
    y = rank / dim
    eig = torch.linalg.eigvalsh((p.double() @ p.double().T) * (rank / dim)).sort().values
    lo, hi = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    grid = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    density = torch.sqrt(((hi - grid) * (grid - lo)).clamp(min=0)) / (2 * math.pi * y * grid)
    cdf = torch.cumsum(density, 0) * (grid[1] - grid[0])
    cdf /= cdf[-1].clone()
    model = torch.from_numpy(__import__("numpy").interp(eig.numpy(), grid.numpy(), cdf.numpy()))
    empirical = torch.arange(1, rank + 1, dtype=torch.float64) / rank
    return (model - empirical).abs().max().item(), eig[0].item(), eig[-1].item(), lo, hi


def test_gaussian_spectrum_follows_marchenko_pastur():
    """The quality gate of a generator: P P^T's eigenvalues fill the Marchenko-Pastur
    support with its density. A one-round Philox, whose words repeat across counters,
    fails the same test by far."""
    p = projection_matrix(128, 1024, seed=3, key=KEY, window=0)
    ks, first, last, lo, hi = _marchenko_pastur_ks(p)
    assert ks < 0.05
    assert lo - 0.05 < first and last < hi + 0.1
    weak = philox4x32(torch.arange(128 * 1024 // 4), 1, 2, 3, 4, 5, rounds=1)
    bad = gaussian_from_words(weak, 128 * 1024, torch.float32).view(128, 1024) / 128**0.5
    assert _marchenko_pastur_ks(bad)[0] > 0.2


def test_prefix_property_fixed_by_element_index():
    """Entry (i, j) depends on the flat index only: a wider matrix starts like a narrower one."""
    a = projection_matrix(1, 10, seed=0, key=KEY, window=0)
    b = projection_matrix(1, 20, seed=0, key=KEY, window=0)
    assert torch.equal(a[0], b[0, :10])


@pytest.mark.gpu
def test_cuda_equals_cpu():
    cpu = projection_matrix(64, 3000, seed=7, key=KEY, window=9)
    gpu = projection_matrix(64, 3000, seed=7, key=KEY, window=9, device="cuda")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-6)
    assert (gpu.cpu() != cpu).float().mean().item() < 1e-4


def test_down_up_transfer_shapes_and_definitions():
    g = torch.randn(6, 10, dtype=torch.float64)
    pl = projection_matrix(3, 6, seed=0, key=1, window=0, dtype=torch.float64)
    pr = projection_matrix(3, 10, seed=0, key=2, window=0, dtype=torch.float64)
    assert down(g, pl, "left").shape == (3, 10) and up(down(g, pl, "left"), pl, "left").shape == (
        6,
        10,
    )
    assert down(g, pr, "right").shape == (6, 3) and up(down(g, pr, "right"), pr, "right").shape == (
        6,
        10,
    )
    torch.testing.assert_close(down(g, pl, "left"), pl @ g)
    torch.testing.assert_close(down(g, pr, "right"), g @ pr.T)
    for side, p in (("left", pl), ("right", pr)):
        q = projection_matrix(3, p.shape[1], seed=0, key=9, window=1, dtype=torch.float64)
        c = down(g, p, side)
        torch.testing.assert_close(transfer(c, p, q, side), down(up(c, p, side), q, side))


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        (dict(rank=0), ValueError),
        (dict(rank=2.0), TypeError),
        (dict(dim=-1), ValueError),
        (dict(window=-1), ValueError),
        (dict(seed=None), TypeError),
        (dict(distribution="cauchy"), ValueError),
    ],
)
def test_bad_arguments(kwargs, exc):
    args = dict(rank=2, dim=4, seed=0, key=1, window=0) | kwargs
    with pytest.raises(exc, match=next(iter(kwargs))):
        projection_matrix(**args)


def test_bad_side_and_key():
    with pytest.raises(ValueError, match="side"):
        down(torch.zeros(2, 2), torch.zeros(1, 2), "middle")
    with pytest.raises(TypeError, match="name_or_position"):
        parameter_key(1.5)


def test_orthonormal_rows_are_exactly_orthogonal_and_unbiased():
    def p(window, rank=4, dim=16):
        return projection_matrix(rank, dim, seed=0, key=KEY, window=window,
                                 distribution="orthonormal", dtype=torch.float64)  # fmt: skip

    a = p(0)
    torch.testing.assert_close(a @ a.T, 4.0 * torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(a, p(0)) and not torch.allclose(a, p(1))
    single = projection_matrix(4, 16, seed=0, key=KEY, window=0, distribution="orthonormal")
    assert single.dtype == torch.float32  # its own float32 QR: orthonormal to float32
    torch.testing.assert_close(single.double(), a, rtol=0, atol=2e-6)
    torch.testing.assert_close(single @ single.T, 4.0 * torch.eye(4), rtol=0, atol=2e-6)
    # E[P^T P] = I over windows (deterministic here: 400 seeded windows, max entry deviation
    # 0.077; a wrong scale would be off by 3 on the diagonal)
    mean = sum(p(w).T @ p(w) for w in range(400)) / 400
    assert (mean - torch.eye(16, dtype=torch.float64)).abs().max() < 0.2
    with pytest.raises(ValueError, match="rank <= dim"):
        projection_matrix(8, 4, seed=0, key=KEY, window=0, distribution="orthonormal")


def test_coordinate_rows_select_distinct_coordinates():
    def p(window, rank=5, dim=16):
        return projection_matrix(rank, dim, seed=0, key=KEY, window=window,
                                 distribution="coordinates", dtype=torch.float64)  # fmt: skip

    a = p(0)
    nonzero = a.nonzero()
    assert nonzero.shape == (5, 2) and nonzero[:, 0].tolist() == [0, 1, 2, 3, 4]
    cols = nonzero[:, 1].tolist()
    assert cols == sorted(set(cols))  # distinct, increasing
    assert torch.all(a[a != 0] == (16 / 5) ** 0.5)
    torch.testing.assert_close(a @ a.T, (16 / 5) * torch.eye(5, dtype=torch.float64))
    assert torch.equal(a, p(0)) and not torch.equal(a, p(1))
    # every coordinate is chosen with probability r/d, so E[P^T P] = I
    counts = sum((p(w) != 0).sum(dim=0) for w in range(800)).double() / 800
    assert (counts - 5 / 16).abs().max() < 0.06  # 4 sigma of a binomial(800, 5/16) mean
    full = p(0, rank=16)
    assert torch.equal(full, torch.eye(16, dtype=torch.float64))


# ---------------------------------------------------------------- gradient basis (range finder)
def _projector(basis):
    return (basis.shape[0] / basis.shape[1]) * basis.T @ basis


@pytest.mark.parametrize("side", ["left", "right"])
def test_range_basis_is_exact_on_a_low_rank_matrix(side):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 50, generator=g, dtype=torch.float64
    )  # rank 6 <= k = 2r = 8
    basis = range_basis(x, 4, side, seed=0, key=KEY, window=0)
    a = x if side == "left" else x.T
    u = torch.linalg.svd(a, full_matrices=False).U[:, :4]
    assert basis.shape == (4, a.shape[0])
    assert torch.allclose(basis @ basis.T, torch.eye(4, dtype=torch.float64) * a.shape[0] / 4)
    assert (_projector(basis) - u @ u.T).abs().max() < 1e-10


def test_range_basis_power_iteration_sharpens_a_flat_tail():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(128, 64, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.full((4,), 10.0), torch.ones(60)]).double()
    x = u @ torch.diag(spectrum) @ v.T
    exact = u[:, :4] @ u[:, :4].T
    errors = [
        (_projector(range_basis(x, 4, "left", seed=0, key=KEY, window=0, power_iterations=q))
         - exact).norm().item()
        for q in (0, 1, 2)
    ]  # fmt: skip
    assert errors[0] > errors[1] > errors[2]


def test_range_basis_depends_on_the_sketch_keys_only_through_accuracy():
    x = torch.randn(20, 3, dtype=torch.float64) @ torch.randn(3, 40, dtype=torch.float64)
    a = range_basis(x, 3, "left", seed=0, key=KEY, window=0)
    b = range_basis(x, 3, "left", seed=5, key=KEY, window=2)
    assert not torch.equal(a, b)  # another sketch ...
    assert (_projector(a) - _projector(b)).abs().max() < 1e-10  # ... the same subspace
    assert torch.equal(a, range_basis(x, 3, "left", seed=0, key=KEY, window=0))


def test_sign_matrix_is_the_stream_bits_least_significant_first():
    """The golden values of sign_matrix, derived here: bit e % 32 of word e // 32 of the
    pure-Python Philox stream, as 1 - 2 b, scaled by 1 / sqrt(rows)."""
    import hashlib
    import math

    rows, cols = 5, 13  # 65 entries: three words, the last one partly used
    text = f"flora-signs/v1|3|{KEY}|2|test/sketch".encode()
    digest = hashlib.blake2b(text, digest_size=20).digest()
    c1, c2, c3, k0, k1 = (int.from_bytes(digest[i : i + 4], "little") for i in range(0, 20, 4))
    words = [w for c in range(1) for w in philox_python((c, c1, c2, c3), (k0, k1))]
    bits = [(w >> b) & 1 for w in words[:3] for b in range(32)][: rows * cols]
    expected = torch.tensor([1.0 - 2 * b for b in bits]).view(rows, cols) / math.sqrt(rows)
    s = sign_matrix(rows, cols, seed=3, key=KEY, window=2, stream="test/sketch")
    assert torch.equal(s, expected)
    assert s.dtype == torch.float32
    wide = sign_matrix(rows, cols, seed=3, key=KEY, window=2, stream="test/sketch",
                       dtype=torch.float64)  # fmt: skip
    assert torch.equal(wide.float(), s)
    other = sign_matrix(rows, cols, seed=3, key=KEY, window=3, stream="test/sketch")
    assert not torch.equal(other, s)
    big = sign_matrix(64, 1000, seed=0, key=KEY, window=0, stream="test/sketch") * 8
    assert set(big.unique().tolist()) == {-1.0, 1.0}
    assert abs(big.mean().item()) < 0.02  # 64,000 fair signs: sd of the mean 0.004
    with pytest.raises(ValueError, match="window"):
        sign_matrix(2, 2, seed=0, key=KEY, window=-1, stream="x")


def test_range_basis_of_zero_is_still_orthonormal():
    basis = range_basis(torch.zeros(7, 5), 3, "left", seed=0, key=KEY, window=0)
    assert torch.allclose(basis @ basis.T, torch.eye(3) * 7 / 3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(rank=9), ValueError, "rank <= dim"),
        (dict(side="up"), ValueError, "side"),
        (dict(power_iterations=-1), ValueError, "power_iterations"),
        (dict(power_iterations=1.0), TypeError, "power_iterations"),
        (dict(x=torch.zeros(3, 4, 5)), ValueError, "matrix"),
        (dict(x=torch.zeros(8, 4, dtype=torch.int64)), TypeError, "floating"),
        (dict(shard=(0, 16, lambda t: None)), ValueError, "right side"),
    ],
)
def test_range_basis_bad_arguments(kwargs, exc, match):
    args = {"x": torch.randn(8, 12), "rank": 3, "side": "left", **kwargs}
    with pytest.raises(exc, match=match):
        range_basis(args.pop("x"), args.pop("rank"), args.pop("side"), seed=0, key=KEY,
                    window=0, **args)  # fmt: skip


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "orthonormal", "coordinates"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_matrices_stack_projection_matrix(distribution, dtype):
    keys, windows = [KEY, parameter_key("b"), 7], [0, 3, 1]
    stack = projection_matrices(
        5, 33, seed=2, keys=keys, windows=windows, distribution=distribution, dtype=dtype
    )
    assert stack.shape == (3, 5, 33) and stack.dtype == dtype
    for b, (key, window) in enumerate(zip(keys, windows, strict=True)):
        one = projection_matrix(
            5, 33, seed=2, key=key, window=window, distribution=distribution, dtype=dtype
        )
        if distribution == "orthonormal":  # a batched QR: the same to rounding
            tol = 1e-6 if dtype == torch.float32 else 1e-14
            torch.testing.assert_close(stack[b], one, rtol=0, atol=tol)
        else:  # the same words through the same elementwise transform
            assert torch.equal(stack[b], one)


def test_projection_matrices_bad_arguments():
    with pytest.raises(ValueError, match="keys and windows"):
        projection_matrices(2, 4, seed=0, keys=[1, 2], windows=[0])
    with pytest.raises(ValueError, match="rank <= dim"):
        projection_matrices(5, 4, seed=0, keys=[1], windows=[0], distribution="orthonormal")
    with pytest.raises(ValueError, match="distribution"):
        projection_matrices(2, 4, seed=0, keys=[1], windows=[0], distribution="uniform")


def test_sketch_sizes_fill_the_buffer():
    assert sketch_sizes(48, 384, 384) == (15, 31)  # square: k = (r - 1) / 3, l = 2k + 1
    assert sketch_sizes(48, 1536, 384) == (31, 63)  # a tall matrix affords a larger k
    for rank, kept, dim in [(48, 384, 384), (48, 1536, 384), (4, 5, 5), (32, 768, 3072)]:
        k, l_ = sketch_sizes(rank, kept, dim)
        assert k * kept + l_ * dim <= rank * kept < (k + 1) * kept + (l_ + 2) * dim
    assert sketch_sizes(64, 8, 8) == (8, 8)  # capped: an exact sketch of a small matrix
    with pytest.raises(ValueError, match="rank must be >= 4"):
        sketch_sizes(3, 10, 10)
    with pytest.raises(TypeError, match="rank"):
        sketch_sizes(4.0, 10, 10)


def test_sketch_reconstruct_is_exact_at_low_rank_and_zero_for_zero():
    torch.manual_seed(0)
    o, d, k, l_ = 30, 20, 4, 9
    omega = torch.randn(k, d, dtype=torch.float64)
    psi = torch.randn(l_, o, dtype=torch.float64)
    for true_rank in (1, 3, 4):  # rank-deficient Y (1, 3) still gives an orthonormal Q
        a = torch.randn(o, true_rank, dtype=torch.float64) @ torch.randn(
            true_rank, d, dtype=torch.float64
        )
        approx = sketch_reconstruct(a @ omega.T, psi @ a, psi)
        torch.testing.assert_close(approx, a, rtol=1e-9, atol=1e-9)
    zero = torch.zeros(o, d, dtype=torch.float64)
    assert torch.equal(sketch_reconstruct(zero @ omega.T, psi @ zero, psi), zero)
    full = torch.randn(o, d, dtype=torch.float64)  # rank 20 > k: an approximation of rank k
    assert torch.linalg.matrix_rank(sketch_reconstruct(full @ omega.T, psi @ full, psi)) == k
