"""The pilot study's methods on a tiny slice of data: invariants that must hold exactly."""

import pytest
import torch

from flora_experiments.pilot import PilotConfig, train_one


@pytest.fixture(scope="module")
def data():
    """Ten random prototype images plus noise: a task a linear model learns quickly."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(10, 28, 28, generator=g)
    y = torch.randint(0, 10, (384,), generator=g)
    x = (prototypes[y] + 0.5 * torch.rand(384, 28, 28, generator=g)).clamp(0, 1)
    return (x[:256], y[:256]), (x[256:], y[256:])


def cfg(**kw):
    return PilotConfig(**{"epochs": 1, "batch_size": 32, "rank": 4, "evals_per_epoch": 2, **kw})


def test_lora_b_and_rp_are_the_same_update(data):
    # LoRA(B): dW = dB A with dB = -lr G A^T; RP: dW = -lr G A^T A, same A (Observation 2.2)
    lora_b = train_one("lora_b", 0.1, cfg(), *data)
    rp = train_one("rp", 0.1, cfg(), *data)
    got, want = [a for _, a in lora_b["curve"]], [a for _, a in rp["curve"]]
    assert got == pytest.approx(want, abs=1 / 128)  # one test image of 128 at most


def test_rrp_without_resampling_is_rp_and_resampling_changes_it(data):
    rp = train_one("rp", 0.1, cfg(), *data)
    frozen = train_one("rrp", 0.1, cfg(kappa=10**9), *data)  # window 0 for ever = RP's A
    assert frozen["curve"] == rp["curve"]
    resampled = train_one("rrp", 0.1, cfg(kappa=1), *data)
    assert resampled["curve"] != rp["curve"]


def test_sgd_learns_and_bad_method_is_refused(data):
    out = train_one("sgd", 0.03, cfg(epochs=4), *data)
    assert len(out["curve"]) == 8 and out["seconds_per_step"] > 0
    assert out["accuracy"] > 0.9 > out["curve"][0][1]  # learns ten noisy prototypes
    with pytest.raises(ValueError, match="method"):
        train_one("dora", 0.1, cfg(), *data)
