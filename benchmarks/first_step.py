"""The first step against a steady one: Flora's default on GPT-2-small shapes.

The first ``step()`` allocates the state and finds each matrix's gradient basis (the seeded
range finder, ``flora.projection.range_basis``); a new window's step does the latter again.
Each round builds fresh parameters and a fresh optimizer, times step 1, then the median of
steps 3..7 (step 2 not timed); the ratio is taken within the round, so machine noise that
lasts longer than a round cancels. Issue 15's target: at most 2.

    python benchmarks/first_step.py

Writes benchmarks/results/first_step_cpu.md.
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

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--rank", type=int, default=32)
args = parser.parse_args()

d, vocab = 768, 50257
SHAPES = [("wte.weight", (vocab, d)), ("wpe.weight", (1024, d))]
for i in range(12):
    SHAPES += [(f"h.{i}.ln.weight", (d,)), (f"h.{i}.attn.weight", (3 * d, d)),
               (f"h.{i}.proj.weight", (d, d)), (f"h.{i}.fc.weight", (4 * d, d)),
               (f"h.{i}.out.weight", (d, 4 * d)), (f"h.{i}.fc.bias", (4 * d,))]  # fmt: skip
gen = torch.Generator().manual_seed(0)
GRADS = [torch.randn(s, generator=gen) * 1e-3 for _, s in SHAPES]


def timed(opt: torch.optim.Optimizer) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


rows = []
for r in range(args.rounds):
    params = []
    for (name, shape), grad in zip(SHAPES, GRADS, strict=True):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = grad.clone()
        params.append((name, p))
    opt = flora.Flora(params, rank=args.rank, kappa=1000)
    first = timed(opt)
    timed(opt)
    steady = statistics.median(timed(opt) for _ in range(5))
    rows.append((first, steady))
    print(f"round {r}: first {first * 1e3:.0f} ms, steady {steady * 1e3:.0f} ms", flush=True)
    del opt, params

ratios = [f / s for f, s in rows]
lines = [
    "# First step against a steady step: default Flora, GPT-2-small shapes",
    "",
    f"Reproduce: `python {' '.join(sys.argv)}`",
    "",
    f"Machine: {platform.machine()}, {torch.get_num_threads()} threads; torch "
    f"{torch.__version__}; flora {flora.__version__}; rank {args.rank}; each round fresh "
    "parameters and optimizer, step 1 against the median of steps 3-7.",
    "",
    "| round | first step ms | steady step ms | first / steady |",
    "|---|---|---|---|",
    *(f"| {i} | {f * 1e3:.0f} | {s * 1e3:.0f} | {f / s:.2f} |" for i, (f, s) in enumerate(rows)),
    f"| **median** | | | **{statistics.median(ratios):.2f}** |",
    "",
]
out = Path(__file__).parent / "results" / "first_step_cpu.md"
out.write_text("\n".join(lines))
print(f"wrote {out}")
