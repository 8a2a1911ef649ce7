"""Against the official implementation (``flora_opt.Flora``, flora-opt 0.0.3): same
initial weights and gradients, our ``Flora`` follows the same trajectory — with full-size
momentum, and with compressed momentum once both are handed the same projections."""

import math

import pytest
import torch

import flora
import flora.optim.base as base

flora_opt = pytest.importorskip("flora_opt", exc_type=ImportError)
official_module = pytest.importorskip("flora_opt.optimizers.torch.flora", exc_type=ImportError)


def _model():
    torch.manual_seed(0)
    # non-square matrices (16x48, 48x16, 32x48), so that both compress the same side
    return torch.nn.Sequential(
        torch.nn.Linear(48, 16), torch.nn.Tanh(), torch.nn.Linear(16, 48), torch.nn.Tanh(),
        torch.nn.Linear(48, 32),
    ).double()  # fmt: skip


def _train(model, opt, steps=30):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 48, generator=g, dtype=torch.float64)
        y = torch.randn(8, 32, generator=g, dtype=torch.float64)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _assert_same(ours, theirs):
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_full_size_momentum_equals_official():
    ours, theirs = _model(), _model()
    # eps1 = 1e-15 floors V at 1e-30, where flora-opt adds 1e-30 to G^2
    _train(ours, flora.Flora(ours.named_parameters(), lr=0.05, compress=False, eps=(1e-15, 1e-3)))
    _train(theirs, flora_opt.Flora(theirs.parameters(), lr=0.05, rank=None, beta1=0.9))
    _assert_same(ours, theirs)


def _shared_matrix(rows, cols, dtype, window):
    g = torch.Generator().manual_seed(rows * 1009 + cols + 100_003 * window)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)


def _official_windows(first_seed, params, windows):
    """flora-opt's seed chain: parameter i starts at seed first_seed + i + 1, each window
    change moves to next_seed(seed), and a projection is drawn from split_seed(seed)."""
    window_of = {}
    for i in range(params):
        seed = first_seed + i + 1
        for w in range(windows):
            for half in official_module.split_seed(seed):
                window_of[half] = w
            seed = official_module.next_seed(seed)
    return window_of


@pytest.mark.parametrize("kappa", [1000, 7])  # 7: four window changes in 30 steps
def test_compressed_momentum_equals_official_given_the_same_projections(monkeypatch, kappa):
    window_of = _official_windows(0, 6, 6)

    def ours_projection(rank, dim, *, dtype, window, **_):  # (rank, dim), N(0, 1/rank)
        return _shared_matrix(rank, dim, dtype, window) / math.sqrt(rank)

    def official_randn(shape, seed, device=None, dtype=torch.float32):  # before its / sqrt(r)
        a, b = shape  # left: (rank, m); right: (n, rank), used as P^T
        w = window_of[seed]
        return _shared_matrix(a, b, dtype, w) if a < b else _shared_matrix(b, a, dtype, w).T

    monkeypatch.setattr(base, "projection_matrix", ours_projection)
    monkeypatch.setattr(official_module, "stable_randn", official_randn)
    ours, theirs = _model(), _model()
    opt = flora.Flora(
        ours.named_parameters(), lr=0.05, rank=4, kappa=kappa, eps=(1e-15, 1e-3),
        momentum_variant="history", distribution="gaussian",  # flora-opt's form
    )  # fmt: skip
    _train(ours, opt)
    _train(theirs, flora_opt.Flora(theirs.parameters(), lr=0.05, rank=4, kappa=kappa, beta1=0.9))
    assert opt.state[ours[4].weight]["exp_avg"].shape == (4, 48)  # compressed, left
    assert opt.state[ours[2].weight]["exp_avg"].shape == (48, 4)  # compressed, right
    assert opt.state[ours[4].weight]["window"] == (4 if kappa == 7 else 0)
    _assert_same(ours, theirs)
