"""Moving a run between one device and FSDP2: the side is part of the policy and of the
state. With ``side="right"`` on one device a checkpoint resumes under FSDP2 and back, equal
to uninterrupted training; compressed on another side it is refused: by DCP, whose load
needs every tensor's saved shape to match (a left state is (r, n), a right one (m, r)), and
by ``load_state_dict`` for a ``torch.save`` checkpoint, naming the side
(tests/optim/test_reliability.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from accumulation_models import loss_of, make_batches, make_model
from distributed_workers import (
    DATA_WORLD,
    _dcp_load,
    _dcp_save,
    fsdp2_dcp,
    fsdp2_from_single_device,
    global_batch,
    make_fsdp_optimizer,
    run_workers,
)
from torch.distributed.checkpoint.api import CheckpointException

from flora.policy import decide

pytestmark = pytest.mark.slow  # 2 gloo processes; `make test-fast` skips them

KIND = "flora"


def _single(side, steps):
    model = make_model(dtype=torch.float64)
    opt = make_fsdp_optimizer(KIND, model.named_parameters(), side=side)
    batches = make_batches(6 * DATA_WORLD)
    for step in steps:
        loss_of(model, global_batch(batches, step, 0, 1)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _quiet_dcp(fn, *args):
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        fn(*args)


def test_the_policy_decides_the_sharded_side():
    d = decide("w", (8, 64), rank=4, row_sharded=True)  # auto alone would pick the left
    assert d.side == "right" and "rows sharded" in d.reason
    assert decide("w", (8, 64), rank=4).side == "left"
    with pytest.raises(ValueError, match="side='left' on the row-sharded"):
        decide("w", (8, 64), rank=4, side="left", row_sharded=True)


@pytest.mark.parametrize("side", ["right", "auto"])
def test_single_device_checkpoint_resumes_under_fsdp2(tmp_path, side):
    model, opt = _single(side, range(3))
    _quiet_dcp(_dcp_save, model, opt, str(tmp_path / "single"))
    run_workers(fsdp2_from_single_device, 2, str(tmp_path), KIND)
    if side == "auto":  # conv and head were compressed on the left: refused on every rank
        for r in (0, 1):
            error = torch.load(tmp_path / f"from_single_rank{r}.pt", weights_only=True)["error"]
            assert "Size mismatch" in error and "conv.weight.exp_avg" in error
        return
    result = torch.load(tmp_path / "from_single_rank0.pt", weights_only=True)
    expected, _ = _single("right", range(6))
    for name, p in expected.named_parameters():
        torch.testing.assert_close(result["params"][name], p.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("side", ["right", "auto"])
def test_fsdp2_checkpoint_resumes_on_one_device(tmp_path, side):
    """The saved groups' options are loaded (torch's semantics), so the FSDP2 run must say
    side="right" too: with "auto" its matrices would be compressed on the left on one device."""
    run_workers(fsdp2_dcp, 2, str(tmp_path), "save", KIND, side)  # 3 steps, save, 3 more
    model = make_model(dtype=torch.float64)
    opt = make_fsdp_optimizer(KIND, model.named_parameters(), side="right")
    if side == "auto":
        # refused by load_state_dict, naming the side, or earlier by DCP's shape check (a
        # ValueError inside a CheckpointException), depending on DCP's state in this process
        refusal = r"'conv.weight': momentum compressed on the right|Size mismatch.*conv.weight"
        with pytest.raises((ValueError, CheckpointException), match=refusal):
            _quiet_dcp(_dcp_load, model, opt, str(tmp_path / "dcp_2"))
        return
    _quiet_dcp(_dcp_load, model, opt, str(tmp_path / "dcp_2"))
    batches = make_batches(6 * DATA_WORLD)
    for step in range(3, 6):
        loss_of(model, global_batch(batches, step, 0, 1)).backward()
        opt.step()
        opt.zero_grad()
    fsdp = torch.load(tmp_path / "save_world2.pt", weights_only=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fsdp["params"][name], p.detach(), rtol=1e-10, atol=1e-12)
