"""The examples run end to end at tiny sizes, so they cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "40", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32"]
TINY += ["--batch-size", "4", "--corpus-mb", "0.2", "--eval-batches", "2", "--rank", "4"]


@pytest.mark.parametrize(
    "extra", [["--optimizer", "flora"], ["--optimizer", "flora-adamw"], ["--accumulate", "2"]]
)
def test_train_gpt_stdlib_runs(extra):
    cmd = [sys.executable, str(ROOT / "examples" / "train_gpt_stdlib.py"), *TINY, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    assert "held-out loss" in out and "torch AdamW" in out
    final = out.strip().splitlines()[-1]  # "final: held-out loss X, state/AdamW Y"
    loss = float(final.split("held-out loss ")[1].split(",")[0])
    ratio = float(final.split("state/AdamW ")[1])
    assert loss < 5.55  # below the 256-way uniform guess, ln(256) = 5.545
    assert 0 < ratio < 1
    if "--accumulate" in extra:
        assert "GradientAccumulator plan" in out and "total accumulation" in out
