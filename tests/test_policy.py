"""The compress-or-not policy (flora.policy) and how the optimizers report it.

- vectors keep ordinary state; matrices compress the smaller dimension; N-d tensors are
  viewed as (shape[0], prod(shape[1:])); embeddings and heads are compressed unless excluded;
- a rank >= the compressed dimension is reported (plan + warning), never silently applied;
- a configuration compressing nothing warns; per-group rank/compress overrides apply;
- the printed plan lists every parameter with its reason.
"""

import pytest
import torch

import flora
from flora.policy import compile_patterns, decide, matrix_shape


def test_rules():
    assert not decide("b", (10,), rank=4).compressed
    d = decide("w", (48, 64), rank=8)
    assert d.compressed and d.side == "left" and d.state_shape == (8, 64) and d.compressed_dim == 48
    assert d.kept_dim == 64  # the state's other dimension
    d = decide("emb", (50257, 768), rank=32)
    assert d.compressed and d.side == "right" and d.state_shape == (50257, 32)
    assert (d.compressed_dim, d.kept_dim) == (768, 50257)
    d = decide("conv", (16, 3, 5, 5), rank=8)
    assert d.matrix_shape == (16, 75) and d.side == "left" and d.state_shape == (8, 75)
    assert decide("w", (48, 64), rank=8, side="right").state_shape == (48, 8)
    small = decide("w", (6, 64), rank=8)
    assert not small.compressed and "rank 8 >= compressed dim 6" in small.reason
    assert small.kept_dim is None and small.compressed_dim is None
    assert not decide("w", (48, 64), rank=8, compress=False).compressed
    ex = decide("lm_head.weight", (100, 64), rank=8, exclude=(r"lm_head",))
    assert not ex.compressed and "lm_head" in ex.reason
    assert matrix_shape((3,)) is None


def test_bad_patterns_and_sides():
    with pytest.raises(ValueError, match="exclude"):
        compile_patterns("[")
    with pytest.raises(ValueError, match="side"):
        decide("w", (4, 4), rank=1, side="up")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(300, 32)
        self.conv = torch.nn.Conv1d(32, 32, 3)
        self.proj = torch.nn.Linear(32, 64)
        self.tiny = torch.nn.Linear(64, 4)
        self.norm = torch.nn.LayerNorm(64)
        self.head = torch.nn.Linear(64, 300, bias=False)


def test_plan_lists_every_parameter_with_a_reason():
    net = Net()
    with pytest.warns(UserWarning, match="tiny.weight"):
        opt = flora.Flora(net.named_parameters(), rank=8, exclude=[r"^head\."])
    plan = opt.plan()
    rows = {r.name: r for r in plan.rows}
    assert [r.name for r in plan.rows] == [n for n, _ in net.named_parameters()]
    assert rows["emb.weight"].compressed and rows["emb.weight"].side == "right"
    assert rows["conv.weight"].compressed and rows["proj.weight"].compressed
    assert (
        not rows["tiny.weight"].compressed
        and "rank 8 >= compressed dim 4" in rows["tiny.weight"].reason
    )
    assert not rows["head.weight"].compressed and "excluded" in rows["head.weight"].reason
    assert not rows["norm.weight"].compressed
    text = str(plan)
    for name in rows:
        assert name in text
    assert "total state" in text and "vs torch AdamW" in text


def test_group_overrides():
    net = Net()
    groups = [
        {"params": [(f"proj.{n}", p) for n, p in net.proj.named_parameters()], "rank": 4},
        {"params": [(f"conv.{n}", p) for n, p in net.conv.named_parameters()], "compress": False},
        {"params": [(f"emb.{n}", p) for n, p in net.emb.named_parameters()]},
    ]
    opt = flora.FloraAdamW(groups, rank=16)
    rows = {r.name: r for r in opt.plan().rows}
    assert rows["proj.weight"].rank == 4
    assert not rows["conv.weight"].compressed and "compress=False" in rows["conv.weight"].reason
    assert rows["emb.weight"].rank == 16


def test_nothing_compressed_warns():
    with pytest.warns(UserWarning, match="no parameter is compressed"):
        flora.Flora(torch.nn.Linear(8, 8).named_parameters(), rank=8)


def test_beta1_zero_has_no_momentum_to_compress():
    opt = flora.Flora(Net().named_parameters(), rank=8, beta1=0.0)
    assert opt.plan().compressed_count == 0
    assert all("beta1=0" in r.reason for r in opt.plan().rows)
