"""Exact optimizer-state bytes as a function of shape and rank.

The hand formula (fp32 state, 4 bytes an element; the gradient basis bf16, 2 bytes), for a
weight m x n compressed on the left (m <= n) with rank r, is, with the defaults:
Flora = (m + n) Adafactor factors + r*n momentum + r*m gradient basis; FloraAdamW = 2*r*n
(both moments in the subspace) + 1 (the limiter's norm). With a seed-only projection Flora
drops the r*m basis; FloraAdamW's elementwise form holds m*n second moment + r*n momentum
(factored: m + n + r*n). Biases keep a full second moment (+ full momentum). FloraSGD and
FloraLion hold one buffer: r*n (+ r*m basis) per compressed matrix. The real state after
a step, the plan, and the formula agree.
"""

import pytest
import torch

import flora


def _stepped(opt_cls, model, **kw):
    opt = opt_cls(model.named_parameters(), **kw)
    model(torch.randn(2, 96)).sum().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("rank", [1, 8, 40])
def test_flora_bytes(rank):
    model = torch.nn.Linear(96, 48)  # weight (48, 96): left side, momentum (r, 96)
    opt = _stepped(flora.Flora, model, rank=rank)
    weight = (48 + 96) + rank * 96
    bias = 48 + 48  # variance + full momentum
    basis = 2 * rank * 48  # bf16
    assert opt.state_bytes() == 4 * (weight + bias) + basis == opt.plan().state_bytes
    assert opt.plan().uncompressed_bytes == 4 * ((48 + 96) + 48 * 96 + bias)
    seeded = _stepped(flora.Flora, torch.nn.Linear(96, 48), rank=rank, distribution="gaussian")
    assert seeded.state_bytes() == 4 * (weight + bias) == seeded.plan().state_bytes
    assert opt.plan().adamw_bytes == 4 * 2 * (48 * 96 + 48)


@pytest.mark.parametrize("rank", [1, 8, 40])
@pytest.mark.parametrize("factored", [False, True])
def test_flora_adamw_bytes(rank, factored):
    model = torch.nn.Linear(96, 48)
    opt = _stepped(
        flora.FloraAdamW, model, rank=rank, factor_second_moment=factored,
        preconditioner="elementwise",
    )  # fmt: skip
    second = (48 + 96) if factored else 48 * 96
    assert opt.state_bytes() == 4 * (second + rank * 96 + 48 + 48) == opt.plan().state_bytes
    default = _stepped(flora.FloraAdamW, torch.nn.Linear(96, 48), rank=rank)
    subspace = 2 * rank * 96 + 1  # both moments (r, 96) and the limiter's norm
    assert default.state_bytes() == 4 * (subspace + 48 + 48) == default.plan().state_bytes


@pytest.mark.parametrize("opt_cls", [flora.Flora, flora.FloraAdamW])
def test_gradient_basis_adds_r_times_d(opt_cls):
    model = torch.nn.Linear(96, 48)  # left side: basis (r, 48) beside momentum (r, 96)
    base = _stepped(opt_cls, model, rank=8, distribution="orthonormal").state_bytes()
    opt = _stepped(
        opt_cls, torch.nn.Linear(96, 48), rank=8, distribution="gradient", basis_dtype=None
    )
    assert opt.state_bytes() == base + 4 * 8 * 48 == opt.plan().state_bytes
    half = _stepped(opt_cls, torch.nn.Linear(96, 48), rank=8, distribution="gradient")
    assert half.state_bytes() == base + 2 * 8 * 48 == half.plan().state_bytes  # bf16 default


@pytest.mark.parametrize("distribution,basis", [("orthonormal", 0), ("gradient", 8 * 48)])
def test_subspace_preconditioner_bytes(distribution, basis):
    model = torch.nn.Linear(96, 48)  # left: exp_avg and exp_avg_sq (8, 96), residual norm
    opt = _stepped(
        flora.FloraAdamW, model, rank=8, preconditioner="subspace", distribution=distribution
    )
    weight = 2 * 8 * 96 + 1
    bias = 48 + 48  # elementwise AdamW
    assert opt.state_bytes() == 4 * (weight + bias) + 2 * basis == opt.plan().state_bytes


def test_right_side_and_nd_bytes():
    model = torch.nn.Sequential(torch.nn.Embedding(1000, 16), torch.nn.Conv1d(16, 12, 5))
    opt = flora.Flora(model.named_parameters(), rank=4, distribution="gaussian")
    x = torch.randint(0, 1000, (2, 20))
    model[1](model[0](x).transpose(1, 2)).sum().backward()
    opt.step()
    emb = (1000 + 16) + 1000 * 4  # right side: (1000, r)
    conv = (12 * 16 + 12 * 5) + 4 * 80  # Adafactor factors over the last two dims; view (12, 80)
    bias = 12 + 12
    assert opt.state_bytes() == 4 * (emb + conv + bias) == opt.plan().state_bytes


def test_bf16_params_count_fp32_state():
    model = torch.nn.Linear(96, 48).to(torch.bfloat16)
    opt = flora.Flora(model.named_parameters(), rank=8)
    model(torch.randn(2, 96, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    expected = 4 * ((48 + 96) + 8 * 96 + 96) + 2 * 8 * 48  # the basis bf16
    assert opt.state_bytes() == expected == opt.plan().state_bytes


def test_flora_linear_memory_base_bytes():
    # factor_second_moment=False (Table 4): a full second moment plus the compressed momentum
    model = torch.nn.Linear(96, 48)
    opt = _stepped(flora.Flora, model, rank=8, factor_second_moment=False)
    expected = 4 * (48 * 96 + 8 * 96 + 48 + 48) + 2 * 8 * 48
    assert opt.state_bytes() == expected == opt.plan().state_bytes


@pytest.mark.parametrize("opt_cls", [flora.FloraSGD, flora.FloraLion])
def test_sgd_and_lion_bytes(opt_cls):
    # one compressed buffer (r, 96) and the gradient basis (r, 48); the bias a full buffer
    opt = _stepped(opt_cls, torch.nn.Linear(96, 48), rank=8)
    assert opt.state_bytes() == 4 * (8 * 96 + 48) + 2 * 8 * 48 == opt.plan().state_bytes
    seeded = _stepped(opt_cls, torch.nn.Linear(96, 48), rank=8, distribution="orthonormal")
    assert seeded.state_bytes() == 4 * (8 * 96 + 48) == seeded.plan().state_bytes
    full = _stepped(opt_cls, torch.nn.Linear(96, 48), rank=8, compress=False)
    assert full.state_bytes() == 4 * (48 * 96 + 48) == full.plan().state_bytes
    none = dict(momentum=0.0) if opt_cls is flora.FloraSGD else dict(betas=(0.0, 0.99))
    assert _stepped(opt_cls, torch.nn.Linear(96, 48), **none).state_bytes() == 0
