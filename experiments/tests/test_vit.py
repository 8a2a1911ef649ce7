"""The ViT experiment (Appendix C.1) on tiny synthetic images: optimizers, sweep, results."""

import pytest
import torch

from flora_experiments import datasets, vit
from flora_experiments.vit import ViTConfig

TINY = ViTConfig(
    epochs=1, hidden=16, layers=1, heads=2, intermediate=32, batch=16, rank=4, kappa=5,
    evals_per_epoch=1, lr_slice=slice(0, 2), widen=1,
)  # fmt: skip


def _images(split, root=None, limit=None):
    """Two classes told apart by which half of the image is bright."""
    n = 64 if split == "train" else 32
    gen = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.arange(n) % 2
    images = 0.1 * torch.rand(n, 28, 28, generator=gen)
    images[labels == 0, :14] += 0.9
    images[labels == 1, 14:] += 0.9
    return images[:limit], labels[:limit]


def test_unknown_optimizer_is_refused():
    pytest.importorskip("transformers")
    model = vit._model(TINY)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        vit._optimizer("sophia", model, 1e-3, TINY)
    with pytest.raises(ValueError, match="optimizers must be among"):
        vit.run(ViTConfig(optimizers=("sophia",)), name="t")


def test_run_sweeps_widens_and_reports_state_and_time(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(datasets, "fashion_mnist", _images)
    res = vit.run(TINY, name="t")
    assert [r["optimizer"] for r in res.rows] == list(vit.OPTIMIZERS)
    for row in res.rows:
        lrs = [p["lr"] for p in row["points"]]
        assert len(lrs) == 3 and set(vit.OPTIMIZERS[row["optimizer"]][:2]) < set(lrs)
        assert row["accuracy"] == max(p["accuracy"] for p in row["points"])
        assert 0.0 <= row["accuracy"] <= 1.0 and row["time_ratio"] > 0
    state = {r["optimizer"]: r["state_bytes"] for r in res.rows}
    assert state["flora"] < state["adamw"] and state["flora-adamw"] < state["adamw"]
    assert res.rows[0]["state_ratio"] == 1.0
    assert any("widened by up to 1" in note for note in res.notes)
    assert set(res.curves) == {f"{r['optimizer']} (lr {r['lr']:g})" for r in res.rows}
