"""flora_comm_hook under DistributedDataParallel, with 2 real gloo processes on CPU."""

from __future__ import annotations

import pytest
import torch
from accumulation_models import make_model
from distributed_workers import ddp_comm_hook, run_workers

from flora.distributed import FloraCommState

pytestmark = pytest.mark.slow  # 2 gloo processes; `make test-fast` skips them

STEPS = 3


def run(tmp_path, mode):
    folder = tmp_path / mode
    folder.mkdir()
    run_workers(ddp_comm_hook, 2, str(folder), mode, STEPS)
    return torch.load(folder / f"{mode}.pt", weights_only=True)


def test_hook_without_compression_equals_plain_ddp(tmp_path):
    plain = run(tmp_path, "plain")
    for mode in ("off", "full_rank"):
        result = run(tmp_path, mode)
        for name, value in plain["params"].items():
            assert torch.equal(result["params"][name], value), (mode, name)
        assert result["sent"] == [result["full_bytes"]] * STEPS


def test_hook_compresses_and_sends_the_compressed_size(tmp_path):
    result = run(tmp_path, "compressed")
    assert result["sent"] == [result["compressed_bytes"]] * STEPS
    assert result["compressed_bytes"] < 0.4 * result["full_bytes"]
    # each step's gradient is up(down(mean gradient)) with that step's projection
    assert max(result["errors"]) < 1e-5


def test_bad_arguments():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        FloraCommState(make_model())
