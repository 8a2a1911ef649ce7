"""FloraAdamW on FSDP2 (fully_shard) DTensor parameters, 2 gloo processes on CPU."""

from __future__ import annotations

import torch
from accumulation_models import loss_of, make_batches, make_model
from distributed_workers import fsdp2_flora_adamw, run_workers

from flora import FloraAdamW

STEPS = 6  # kappa=2: three resampling windows


def test_fsdp2_equals_single_device_and_shards_the_state(tmp_path):
    world = 2
    run_workers(fsdp2_flora_adamw, world, str(tmp_path), STEPS)
    ranks = [torch.load(tmp_path / f"fsdp_rank{r}.pt", weights_only=True) for r in range(world)]

    # single device on the concatenated batch, right-side compression (what FSDP2 uses)
    model = make_model(dtype=torch.float64)
    opt = FloraAdamW(
        model.named_parameters(), lr=1e-2, rank=4, kappa=2, weight_decay=0.1, side="right"
    )
    batches = make_batches(STEPS * world)
    for step in range(STEPS):
        parts = batches[step * world : (step + 1) * world]
        joined = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        loss_of(model, joined).backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=1e-10, atol=1e-12)

    # each rank holds only its rows: the shards add up to the single-device state
    assert sum(r["state_bytes"] for r in ranks) == opt.state_bytes()
    assert all(r["state_bytes"] < 0.6 * opt.state_bytes() for r in ranks)
    # head.weight (5 x 24) is split unevenly, 3 + 2 rows; its momentum is (rows, rank)
    head = [r["shapes"]["head.weight"] for r in ranks]
    assert (3, 4) in head[0] and (2, 4) in head[1]


def test_flora_adafactor_base_is_refused_clearly_on_fsdp2(tmp_path):
    run_workers(fsdp2_flora_adamw, 2, str(tmp_path), 1)
    error = torch.load(tmp_path / "flora_error.pt", weights_only=True)["flora_error"]
    assert "FSDP2" in error and "FloraAdamW" in error
