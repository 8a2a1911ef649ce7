"""The row bookkeeping shared by the accumulation, translation and summarization runs."""

import pytest

from flora.evidence.methods import best_rows, methods, parse_method


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
    rows = best_rows((4,), lambda m: lrs.get(m, (0.01, 0.1)), train, "loss", lower=True,
                     describe=lambda r: f"{r['loss']:.2f}")  # fmt: skip
    assert [r["method"] for r in rows] == methods((4,))
    assert calls == [("none", 0.01), ("none", 0.1), ("naive", 0.01), ("naive", 0.1),
                     ("lora-4", 0.5), ("flora-4", 0.01), ("flora-4", 0.1)]  # fmt: skip
    assert [r["lr"] for r in rows] == [0.01, 0.01, 0.5, 0.1]
    assert rows[3]["sweep"] == "0.01: 0.09, 0.1: 0.00"
    # higher is better: the other end of each sweep; ties go to the smaller step size
    high = best_rows((4,), lambda m: (0.01, 0.1), train, "loss", lower=False, describe=str)
    assert [r["lr"] for r in high] == [0.1, 0.1, 0.1, 0.01]
    tied = best_rows((), lambda m: (0.3, 0.2), lambda m, lr: {"lr": lr, "q": 1}, "q",
                     lower=False, describe=str)  # fmt: skip
    assert [r["lr"] for r in tied] == [0.3, 0.3]
