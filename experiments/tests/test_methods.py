"""The row bookkeeping shared by the accumulation, translation and summarization runs."""

import math

import pytest

from flora_experiments.methods import (
    best_of_sweep,
    best_rows,
    chosen_methods,
    edge_note,
    headline,
    methods,
    parse_method,
    plot_sweeps,
    ratios_to_naive,
    sweep,
)
from flora_experiments.report import Results


def test_methods_and_their_parsing():
    assert methods((8, 32)) == ["none", "naive", "lora-8", "lora-32", "flora-8", "flora-32"]
    assert [parse_method(m) for m in methods((8,))] == [
        ("none", 0), ("naive", 0), ("lora", 8), ("flora", 8)
    ]  # fmt: skip
    for bad in ("flora", "lora-x", "sgd-4", "naive-4"):
        with pytest.raises(ValueError, match="method"):
            parse_method(bad)


def test_best_rows_sweeps_each_method_and_keeps_every_point():
    calls = []

    def train(method, lr):
        calls.append((method, lr))
        return {"method": method, "lr": lr, "loss": abs(lr - (0.1 if "flora" in method else 0.01))}

    lrs = {"lora-4": (0.5,)}
    rows = best_rows(methods((4,)), lambda m: lrs.get(m, (0.01, 0.1)), train, "loss", lower=True,
                     describe=lambda r: f"{r['loss']:.2f}", extend=0)  # fmt: skip
    assert [r["method"] for r in rows] == methods((4,))
    assert calls == [("none", 0.01), ("none", 0.1), ("naive", 0.01), ("naive", 0.1),
                     ("lora-4", 0.5), ("flora-4", 0.01), ("flora-4", 0.1)]  # fmt: skip
    assert [r["lr"] for r in rows] == [0.01, 0.01, 0.5, 0.1]
    assert rows[3]["sweep"] == "0.01: 0.09, 0.1: 0.00"
    assert rows[3]["points"] == [pytest.approx({"lr": 0.01, "loss": 0.09}), {"lr": 0.1, "loss": 0}]
    assert [r["lr_at_edge"] for r in rows] == [True, True, False, True]
    # higher is better: the other end of each sweep; ties go to the smaller step size
    high = best_rows(methods((4,)), lambda m: (0.01, 0.1), train, "loss", lower=False, describe=str,
                     extend=0)  # fmt: skip
    assert [r["lr"] for r in high] == [0.1, 0.1, 0.1, 0.01]
    tied = best_rows(methods(()), lambda m: (0.3, 0.2), lambda m, lr: {"lr": lr, "q": 1}, "q",
                     lower=False, describe=str, extend=0)  # fmt: skip
    assert [r["lr"] for r in tied] == [0.2, 0.2]  # swept in ascending order


def _quadratic(best_lr):
    calls = []

    def train(lr):
        calls.append(lr)
        return {"lr": lr, "loss": abs(math.log10(lr) - math.log10(best_lr)), "name": "x"}

    return train, calls


