"""aten ops per step of one compressed 48x64 matrix, counted by the profiler (not timed).

Counts every ``aten::`` event of one steady ``step()`` (the fourth), nested ops included, for
torch's Adafactor and AdamW and for Flora / FloraAdamW with each basis. A count does not
depend on machine load, so it can run beside other work.

    python benchmarks/op_counts.py

Writes benchmarks/results/op_counts_cpu.md.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import flora

OUT = Path(__file__).resolve().parent / "results" / "op_counts_cpu.md"


def count(make) -> int:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 64))
    opt = make([("w", w)])
    for _ in range(3):
        w.grad = torch.randn(48, 64)
        opt.step()
    w.grad = torch.randn(48, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


ROWS = [
    ("torch.optim.Adafactor", lambda p: torch.optim.Adafactor([x for _, x in p])),
    ("torch.optim.AdamW (foreach=False)", lambda p: torch.optim.AdamW([x for _, x in p],
                                                                      foreach=False)),
    ("Flora r8, default (gradient basis)", lambda p: flora.Flora(p, rank=8)),
    ("Flora r8, orthonormal", lambda p: flora.Flora(p, rank=8, distribution="orthonormal")),
    ("Flora r8, orthonormal, cache_projection", lambda p: flora.Flora(
        p, rank=8, distribution="orthonormal", cache_projection=True)),
    ("Flora r8, gaussian", lambda p: flora.Flora(p, rank=8, distribution="gaussian")),
    ("FloraAdamW r8, default (subspace preconditioner)", lambda p: flora.FloraAdamW(p, rank=8)),
    ("FloraAdamW r8, subspace preconditioner, gradient basis", lambda p: flora.FloraAdamW(
        p, rank=8, distribution="gradient")),
    ("FloraAdamW r8, elementwise", lambda p: flora.FloraAdamW(
        p, rank=8, preconditioner="elementwise")),
]  # fmt: skip


def main() -> None:
    lines = [
        "# aten ops per step, one compressed 48x64 matrix (profiler count, nested included)",
        "",
        "Reproduce: `python benchmarks/op_counts.py`",
        "",
        "| optimizer | aten ops in one steady step() |",
        "|---|---|",
    ]
    lines += [f"| {name} | {count(make)} |" for name, make in ROWS]
    lines += ["", f"torch {torch.__version__}, Python {platform.python_version()}, CPU."]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
