"""The LM experiment's pieces: every optimizer builds from its real package and steps, with
exact state bytes; the results carry every run."""

from dataclasses import replace

import pytest
import torch

from flora_experiments import lm
from flora_experiments.memory import optimizer_state_bytes

TINY = replace(
    lm.LMConfig.quick(), hidden=32, layers=1, heads=2, intermediate=64, seq=16, batch=2,
    steps=3, rank=4, kappa=2, eval_batches=2, evals=1, corpus="stdlib", max_bytes=20000,
)  # fmt: skip
PEERS = {
    "flora-opt": "flora_opt",
    "galore": "galore_torch",
    "apollo": "apollo_torch",
    "lora": "peft",
}


@pytest.mark.parametrize("name", list(lm.OPTIMIZERS))
def test_every_optimizer_builds_and_steps(name):
    pytest.importorskip("transformers")
    if name in PEERS:
        pytest.importorskip(PEERS[name])
    model, opt, step, acc = lm.build_run(name, TINY, 1e-3)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    x = torch.randint(0, 256, (lm.LEAN_ACCUMULATE, 16))
    step(x)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    if name in ("flora-accumulate", "flora-accumulate-sketch"):
        assert acc.position == 0 and all(s["step"] == 1 for s in opt.state.values())
        assert acc.distribution == ("sketch" if name.endswith("sketch") else "gaussian")
        acc.remove()
    elif name == "flora-lean-preset":  # stepped inside backward of the 4th micro-batch
        assert acc.position == 0 and all(p.grad is None for p in after)
        assert all(p.dtype == torch.bfloat16 for p in after)
        assert all(s["step"] == 1 for s in opt.state.values())
        acc.remove()
    else:
        assert acc is None
    state = optimizer_state_bytes(opt)
    trainable = sum(p.numel() * 4 for p in after)
    if name == "adamw":
        assert state == 2 * trainable + 4 * len(after)  # exp_avg, exp_avg_sq, step
    if name in ("flora", "galore", "apollo", "flora-opt"):
        assert 0 < state < 2 * trainable  # compressed below AdamW's two moments


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        lm.build("sophia", TINY, 1e-3)


def test_run_reports_best_lr_and_keeps_every_run():
    pytest.importorskip("transformers")
    cfg = replace(TINY, optimizers=("adamw", "flora"), lr_slice=slice(0, 2), widen=1)
    res = lm.run(cfg, name="t")
    assert [r["optimizer"] for r in res.rows] == ["adamw", "flora"]
    for row in res.rows:
        # two step sizes always have the best on an edge: one more past it, then no more
        lrs = [p["lr"] for p in row["points"]]
        grid = lm.OPTIMIZERS[row["optimizer"]][1][:2]
        assert len(lrs) == 3 and lrs == sorted(lrs) and set(grid) < set(lrs)
        assert row["val_loss"] == min(p["val_loss"] for p in row["points"])
        assert row["lr_at_edge"] == (row["lr"] in (lrs[0], lrs[-1]))
        assert len(row["sweep"].split(", ")) == 3
    assert "widened by up to 1 step sizes" in res.notes[1]
    assert res.rows[0]["state_ratio"] == 1.0 and res.rows[1]["state_ratio"] < 1.0
    kappa = lm.run_kappa(replace(cfg, kappas=(1, 1000)), name="k")
    assert [r["kappa"] for r in kappa.rows] == [1, 1000]
    assert [r["resamples"] for r in kappa.rows] == [2, 0]


def test_study_forms_build_the_optimizer_they_name():
    import flora
    from flora_experiments.lm import FLORA_FORMS, LMConfig, build

    cfg = LMConfig(hidden=32, layers=1, heads=2, intermediate=64, seq=16, rank=4)
    for name, options in FLORA_FORMS.items():
        model, opt = build(name, cfg, 1e-3)
        expected = flora.FloraAdamW if name.startswith("flora-adamw") else flora.Flora
        assert type(opt) is expected, name
        group = opt.param_groups[-1]  # (the galore-split row's last group is the compressed one)
        for key, value in options.items():
            if key == "bf16_weights":  # not an option: the model is cast instead
                assert next(model.parameters()).dtype == torch.bfloat16, name
                continue
            assert group[key] == (tuple(value) if key == "exclude" else value), (name, key)