def test_sweep_widens_past_the_edge_where_the_best_sits():
    train, calls = _quadratic(1.0)  # optimum two grid steps above the grid
    points = sweep(train, (0.01, 0.1), "loss", lower=True)
    assert calls == pytest.approx([0.01, 0.1, 1.0, 10.0])  # up to 1, then 10 shows 1 is best
    assert [p["lr"] for p in points] == pytest.approx([0.01, 0.1, 1.0, 10.0])
    best = best_of_sweep(points, "loss", lower=True, describe=lambda r: "")
    assert best["lr"] == pytest.approx(1.0) and not best["lr_at_edge"]

    train, calls = _quadratic(1e-6)  # far below: two extra points, then the best stays put
    points = sweep(train, (0.01, 0.03, 0.1), "loss", lower=True, extend=2)
    assert calls == pytest.approx([0.01, 0.03, 0.1, 0.01 / 3, 0.01 / 9])
    best = best_of_sweep(points, "loss", lower=True, describe=lambda r: "")
    assert best["lr"] == pytest.approx(0.01 / 9) and best["lr_at_edge"]
    assert [p["lr"] for p in best["points"]] == pytest.approx([0.01 / 9, 0.01 / 3, 0.01, 0.03, 0.1])
    assert "name" not in best["points"][0]  # only the numbers of each point are kept

    train, calls = _quadratic(0.03)  # inside: nothing added
    assert len(sweep(train, (0.01, 0.03, 0.1), "loss", lower=True)) == 3 and len(calls) == 3
    train, calls = _quadratic(1.0)  # one step size: no ratio to widen by
    assert len(sweep(train, (0.5,), "loss", lower=True)) == 1
    # a diverged (NaN) point is the worst, so the sweep widens away from it
    nan = sweep(lambda lr: {"lr": lr, "loss": math.nan if lr > 0.05 else lr}, (0.01, 0.1),
                "loss", lower=True)  # fmt: skip
    assert [p["lr"] for p in nan] == pytest.approx([0.0001, 0.001, 0.01, 0.1])
    # higher is better: the optimum of -loss is found the same way
    up = sweep(lambda lr: {"lr": lr, "q": -abs(math.log10(lr))}, (0.01, 0.1), "q", lower=False)
    assert [p["lr"] for p in up] == pytest.approx([0.01, 0.1, 1.0, 10.0])


def test_edge_note_names_the_rows_still_on_an_edge():
    rows = [{"method": "none", "lr": 0.1, "lr_at_edge": True}, {"method": "naive", "lr": 0.03}]
    assert "none (0.1)" in edge_note(rows) and "naive" not in edge_note(rows)
    assert "every best step size is inside" in edge_note(rows[1:])


def test_plot_sweeps_sets_the_sweep_curves_and_the_memory_points(tmp_path):
    points = [{"lr": 0.01, "loss": 2.0}, {"lr": 0.1, "loss": 1.5}]
    rows = [
        {"method": "naive", "loss": 1.5, "state_ratio": 1.0, "points": points},
        {"method": "flora-8", "loss": 1.7, "state_ratio": 0.1, "points": points[:1]},
    ]
    res = Results(name="sweeps", title="T", columns=[("method", "method")], seed=0, rows=rows)
    plot_sweeps(res, rows, "loss", "held-out loss", "state_ratio", "state / naive")
    assert res.curves == {"naive": [(0.01, 2.0), (0.1, 1.5)], "flora-8": [(0.01, 2.0)]}
    assert res.points == {"naive": (1.0, 1.5), "flora-8": (0.1, 1.7)}
    assert res.curve_log_x and res.point_axes == ("state / naive", "held-out loss")
    pytest.importorskip("matplotlib")
    assert [p.name for p in res.write(tmp_path)][-1] == "sweeps.png"


def test_chosen_methods_default_to_the_tables_rows():
    assert chosen_methods((), (8,)) == methods((8,))
    assert chosen_methods(("naive", "flora-64"), (8,)) == ["naive", "flora-64"]
    assert chosen_methods(("flora-64",), (8,)) == ["flora-64"]  # ratios then stay empty
    rows = [{"method": "flora-64", "state_bytes": 5}]
    ratios_to_naive(rows, {"state_ratio": "state_bytes"})
    assert rows[0]["state_ratio"] is None
    with pytest.raises(ValueError, match="method must be"):
        chosen_methods(("naive", "flora"), (8,))


def test_headline_picks_the_best_flora_and_lora_rows_present():
    rows = [{"method": m, "loss": v} for m, v in
            [("none", 3.0), ("naive", 2.0), ("lora-8", 2.6), ("lora-32", 2.4), ("flora-8", 2.5),
             ("flora-32", 2.2)]]  # fmt: skip
    assert [(n, r["method"]) for n, r in headline(rows, "loss", lower=True)] == [
        ("none", "none"), ("naive", "naive"), ("best Flora", "flora-32"), ("best LoRA", "lora-32")
    ]  # fmt: skip
    assert headline(rows, "loss", lower=False)[2][1]["method"] == "flora-8"
    only = headline([rows[1], rows[5]], "loss", lower=True)
    assert [n for n, _ in only] == ["naive", "best Flora"]
