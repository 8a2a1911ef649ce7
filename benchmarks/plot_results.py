"""Draw docs/results.png from the committed benchmark tables (no re-measurement).

    python benchmarks/plot_results.py      # needs matplotlib (make bench-setup or .[plot])

Left: optimizer state / torch AdamW at GPT-2-small shapes (benchmarks/results/
optimizer_step_cpu.md). Right: accumulation buffer bytes and time per cycle relative to naive
accumulation, by rank (benchmarks/results/accumulation_cpu.md).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]


def table(path: Path, first_header: str) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


step = table(ROOT / "benchmarks/results/optimizer_step_cpu.md", "optimizer")
acc = table(ROOT / "benchmarks/results/accumulation_cpu.md", "row")

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
names = [r["optimizer"] for r in step if "cached" not in r["optimizer"]]
values = [float(r["state / AdamW"]) for r in step if "cached" not in r["optimizer"]]
colors = ["tab:green" if n.startswith("Flora") else "tab:gray" for n in names]
left.barh(names, values, color=colors)
left.set_xscale("log")
left.set_xlabel("optimizer state / torch AdamW (log)")
left.set_title("GPT-2-small shapes, 124M parameters")
left.invert_yaxis()

ranks = [r for r in acc if r["row"].startswith("flora r") and "," not in r["row"]]
rank_values = [int(r["row"].split()[1][1:]) for r in ranks]
right.plot(rank_values, [float(r["/ naive"]) for r in ranks], "o-", label="buffer bytes / naive")
right.plot(
    rank_values, [float(r["time / naive"]) for r in ranks], "s-", label="time per cycle / naive"
)
right.axhline(1.0, color="gray", lw=0.8)
right.set_xscale("log", base=2)
right.set_xlabel("rank")
right.set_title("compressed accumulation, tau = 16 (CPU)")
right.legend()
fig.tight_layout()
out = ROOT / "docs" / "results.png"
fig.savefig(out, dpi=100)
print(f"wrote {out}")
