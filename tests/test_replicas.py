"""Ranks that disagree on compression settings are caught by name (2 real gloo processes)."""

from __future__ import annotations

import pytest
import torch
from distributed_workers import replica_mismatch, run_workers

pytestmark = pytest.mark.slow  # 2 gloo processes; `make test-fast` skips them


def test_differing_settings_raise_the_same_named_error_on_every_rank(tmp_path):
    run_workers(replica_mismatch, 2, str(tmp_path))
    errors = [torch.load(tmp_path / f"errors_{r}.pt", weights_only=True) for r in range(2)]
    assert errors[0] == errors[1]  # every rank raised, with the same message
    e = errors[0]
    assert (
        "GradientAccumulator: the processes disagree on seed: rank 0 has 0, rank 1 has 1"
        in (e["accumulator_seed"])
    )
    assert "disagree on rank: rank 0 has 4, rank 1 has 5" in e["accumulator_rank"]
    assert "FloraCommState: the processes disagree on seed" in e["comm_hook_seed"]
    assert "Flora: the processes disagree on param_groups[0].seed" in e["optimizer_seed"]
    assert e["moved"] == "True"
    assert e["accumulator_ok"].startswith("GradientAccumulator(steps=2")
