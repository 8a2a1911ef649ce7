"""The accumulation experiment's pieces on a tiny random BERT (the real MiniLM is only loaded
by ``flora-experiments accumulate``)."""

from dataclasses import replace

import pytest

from flora_experiments import datasets
from flora_experiments.accumulate import AccumulateConfig, passages, run, train_one

WORKS = {
    "a": "HEADER " * 20 + " ".join(f"alpha{i}" for i in range(400)) + " LICENCE" * 40,
    "b": "HEADER " * 20 + " ".join(f"beta{i}" for i in range(400)) + " LICENCE" * 40,
}


def test_passages_skip_boilerplate_and_split_by_position():
    train, test = passages(WORKS, ("a", "b"), 60)
    assert all(len(t) <= 60 for t, _ in train + test)
    assert not any("HEADER" in t or "LICENCE" in t for t, _ in train + test)
    for label, word in ((0, "alpha"), (1, "beta")):
        mine_train = [t for t, y in train if y == label]
        mine_test = [t for t, y in test if y == label]
        assert all(word in t for t in mine_train + mine_test)
        assert len(mine_train) == pytest.approx(4 * len(mine_test), abs=4)  # 80 / 20
        # the test passages come after the training ones in the text
        last = int(mine_train[-1].split()[-1][len(word) :])
        assert all(int(t.split()[0][len(word) :]) > last for t in mine_test)
    with pytest.raises(ValueError, match="no work named"):
        passages(WORKS, ("a", "zz"), 60)


@pytest.fixture(scope="module")
def data():
    return passages(WORKS, ("a", "b"), 60)


CFG = AccumulateConfig(works=("a", "b"), max_tokens=24, accumulate=3, steps=2, ranks=(4,))


def test_accumulation_bytes_per_method(data):
    pytest.importorskip("transformers")
    rows = {
        m: train_one(m, 1e-4, CFG, *data, pretrained=False) for m in ("none", "naive", "flora-4")
    }
    assert rows["none"]["accumulation_bytes"] == 0  # nothing waits: one update per example
    assert rows["naive"]["accumulation_bytes"] == rows["naive"]["trainable_bytes"]
    assert 0 < rows["flora-4"]["accumulation_bytes"] < rows["naive"]["accumulation_bytes"]
    kept = train_one("flora-4", 1e-4, replace(CFG, exclude=("embeddings",)), *data, False)
    assert rows["flora-4"]["accumulation_bytes"] < kept["accumulation_bytes"]  # full-size
    assert kept["accumulation_bytes"] < rows["naive"]["accumulation_bytes"]
    exact = train_one("flora-4", 1e-4, replace(CFG, exact_rows=True), *data, False)
    assert exact["accumulation_bytes"] == rows["flora-4"]["accumulation_bytes"]  # same buffer
    assert all(0 <= r["accuracy"] <= 1 for r in rows.values())
    pytest.importorskip("peft")
    lora = train_one("lora-4", 1e-3, CFG, *data, pretrained=False)
    assert lora["accumulation_bytes"] == lora["trainable_bytes"] < rows["naive"]["trainable_bytes"]


@pytest.mark.parametrize("method", ["flora", "lora-x", "sgd-4", "naive-4"])
def test_bad_method_is_refused(method, data):
    with pytest.raises((ValueError, TypeError)):
        train_one(method, 1e-4, CFG, *data, pretrained=False)


def test_run_sweeps_step_sizes_and_reports_the_best(monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.setattr(datasets, "shakespeare_works", lambda root=None: WORKS)
    cfg = AccumulateConfig(
        works=("a", "b"), max_tokens=24, accumulate=2, steps=2, ranks=(4,), test_per_work=5,
        lrs=(1e-5, 1e-3), lora_lrs=(1e-2,), widen=0,
    )  # fmt: skip
    res = run(cfg, name="t", pretrained=False)
    assert [r["method"] for r in res.rows] == ["none", "naive", "lora-4", "flora-4"]
    for row in res.rows:
        points = dict(p.split(": ") for p in row["sweep"].split(", "))
        lrs = cfg.lora_lrs if row["method"].startswith("lora") else cfg.lrs
        assert list(map(float, points)) == list(lrs)
        assert row["accuracy"] == pytest.approx(max(map(float, points.values())), abs=5e-4)
        assert float(points[f"{row['lr']:g}"]) == pytest.approx(row["accuracy"], abs=5e-4)
