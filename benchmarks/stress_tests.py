"""Run the distributed and example tests many times in a row and count the failures.

Not part of CI (20 rounds take about 25 minutes on 2 cores). Every round is a fresh pytest
process, so a hang or a crash in one round cannot hide behind another; a round that runs past
``--timeout`` counts as a failure.

    python benchmarks/stress_tests.py --rounds 20   # writes benchmarks/results/stress_tests.md
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_distributed.py",
    "tests/test_accumulation_distributed.py",
    "tests/test_distributed_checkpoint.py",
    "tests/test_fsdp.py",
    "tests/test_fsdp_side.py",
    "tests/test_replicas.py",
    "tests/test_examples.py",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per round")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/stress_tests.md"))
    args = parser.parse_args()
    rows, failures = [], 0
    for i in range(1, args.rounds + 1):
        start = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
        try:
            done = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout
            )
            summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "?"
            ok = done.returncode == 0
            if not ok:
                failed = [x for x in done.stdout.splitlines() if x.startswith("FAILED")]
                summary += " — " + "; ".join(failed)
        except subprocess.TimeoutExpired:
            ok, summary = False, f"timed out after {args.timeout} s"
        failures += not ok
        rows.append(f"| {i} | {'pass' if ok else 'FAIL'} | {time.monotonic() - start:.0f} | "
                    f"{summary} |")  # fmt: skip
        print(rows[-1], flush=True)
    lines = [
        "# Stress run: distributed and example tests, many rounds in a row",
        "",
        f"Reproduce: `python benchmarks/stress_tests.py --rounds {args.rounds}`",
        "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        f"Tests: {', '.join(TESTS)}.",
        "",
        f"**{failures} of {args.rounds} rounds failed.**",
        "",
        "| round | result | seconds | pytest summary |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"{failures} of {args.rounds} rounds failed; wrote {args.out}")


if __name__ == "__main__":
    main()
