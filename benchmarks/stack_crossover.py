"""Where stacking pays on this device: the multi-tensor step against the loop, by size.

Twelve square matrices of each size (a transformer's layers share shapes), rank 32, fixed
gradients; ``Flora``/``FloraAdamW`` with ``foreach=True`` (every matrix stacked) against
``foreach=False`` (the per-parameter loop), medians of interleaved rounds, ratios within one
run. ``flora.optim.base.CPU_STACK_NUMEL``, the largest matrix ``foreach=None`` stacks on the
CPU, is read off this table.

    python benchmarks/stack_crossover.py                 # CPU
    python benchmarks/stack_crossover.py --device cuda   # on a GPU machine

Writes benchmarks/results/stack_crossover_<device>.md.
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
parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 384, 512, 768])
parser.add_argument("--matrices", type=int, default=12)
parser.add_argument("--rounds", type=int, default=7)
parser.add_argument("--device", default="cpu")
args = parser.parse_args()
device = torch.device(args.device)


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(cls, size: int, foreach: bool, lr: float):
    gen = torch.Generator().manual_seed(size)
    params = []
    for i in range(args.matrices):
        p = torch.nn.Parameter((torch.randn(size, size, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(size, size, generator=gen) * 1e-3).to(device)
        params.append((f"w{i}", p))
    opt = cls(params, lr=lr, rank=32, foreach=foreach)
    opt.step()  # the state (the loop either way)
    opt.step()  # the first stacked step
    return opt


rows = []
for size in args.sizes:
    for cls, lr in ((flora.Flora, 1e-2), (flora.FloraAdamW, 1e-3)):
        opts = {f: build(cls, size, f, lr) for f in (True, False)}
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for foreach, opt in opts.items():
                sync()
                t0 = time.perf_counter()
                opt.step()
                sync()
                times[foreach].append(time.perf_counter() - t0)
        stacked, loop = (statistics.median(times[f]) for f in (True, False))
        rows.append(
            f"| {size}x{size} ({size * size:,}) | {cls.__name__} | {loop * 1e3:.1f} "
            f"| {stacked * 1e3:.1f} | {stacked / loop:.2f} |"
        )
        print(rows[-1], flush=True)

lines = [
    f"# Stacked (foreach=True) against the loop (foreach=False), {args.matrices} matrices",
    "",
    f"Reproduce: `python {' '.join(sys.argv)}`",
    "",
    f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, device `{device}`"
    + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    + f"; torch {torch.__version__}; rank 32; median of {args.rounds} interleaved rounds of "
    "one steady `step()` each.",
    "",
    "| matrix (entries) | optimizer | loop ms | stacked ms | stacked / loop |",
    "|---|---|---|---|---|",
    *rows,
    "",
]
out = Path(__file__).parent / "results" / f"stack_crossover_{device.type}.md"
out.write_text("\n".join(lines))
print(f"wrote {out}")
