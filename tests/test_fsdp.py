"""Flora and FloraAdamW on FSDP2 (fully_shard) DTensor parameters, 2 gloo processes on CPU:
equal to single-device training, state sharded, checkpoints resharded across world sizes."""

from __future__ import annotations

import pytest
import torch
from accumulation_models import loss_of, make_batches, make_model
from distributed_workers import (
    DATA_WORLD,
    FSDP_OPTIMIZERS,
    ROUNDED_KINDS,
    fsdp2_bf16_rounding,
    fsdp2_dcp,
    fsdp2_train,
    global_batch,
    make_fsdp_optimizer,
    run_workers,
)

pytestmark = pytest.mark.slow  # 2 gloo processes; `make test-fast` skips them

STEPS = 6  # kappa=2: three resampling windows


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    run_workers(fsdp2_train, 2, str(folder), STEPS)
    return folder


def _single_device(kind: str, steps: int = STEPS):
    """Single device on the concatenated batch, right-side compression (what FSDP2 uses)."""
    model = make_model(dtype=torch.float64)
    opt = make_fsdp_optimizer(kind, model.named_parameters(), side="right")
    batches = make_batches(steps * DATA_WORLD)
    for step in range(steps):
        loss_of(model, global_batch(batches, step, 0, 1)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("kind", FSDP_OPTIMIZERS)
def test_fsdp2_equals_single_device_and_shards_the_state(fsdp_runs, kind):
    ranks = [torch.load(fsdp_runs / f"fsdp_{kind}_rank{r}.pt", weights_only=True) for r in (0, 1)]
    model, opt = _single_device(kind)
    for name, p in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=1e-10, atol=1e-12)

    # each rank holds only its rows; a matrix's column factor (1, n), a gradient basis over
    # the columns and the limiter's scalar are on every rank
    replicated = sum(
        opt.state[p][key].numel() * opt.state[p][key].element_size()
        for p in model.parameters()
        for key in ("col_var", "projection", "residual_norm")
        if key in opt.state[p] and (key != "col_var" or p.dim() == 2)
    )
    assert sum(r["state_bytes"] for r in ranks) == opt.state_bytes() + replicated
    split = opt.state_bytes() - replicated  # the row-sharded part is shared out
    assert all(r["state_bytes"] - replicated < 0.6 * split for r in ranks)
    # head.weight (5 x 24) is split unevenly, 3 + 2 rows; its momentum is (rows, rank)
    assert ranks[0]["shapes"]["head.weight"]["exp_avg"] == (3, 4)
    assert ranks[1]["shapes"]["head.weight"]["exp_avg"] == (2, 4)
    if kind in ("adamw_factored", "flora", "flora_subspace"):  # factored: rows split, columns whole
        assert ranks[1]["shapes"]["head.weight"]["row_var"] == (2, 1)
        assert ranks[1]["shapes"]["head.weight"]["col_var"] == (1, 24)
        assert ranks[1]["shapes"]["conv.weight"]["col_var"] == (8, 1, 3)  # 3-d: sharded


@pytest.mark.parametrize("kind", ["flora", "adamw", "adamw_fira_gradient"])
def test_dcp_reshards_fsdp2_state_between_world_sizes(tmp_path, kind):
    run_workers(fsdp2_dcp, 2, str(tmp_path), "save", kind)
    run_workers(fsdp2_dcp, 1, str(tmp_path), "save", kind)
    run_workers(fsdp2_dcp, 1, str(tmp_path), "load", kind)  # from world size 2
    run_workers(fsdp2_dcp, 2, str(tmp_path), "load", kind)  # from world size 1
    run = {
        (phase, world): torch.load(tmp_path / f"{phase}_world{world}.pt", weights_only=True)
        for phase in ("save", "load")
        for world in (1, 2)
    }
    model, _ = _single_device(kind)
    for world, other in ((1, 2), (2, 1)):
        saved, loaded = run["save", other]["state"], run["load", world]["state"]
        for name, state in saved.items():
            for key, value in state.items():
                got = loaded[name][key]
                assert torch.equal(got, value) if torch.is_tensor(value) else got == value
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                run["load", world]["params"][name], p.detach(), rtol=1e-10, atol=1e-12
            )


def test_bf16_weights_rounded_under_fsdp2_equal_one_device(tmp_path):
    """Stochastic rounding draws each entry's bits by its global position (and Kahan keeps
    each row's compensation on its rank): sharded bf16 training equals one device's bit for
    bit. Drawing by local position would give rank 1's rows rank 0's bits."""
    run_workers(fsdp2_bf16_rounding, 1, str(tmp_path), 4, False)
    run_workers(fsdp2_bf16_rounding, 2, str(tmp_path), 4, True)
    for kind in ROUNDED_KINDS:
        alone = torch.load(tmp_path / f"rounded_{kind}_world1_False.pt", weights_only=True)
        shards = torch.load(tmp_path / f"rounded_{kind}_world2_True.pt", weights_only=True)
        initial = dict(make_model(dtype=torch.bfloat16).named_parameters())
        for name, p in alone.items():
            assert p.dtype == torch.bfloat16
            assert not torch.equal(p, initial[name]), f"{kind} {name}: not trained"
            assert torch.equal(shards[name], p), f"{kind} {name}"


#: sums over the shards each parameter's step needs, one after another (Flora: the column
#: statistics, then the clipping norm; a factored or limited FloraAdamW: one)
BODY_SUMS = {
    "adamw": 0, "adamw_factored": 1, "flora": 2, "flora_linear": 2, "flora_subspace": 2,
    "adamw_subspace": 0, "flora_gradient": 2, "flora_gradient_fp32": 2, "adamw_fira": 1,
    "adamw_fira_gradient": 1, "sgd_gradient": 0, "lion_gradient": 0, "flora_bf16_moments": 2,
    "adamw_fira_int8_moments": 1,
}  # fmt: skip
#: kinds whose basis is the gradient's (a range finder: 3 sums at a window's first step)
GRADIENT_BASIS = {
    "flora", "flora_linear", "flora_gradient", "flora_gradient_fp32", "adamw_fira_gradient",
    "sgd_gradient", "lion_gradient", "flora_bf16_moments",
}  # fmt: skip


@pytest.mark.parametrize("kind", FSDP_OPTIMIZERS)
def test_fsdp2_step_takes_a_few_all_reduces_whatever_the_parameter_count(fsdp_runs, kind):
    """The shards' step bodies run together: what all parameters need summed at one point
    goes in one all-reduce, not one per parameter (the test model has 4 sharded matrices
    and 5 other tensors: per-parameter sums took 15 all-reduces for Flora at a window's
    first step). Per step: the finiteness verdict, then the body's rounds."""
    first_steps = {0, 1, 3, 5}  # window 0 at step 1, then every kappa = 2 steps
    expected = [
        1 + BODY_SUMS[kind] + (3 if kind in GRADIENT_BASIS and step in first_steps else 0)
        for step in range(STEPS)
    ]
    for r in (0, 1):
        got = torch.load(fsdp_runs / f"fsdp_{kind}_rank{r}.pt", weights_only=True)["all_reduces"]
        assert got == expected
