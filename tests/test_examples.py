"""The examples run end to end at tiny sizes, so they cannot rot."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # examples as subprocesses; `make test-fast` skips them

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


def run_example(args, tmp_path):
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a crashing worker prints where it was
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False, env=env
    )
    assert out.returncode == 0, f"stdout:\n{out.stdout[-1500:]}\nstderr:\n{out.stderr[-3000:]}"
    return out.stdout


def test_accelerate_example_runs(tmp_path):
    pytest.importorskip("accelerate")
    script = ROOT / "examples" / "accelerate_accumulate.py"
    out = run_example([sys.executable, str(script), "--steps", "6"], tmp_path)
    assert "final: loss" in out and "cycles 6" in out


def test_hf_trainer_example_runs(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    script = ROOT / "examples" / "hf_trainer.py"
    args = [sys.executable, str(script), "--steps", "4", "--n-layer", "1", "--out", "run"]
    out = run_example(args, tmp_path)
    final = out.strip().splitlines()[-1]
    assert final.startswith("final: step 4")
    assert float(final.split("grad_norm ")[1].split(",")[0]) > 0
    assert (tmp_path / "run" / "checkpoint-4").is_dir()


def test_ddp_example_runs_with_torchrun(tmp_path):
    script = ROOT / "examples" / "ddp_accumulate.py"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args += [str(script), "--steps", "5"]
    out = run_example(args, tmp_path)
    line = next(x for x in out.splitlines() if "all-reduced" in x)
    sent = int(line.split("all-reduced ")[1].split(" bytes")[0].replace(",", ""))
    full = int(line.split("full gradients: ")[1].rstrip(")").replace(",", ""))
    assert 0 < sent < full / 5
    assert "final: loss" in out


STATE_LINE = re.compile(
    r"^rank (\d+): optimizer state ([\d,]+) bytes \(whole model on one process: ([\d,]+)\)$"
)


def test_fsdp2_example_runs_and_resumes_at_another_world_size(tmp_path):
    script = ROOT / "examples" / "fsdp2_gpt.py"

    def torchrun(nproc, *extra):
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        return run_example([*args, "--nproc-per-node", str(nproc), str(script), *extra], tmp_path)

    out = torchrun(2, "--steps", "5", "--save", "ckpt")
    states = [m.groups() for m in map(STATE_LINE.match, out.splitlines()) if m]
    assert sorted(int(r) for r, _, _ in states) == [0, 1]  # exactly one line per rank
    for _, local, whole in states:
        local, whole = int(local.replace(",", "")), int(whole.replace(",", ""))
        # the row-sharded states halve; the column factors and the gradient bases (over the
        # columns) are on every rank: 0.67 here
        assert local < 0.75 * whole
    assert re.search(r"^final: step 5, loss [\d.]+, world 2", out, re.M)
    out = torchrun(1, "--steps", "7", "--resume", "ckpt", "--save", "ckpt1")
    assert "resumed from ckpt at step 5, world size 1" in out
    assert re.search(r"^final: step 7, loss [\d.]+, world 1", out, re.M)
    torchrun(1, "--steps", "2")  # no --save: nothing written into the working directory
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt", "ckpt1"]
