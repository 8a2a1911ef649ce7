"""Summarise the quality study (issue 17): held-out loss against optimizer-state bytes.

Reads every LM result of the study (``benchmarks/results/quality/lm_*.json``, plus the
seed-0 peers of ``benchmarks/results/compare/lm_quick.json``, the same configuration),
groups the rows by setting (width, steps) and optimizer, and writes
``benchmarks/results/quality/summary.md`` (mean over seeds of each row's best-of-sweep loss,
its spread, the gaps to full momentum and to APOLLO) and ``pareto.png`` (loss against state
bytes for every row, the Pareto front of each setting drawn as a line).

    python benchmarks/quality_summary.py
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quality"
EXTRA = [ROOT / "benchmarks" / "results" / "compare" / "lm_quick.json"]


def setting_of(command: str) -> tuple[int, int]:
    """(hidden width, steps) of a `flora-experiments lm --quick` command."""
    steps = re.search(r"--steps (\d+)", command)
    hidden = re.search(r"--set hidden=(\d+)", command)
    return (int(hidden.group(1)) if hidden else 128, int(steps.group(1)) if steps else 200)


def load() -> dict[tuple[int, int], dict[str, dict[int, dict]]]:
    table: dict[tuple[int, int], dict[str, dict[int, dict]]] = {}
    for path in sorted(RESULTS.glob("lm_*.json")) + EXTRA:
        data = json.loads(path.read_text())
        command, seed = data["env"]["command"], data["env"]["seed"]
        if " lm " not in f" {command} " or "--quick" not in command:
            continue
        setting = setting_of(command)
        kappa = re.search(r"--set kappa=(\d+)", command)  # a variant row, not a new setting
        suffix = f" (kappa {kappa.group(1)})" if kappa else ""
        fixed = "--set lr=" in command  # a seed rerun at another seed's best step size
        for row in data["rows"]:
            name = row["optimizer"] + suffix
            if "--tag lean-" in command and row["optimizer"] == "flora-gradient":
                name += " (Philox generator)"  # the lean study's baseline, rerun after v2
            if "--tag lean-preset-seed" in command:  # before the sketch was the default
                name += " (projection accumulation)"
            seen = table.setdefault(setting, {}).setdefault(name, {})
            entry = {**row, "file": path.name, "fixed_lr": fixed, "single_lr": fixed}
            old = seen.get(seed)
            if old is not None and old["single_lr"] and fixed and old["lr"] != row["lr"]:
                # one sweep run as single step sizes (`--set lr=` each): keep its best
                best = min(old, entry, key=lambda r: r["val_loss"])
                seen[seed] = {**best, "fixed_lr": False, "single_lr": True}
                continue
            if seed in seen and not math.isclose(seen[seed]["val_loss"], row["val_loss"]):
                raise SystemExit(f"{path.name}: {row['optimizer']} seed {seed} differs")
            seen.setdefault(seed, entry)
    return table


def same_seed_gap(row: dict[int, dict], ref: dict[int, dict] | None) -> str:
    """The gap of ``row``'s mean loss to ``ref``'s over the seeds both ran."""
    common = sorted(set(row) & set(ref or {}))
    if not common:
        return "-"
    mean = statistics.mean(row[s]["val_loss"] for s in common)
    base = statistics.mean(ref[s]["val_loss"] for s in common)  # type: ignore[index]
    full = len(common) == len(row) == len(ref)  # type: ignore[arg-type]
    seeds = "" if full else f" (seed {', '.join(map(str, common))})"
    return f"{100 * (mean / base - 1):+.2f}%{seeds}"


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    front, best = [], math.inf
    for x, y, name in sorted(points):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


def main() -> None:
    table = load()
    lines = [
        "# Quality study: held-out loss against optimizer-state bytes (LM benchmark)",
        "",
        "Reproduce: the commands in each JSON's `env.command` (listed below), then "
        "`python benchmarks/quality_summary.py`.",
        "",
        "Each row's loss is its best over a step-size sweep widened past any edge, except "
        "seeds marked (fixed): run at the best step size of the seed-0 sweep only, to save "
        "compute at width 512. The mean and the spread (max - min) are over the seeds run. "
        "Gaps are of the mean loss over the seeds both rows ran (named when fewer than "
        "all), in percent: negative is better.",
        "",
    ]
    plots = {}
    for setting in sorted(table):
        hidden, steps = setting
        rows = table[setting]
        means = {o: statistics.mean(r["val_loss"] for r in by.values()) for o, by in rows.items()}
        lines += [
            f"## width {hidden}, rank 32 (r/n = 1/{hidden // 32}), {steps} steps",
            "",
            "| optimizer | seeds | state bytes | held-out loss | spread | ppl | vs full momentum "
            "| vs APOLLO | best lr per seed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        points = []
        for o in sorted(rows, key=lambda o: means[o]):
            by = rows[o]
            losses = [r["val_loss"] for r in by.values()]
            state = next(iter(by.values()))["state_bytes"]
            gap = same_seed_gap(by, rows.get("adafactor-momentum"))
            gap_a = same_seed_gap(by, rows.get("apollo"))
            lrs = ", ".join(
                f"{s}: {r['lr']:g}{' (edge)' if r.get('lr_at_edge') else ''}"
                f"{' (fixed)' if r['fixed_lr'] else ''}"
                for s, r in sorted(by.items())
            )
            lines.append(
                f"| {o} | {len(by)} | {state:,} | {means[o]:.4f} | {max(losses) - min(losses):.4f} "
                f"| {math.exp(means[o]):.3f} | {gap} | {gap_a} | {lrs} |"
            )
            points.append((float(state), means[o], o))
        front = pareto(points)
        lines += ["", "Pareto front (state, loss): " + ", ".join(n for _, _, n in front), ""]
        plots[setting] = (points, front)
    commands = sorted({json.loads(p.read_text())["env"]["command"]
                       for p in sorted(RESULTS.glob("lm_*.json")) + EXTRA})  # fmt: skip
    lines += accumulation_section()
    lines += ["Commands:", ""] + [f"- `{c}`" for c in commands] + ["", "![pareto](pareto.png)"]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(plots)
    print("\n".join(lines))


def accumulation_section() -> list[str]:
    """Table 1's MiniLM accumulation row: naive accumulation against the accumulator at
    r = n/8 with each projection family and number of optimizer steps, mean test accuracy
    over seeds; gaps are to naive accumulation with as many steps."""
    table: dict[tuple[int, str, str], dict[int, float]] = {}
    commands = set()
    for path in sorted(RESULTS.glob("accumulate_*.json")):
        data = json.loads(path.read_text())
        command, seed = data["env"]["command"], data["env"]["seed"]
        commands.add(command)
        family = re.search(r"--set distribution=(\w+)", command)
        family = family.group(1) if family else "gaussian"
        if re.search(r"--set '?exact_rows=True", command):
            family += ", exact rows"
        if re.search(r"--set '?exclude=", command):  # parameters left uncompressed
            family += ", embeddings uncompressed" if "embeddings" in command else ", exclude"
        steps = re.search(r"--set steps=(\d+)", command)
        steps = int(steps.group(1)) if steps else 25  # the --quick default
        for row in data["rows"]:
            label = "(naive)" if row["method"] == "naive" else family
            table.setdefault((steps, row["method"], label), {})[seed] = row["accuracy"]
    if not table:
        return []
    naive = {s: by for (s, m, _), by in table.items() if m == "naive"}
    lines = [
        "## MiniLM gradient accumulation (Table 1 row), tau = 16",
        "",
        "Gaps are to naive accumulation with as many optimizer steps, over the same seeds.",
        "",
        "| optimizer steps | method | projection | seeds | test accuracy (mean) | spread "
        "| naive, same seeds | vs naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (steps, method, family), by in sorted(table.items()):
        seeds = sorted(by)
        values = [by[k] for k in seeds]
        mean, ref = statistics.mean(values), statistics.mean(naive[steps][k] for k in seeds)
        lines.append(
            f"| {steps} | {method} | {family} | {', '.join(map(str, seeds))} | {mean:.4f} "
            f"| {max(values) - min(values):.4f} | {ref:.4f} | {100 * (mean / ref - 1):+.2f}% |"
        )
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in sorted(commands)), ""]
    return lines


def _plot(plots) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plots), figsize=(6 * len(plots), 4.5), squeeze=False)
    for ax, ((hidden, steps), (points, front)) in zip(axes[0], sorted(plots.items()), strict=True):
        for x, y, name in points:
            ax.scatter(x, y, color="tab:red" if name.startswith("flora") else "tab:gray")
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("optimizer state bytes")
        ax.set_ylabel("held-out loss (nats/byte), mean over seeds")
        ax.set_title(f"width {hidden}, rank 32, {steps} steps")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "pareto.png", dpi=120)


if __name__ == "__main__":
    main()
