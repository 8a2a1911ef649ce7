"""aten ops per step and compressed 48x64 matrix, counted by the profiler (not timed).

Counts every ``aten::`` event of one steady ``step()`` (the fourth), nested ops included, for
torch's Adafactor and AdamW and for Flora / FloraAdamW with each basis: one matrix alone, and
twelve of one shape with and without the multi-tensor step (per matrix). A count does not
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


def count(make, matrices: int = 1) -> float:
    """aten ops of one steady step, per matrix, for ``matrices`` 48x64 matrices."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(48, 64)) for _ in range(matrices)]
    opt = make([(f"w{i}", w) for i, w in enumerate(ws)])
    for _ in range(4):
        for w in ws:
            w.grad = torch.randn(48, 64)
        if _ < 3:
            opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / matrices


ROWS = [
    ("torch.optim.Adafactor", lambda p: torch.optim.Adafactor([x for _, x in p])),
    ("torch.optim.AdamW (foreach=False)", lambda p: torch.optim.AdamW([x for _, x in p],
                                                                      foreach=False)),
    ("Flora r8, default (gradient basis)", lambda p, **kw: flora.Flora(p, rank=8, **kw)),
    ("Flora r8, orthonormal", lambda p, **kw: flora.Flora(
        p, rank=8, distribution="orthonormal", **kw)),
    ("Flora r8, orthonormal, cache_projection", lambda p, **kw: flora.Flora(
        p, rank=8, distribution="orthonormal", cache_projection=True, **kw)),
    ("Flora r8, gaussian", lambda p, **kw: flora.Flora(p, rank=8, distribution="gaussian", **kw)),
    ("FloraAdamW r8, default (subspace preconditioner)", lambda p, **kw: flora.FloraAdamW(
        p, rank=8, **kw)),
    ("FloraAdamW r8, subspace preconditioner, gradient basis", lambda p, **kw: flora.FloraAdamW(
        p, rank=8, distribution="gradient", **kw)),
    ("FloraAdamW r8, elementwise", lambda p, **kw: flora.FloraAdamW(
        p, rank=8, preconditioner="elementwise", **kw)),
]  # fmt: skip


def main() -> None:
    lines = [
        "# aten ops per step and compressed 48x64 matrix (profiler count, nested included)",
        "",
        "Reproduce: `python benchmarks/op_counts.py`",
        "",
        "One matrix alone takes the per-parameter loop; twelve of one shape (a transformer's",
        "layers) take the multi-tensor step (`foreach=None`, the default) — per matrix here —",
        "or the loop with `foreach=False`.",
        "",
        "| optimizer | one matrix | 12 matrices, foreach | 12 matrices, foreach=False |",
        "|---|---|---|---|",
    ]
    for name, make in ROWS:
        ours = "Flora" in name
        twelve = f"{count(make, 12):.1f}" if ours else "-"
        loop = f"{count(lambda p, make=make: make(p, foreach=False), 12):.1f}" if ours else "-"
        lines.append(f"| {name} | {count(make):.0f} | {twelve} | {loop} |")
    lines += ["", f"torch {torch.__version__}, Python {platform.python_version()}, CPU."]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
