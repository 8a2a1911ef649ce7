"""Step time as a ratio to a baseline measured in the same process, interleaved.

Training runs follow one another, so a slow moment of a shared machine would land on
whichever optimizer ran then. ``interleaved_seconds`` times every candidate in turn, round
after round, and keeps each one's median, so drift hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["interleaved_seconds"]


def interleaved_seconds(
    steps: dict[str, Callable[[], object]], *, rounds: int = 3, repeat: int = 5, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each callable over ``rounds`` interleaved rounds of
    ``repeat`` calls, after ``warmup`` untimed calls each."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            samples[name].append((time.perf_counter() - start) / repeat)
    return {name: statistics.median(values) for name, values in samples.items()}
