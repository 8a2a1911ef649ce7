"""torch.distributed.checkpoint round trips of Flora's optimizer state across world sizes
(DDP, 2 gloo processes <-> 1 process)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from accumulation_models import make_batches
from distributed_workers import _flora_setup, _train_steps, dcp_roundtrip, run_workers
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

pytestmark = pytest.mark.slow  # 2 gloo processes; `make test-fast` skips them


def test_dcp_save_at_two_load_at_one_and_back(tmp_path):
    run_workers(dcp_roundtrip, 2, str(tmp_path), "save")
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)

    # load the world-2 checkpoint in one process
    model, opt = _flora_setup()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp_world2"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = opt.state_dict()
    for pid, saved in reference["state"].items():
        for key, value in saved.items():
            got = loaded["state"][pid][key]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value, key

    # continue identically to an uninterrupted single-process run
    straight, opt_straight = _flora_setup()
    _train_steps(straight, opt_straight, make_batches(5))
    _train_steps(model, opt, make_batches(5)[3:])
    for a, b in zip(straight.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    # the reverse: save in one process, load at world size 2 and continue
    first, opt_first = _flora_setup()
    _train_steps(first, opt_first, make_batches(3))
    msd, osd = get_state_dict(first, opt_first)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "dcp_world1"))
    run_workers(dcp_roundtrip, 2, str(tmp_path), "load")
    continued = torch.load(tmp_path / "continued_world2.pt", weights_only=True)
    for name, a in straight.named_parameters():
        torch.testing.assert_close(continued[name], a.detach(), rtol=1e-6, atol=1e-7)
