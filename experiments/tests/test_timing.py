"""Interleaved timing: every candidate runs in every round, in turn."""

from flora_experiments.timing import interleaved_seconds


def test_rounds_interleave_and_medians_are_per_call():
    calls: list[str] = []
    out = interleaved_seconds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        rounds=3,
        repeat=2,
        warmup=1,
    )
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then a/b in turn
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
