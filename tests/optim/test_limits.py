"""Compression off, the optimizers are exactly the torch ones.

- ``Flora(beta1=0)`` == ``torch.optim.Adafactor`` (bitwise, float32, CPU, 25 steps), with
  and without weight decay;
- ``FloraAdamW(compress=False)`` == ``torch.optim.AdamW`` (bitwise, foreach or not), and so is
  FloraAdamW when the policy compresses nothing (rank >= every dimension);
- ``Flora(compress=False)`` keeps naive momentum: with ``beta1`` it is not Adafactor.
"""

import copy

import pytest
import torch

import flora


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 32),
        torch.nn.LayerNorm(32),
        torch.nn.Linear(32, 32),  # two matrices of one shape: foreach would stack them
        torch.nn.Linear(32, 32),
        torch.nn.Linear(32, 10),
    )


def _train(model, opt, steps=25):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_flora_without_momentum_is_torch_adafactor(weight_decay):
    # torch's foreach Adafactor differs from its own single-tensor path by a few ulps after
    # 25 steps; the single-tensor path (the CPU default) is the one matched bit for bit.
    m1, m2 = _model(), _model()
    ours = _train(
        m1, flora.Flora(m1.named_parameters(), lr=0.02, beta1=0.0, weight_decay=weight_decay)
    )
    ref = torch.optim.Adafactor(m2.parameters(), lr=0.02, weight_decay=weight_decay, foreach=False)
    _assert_bitwise(ours, _train(m2, ref))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True])
def test_flora_adamw_uncompressed_is_torch_adamw(weight_decay, foreach):
    m1, m2 = _model(), _model()
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay)
    ours = _train(m1, flora.FloraAdamW(m1.named_parameters(), compress=False, **kw))
    _assert_bitwise(ours, _train(m2, torch.optim.AdamW(m2.parameters(), foreach=foreach, **kw)))


def test_flora_adamw_compressing_nothing_is_torch_adamw():
    m1, m2 = _model(), _model()
    with pytest.warns(UserWarning, match="no parameter is compressed"):
        opt = flora.FloraAdamW(m1.named_parameters(), lr=1e-3, rank=4096)
    _assert_bitwise(_train(m1, opt), _train(m2, torch.optim.AdamW(m2.parameters(), lr=1e-3)))


def test_flora_adamw_beta1_zero_is_torch_adamw_beta1_zero():
    m1, m2 = _model(), _model()
    ours = _train(m1, flora.FloraAdamW(m1.named_parameters(), betas=(0.0, 0.99), rank=2))
    ref = torch.optim.AdamW(m2.parameters(), betas=(0.0, 0.99))
    _assert_bitwise(ours, _train(m2, ref))


def test_compressed_momentum_changes_the_trajectory():
    """Sanity: with momentum on, Flora is neither Adafactor nor naive momentum."""
    base = _model()
    runs = {}
    for name, kw in {
        "adafactor": dict(beta1=0.0),
        "naive": dict(beta1=0.9, compress=False),
        "flora": dict(beta1=0.9, rank=4),
    }.items():
        m = copy.deepcopy(base)
        runs[name] = _train(m, flora.Flora(m.named_parameters(), lr=0.02, **kw), steps=5)
    for a, b in [("adafactor", "naive"), ("naive", "flora"), ("adafactor", "flora")]:
        assert not all(torch.equal(x, y) for x, y in zip(runs[a], runs[b], strict=True)), (a, b)
