"""``flora.momentum.compressed_ema_``: the subspace variant's limits and invariants (the
float64 reference over windows is in tests/optim/test_reference.py)."""

import pytest
import torch

from flora.momentum import compressed_ema_
from flora.projection import parameter_key, projection_matrix

D, N = 16, 10  # compressed dimension d (left side: rows), other dimension


def proj(rank, window, distribution="orthonormal"):
    return projection_matrix(rank, D, seed=0, key=parameter_key("w"), window=window,
                             distribution=distribution, dtype=torch.float64)  # fmt: skip


def updates(steps):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(D, N, generator=g, dtype=torch.float64) for _ in range(steps)]


def run(rank, kappa, beta, us, distribution="orthonormal", overwrite=False):
    momentum = torch.zeros(rank, N, dtype=torch.float64)
    out, norms = [], []
    for t, u in enumerate(us):
        window, new = t // kappa, (t // kappa != (t - 1) // kappa) and t > 0
        p_old = proj(rank, window - 1 if new else window, distribution)
        p_next = proj(rank, window, distribution) if new else None
        before = momentum.norm().item()
        d = compressed_ema_(u.clone(), momentum, beta=beta, proj=p_old, proj_next=p_next,
                            side="left", variant="subspace", overwrite=overwrite)  # fmt: skip
        out.append(d)
        norms.append((new, before, momentum.norm().item()))
    return out, momentum, norms


@pytest.mark.parametrize("distribution", ["orthonormal", "coordinates", "gaussian", "rademacher"])
def test_no_momentum_gives_the_update_itself(distribution):
    us = updates(7)
    out, _, _ = run(4, 3, 0.0, us, distribution)
    for d, u in zip(out, us, strict=True):
        torch.testing.assert_close(d, u, rtol=0, atol=1e-12)


@pytest.mark.parametrize("distribution", ["orthonormal", "coordinates"])
def test_full_rank_orthonormal_is_the_full_momentum_across_windows(distribution):
    us = updates(9)
    out, _, _ = run(D, 2, 0.9, us, distribution)  # rank d: P is an orthogonal matrix
    m = torch.zeros(D, N, dtype=torch.float64)
    for d, u in zip(out, us, strict=True):
        m = 0.9 * m + 0.1 * u
        torch.testing.assert_close(d, m, rtol=0, atol=1e-12)


def test_direction_splits_into_subspace_momentum_and_exact_remainder():
    us = updates(5)
    rank = 4
    out, momentum, _ = run(rank, 100, 0.9, us)  # one window
    p = proj(rank, 0)
    c = rank / D
    projector = c * p.T @ p
    torch.testing.assert_close(projector @ projector, projector, rtol=0, atol=1e-12)
    d, u = out[-1], us[-1]
    eye = torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close((eye - projector) @ d, (eye - projector) @ u, rtol=0, atol=1e-12)
    torch.testing.assert_close(projector @ d, c * p.T @ momentum, rtol=0, atol=1e-12)


def test_orthonormal_transfer_never_inflates_the_momentum():
    g = torch.Generator().manual_seed(1)
    zero = torch.zeros(D, N, dtype=torch.float64)
    ratios = {}
    for variant, distribution in (("subspace", "orthonormal"), ("paper", "gaussian")):
        ratios[variant] = []
        for window in range(1, 30):
            momentum = torch.randn(4, N, generator=g, dtype=torch.float64)
            before = momentum.norm().item()
            # beta = 1 and a zero update: only the transfer changes the momentum
            old, new = proj(4, window - 1, distribution), proj(4, window, distribution)
            compressed_ema_(zero.clone(), momentum, beta=1.0, proj=old, proj_next=new,
                            side="left", variant=variant)  # fmt: skip
            ratios[variant].append(momentum.norm().item() / before)
    assert max(ratios["subspace"]) <= 1 + 1e-12  # a projection onto the new subspace
    # the paper's unbiased transfer inflates it on average by about sqrt(1 + (d+1)/r)
    mean_sq = sum(r * r for r in ratios["paper"]) / len(ratios["paper"])
    assert mean_sq > 2.0


def test_overwrite_writes_the_same_direction_in_place():
    us = updates(6)
    a, ma, _ = run(4, 2, 0.9, us, overwrite=False)
    b, mb, _ = run(4, 2, 0.9, us, overwrite=True)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(ma, mb, rtol=0, atol=0)
