"""Results of one experiment: a Markdown table, the raw rows as JSON and a plot, each
recording the command, versions, seed and machine next to the numbers."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["Results", "environment"]

PACKAGES = (
    "torch",
    "flora-optim",
    "flora-opt",
    "galore-torch",
    "apollo-torch",
    "peft",
    "transformers",
)


def environment(seed: int) -> dict[str, Any]:
    """Command, package versions, seed and machine of this process."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    argv = list(sys.argv) if sys.argv and sys.argv[0] else []
    if argv and argv[0].endswith(".py"):  # a script: how to run it from the repository
        argv = ["python", os.path.relpath(argv[0]), *argv[1:]]
    elif argv:
        argv[0] = Path(argv[0]).name
    return {
        "command": shlex.join(argv),
        "versions": versions,
        "seed": seed,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@dataclass
class Results:
    """Rows of one experiment plus what is needed to reproduce them."""

    name: str  # file stem, e.g. "pilot_quick"
    title: str
    columns: list[tuple[str, str]]  # (row key, column header)
    seed: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # label -> (x, y)
    curve_axes: tuple[str, str] = ("step", "value")
    curve_log_x: bool = False
    bars: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> category -> bytes
    points: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (x, y)
    point_axes: tuple[str, str] = ("memory", "value")

    def markdown(self, env: dict[str, Any]) -> str:
        lines = [f"# {self.title}", "", f"Reproduce: `{env['command']}`", ""]
        lines.append("| " + " | ".join(h for _, h in self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(k)) for k, _ in self.columns) + " |")
        if self.notes:
            lines += ["", *self.notes]
        m = env["machine"]
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        lines += [
            "",
            f"Seed {env['seed']}; {env['date']}; {m['platform']}, Python {m['python']}, "
            f"{m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
            f"GPU: {m['gpu'] or 'none'}.",
            f"Versions: {versions}.",
        ]
        if getattr(self, "plotted", False):
            lines += ["", f"![plot]({self.name}.png)"]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``<name>.md``, ``<name>.json`` and (with curves and matplotlib) ``<name>.png``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        env = environment(self.seed)
        written = [folder / f"{self.name}.md", folder / f"{self.name}.json"]
        payload = {"title": self.title, "env": env, "rows": self.rows, "curves": self.curves}
        payload["bars"] = self.bars
        payload["points"] = self.points
        written[1].write_text(json.dumps(payload, indent=1, default=str) + "\n")
        png = self._plot(folder / f"{self.name}.png")
        self.plotted = png is not None
        if png is not None:
            written.append(png)
        written[0].write_text(self.markdown(env))
        return written

    def _plot(self, path: Path) -> Path | None:
        """Memory bars (or, without them, curves) on the left, labelled points (e.g. quality
        against memory) on the right; one panel when only one of them is set."""
        panels = [p for p in ("bars" if self.bars else "curves", "points") if getattr(self, p)]
        if not panels:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            getattr(self, f"_draw_{panel}")(ax)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(self.title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _draw_bars(self, ax) -> None:  # stacked horizontal bars, one per label, in MiB
        labels = list(self.bars)
        categories = list(next(iter(self.bars.values())))
        left = [0.0] * len(labels)
        for cat in categories:
            widths = [self.bars[label][cat] / 2**20 for label in labels]
            ax.barh(labels, widths, left=left, label=cat.replace("_", " "))
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("MiB")

    def _draw_curves(self, ax) -> None:
        for label, curve in self.curves.items():
            if curve:
                xs, ys = zip(*curve, strict=True)
                ax.plot(xs, ys, "o-" if len(curve) < 12 else "-", label=label, ms=3)
        if self.curve_log_x:
            ax.set_xscale("log")
        ax.set_xlabel(self.curve_axes[0])
        ax.set_ylabel(self.curve_axes[1])

    def _draw_points(self, ax) -> None:
        for label, (x, y) in self.points.items():
            ax.plot([x], [y], "o", label=label)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(self.point_axes[0])
        ax.set_ylabel(self.point_axes[1])
