"""The first step against a steady one: Flora's default on GPT-2-small (``flora.gpt``'s
``gpt2`` size with the head tied to the embedding: 124M parameters).

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
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import flora
from flora.gpt import GPT, SIZES

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--rank", type=int, default=32)
args = parser.parse_args()

torch.manual_seed(0)
MODEL = GPT(dataclasses.replace(SIZES["gpt2"], tie_embeddings=True))
gen = torch.Generator().manual_seed(0)
GRADS = [torch.randn(p.shape, generator=gen) * 1e-3 for p in MODEL.parameters()]


def timed(opt: torch.optim.Optimizer) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


rows = []
for r in range(args.rounds):
    with torch.no_grad():  # fresh weights and gradients each round
        for p, grad in zip(MODEL.parameters(), GRADS, strict=True):
            p.normal_(0.0, 0.02, generator=gen)
            p.grad = grad.clone()
    opt = flora.Flora(MODEL.named_parameters(), rank=args.rank, kappa=1000)
    first = timed(opt)
    timed(opt)
    steady = statistics.median(timed(opt) for _ in range(5))
    rows.append((first, steady))
    print(f"round {r}: first {first * 1e3:.0f} ms, steady {steady * 1e3:.0f} ms", flush=True)
    del opt

ratios = [f / s for f, s in rows]
lines = [
    "# First step against a steady step: default Flora, GPT-2-small (124M, tied head)",
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
