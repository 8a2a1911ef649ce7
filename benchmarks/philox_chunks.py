"""Philox words on the CPU: rounds over cache-sized chunks of counters against one pass.

``flora.philox`` runs the ~150 elementwise passes of Philox4x32-10 over chunks of
``flora.philox.CPU_CHUNK`` counters on the CPU; this times that against one pass over the
whole counter tensor (the chunk size set to the tensor's length), for raw words and for two
users of many words: a Gaussian projection as large as a GPT-2 token embedding's
(``projection_matrix(64, 50257)``) and the stochastic rounding of a GPT-2 MLP matrix into
bf16 (the lean preset, every step; it already draws in chunks of its own). The words are the
same either way (tests/test_philox.py); medians of interleaved rounds, ratios in one run.

    python benchmarks/philox_chunks.py

Writes benchmarks/results/philox_chunks_cpu.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import flora
import flora.philox as philox
from flora.projection import projection_matrix
from flora.rounding import stochastic_round_stream_

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=5)
args = parser.parse_args()
CHUNK = philox.CPU_CHUNK


def words(n: int):
    counter = torch.arange(n, dtype=torch.int64)
    return lambda: philox.philox4x32(counter, 1, 2, 3, 4, 5)


def gaussian_projection():
    return projection_matrix(64, 50257, seed=0, key=1, window=0, stream="momentum/sketch")


x = torch.randn(3072, 768) * 0.02
out = torch.empty(3072, 768, dtype=torch.bfloat16)
stream = philox.stream_words("bench", 0)
cases = [(f"{n:,} counters ({4 * n:,} words)", words(n)) for n in (2**12, 2**16, 2**20, 2**22)]
cases += [
    ("Gaussian projection_matrix(64, 50257)", gaussian_projection),
    (
        "stochastic rounding of a 3072 x 768 matrix",
        lambda: stochastic_round_stream_(out, x, stream),
    ),
]

rows = []
for label, fn in cases:
    times: dict[str, list[float]] = {"chunked": [], "one pass": []}
    for _ in range(args.rounds):
        for how in times:
            philox.CPU_CHUNK = CHUNK if how == "chunked" else 2**40
            t0 = time.perf_counter()
            fn()
            times[how].append(time.perf_counter() - t0)
    philox.CPU_CHUNK = CHUNK
    chunked, whole = (statistics.median(times[h]) for h in ("chunked", "one pass"))
    rows.append(f"| {label} | {whole * 1e3:.1f} | {chunked * 1e3:.1f} | {chunked / whole:.2f} |")
    print(rows[-1], flush=True)

lines = [
    "# Philox4x32-10 on the CPU: chunked rounds against one pass",
    "",
    f"Reproduce: `python {' '.join(sys.argv)}`",
    "",
    f"Machine: {platform.machine()}, {torch.get_num_threads()} threads; torch "
    f"{torch.__version__}; flora {flora.__version__}; chunk {CHUNK:,} counters; median of "
    f"{args.rounds} interleaved rounds.",
    "",
    "| what | one pass ms | chunked ms | chunked / one pass |",
    "|---|---|---|---|",
    *rows,
    "",
]
path = Path(__file__).parent / "results" / "philox_chunks_cpu.md"
path.write_text("\n".join(lines))
print(f"wrote {path}")
