"""GradientAccumulator under DistributedDataParallel with 2 real gloo processes on CPU."""

from __future__ import annotations

import pytest
import torch
from accumulation_models import loss_of, make_batches, make_model
from distributed_workers import ddp_accumulation, run_workers

from flora import GradientAccumulator

pytestmark = pytest.mark.slow  # 2 gloo processes; `make test-fast` skips them


@pytest.mark.parametrize("distribution", ["gaussian", "sketch"])
def test_ddp_equals_single_process_on_the_concatenated_batch(tmp_path, distribution):
    """The sketch too: both of its sketches are linear, so all-reducing them sketches the
    averaged gradient."""
    world, steps, cycles = 2, 3, 2
    run_workers(ddp_accumulation, world, str(tmp_path), steps, cycles, distribution)
    result = torch.load(tmp_path / "result.pt", weights_only=True)

    model = make_model()
    acc = GradientAccumulator(model, steps, rank=4, seed=1, distribution=distribution)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    batches = make_batches(cycles * steps * world)
    for c in range(cycles):
        for i in range(steps):
            parts = batches[(c * steps + i) * world : (c * steps + i + 1) * world]
            joined = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            with acc.micro_batch():
                (loss_of(model, joined) / steps).backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["params"][name], p.detach(), rtol=1e-5, atol=1e-6)

    # one all-reduce per cycle of exactly the compressed size (+ uncompressed vectors)
    plan = acc.plan()
    assert result["plan_bytes"] == plan.state_bytes
    assert result["bytes_per_cycle"] == [plan.state_bytes] * cycles
    assert result["reported"] == plan.state_bytes
    assert plan.state_bytes < 0.4 * plan.uncompressed_bytes
    assert "not supported under DistributedDataParallel" in result["sib_error"]
    assert "exact_rows=True is not supported under DistributedDataParallel" in result["rows_error"]
