"""``flora train`` end to end on tiny settings, resume, Ctrl-C, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from flora.cli import main

TINY = ["--size", "tiny", "--batch-size", "4", "--corpus-mb", "0.2", "--eval-batches", "2"]
TINY += ["--rank", "4", "--no-progress"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def final_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("final:"))


@pytest.mark.parametrize("extra", [[], ["--accumulate", "2"], ["--optimizer", "adamw"]])
def test_train_end_to_end(tmp_path, capsys, extra):
    code, out, err = run(["train", *TINY, "--steps", "30", "--out", tmp_path, *extra], capsys)
    assert code == 0, err
    losses = [
        float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if "/30" in line
    ]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.3  # it learns (Flora r4: ~0.45-0.6)
    assert (tmp_path / "checkpoint.pt").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "loss.csv").read_text().count("\n") == 31
    for part in ("parameters", "gradients", "optimizer state", "accumulation buffers"):
        assert part in out
    if extra[:1] == ["--accumulate"]:
        assert "GradientAccumulator plan" in out
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 30


@pytest.mark.parametrize("extra", [[], ["--accumulate", "3"]])
def test_resume_continues_exactly(tmp_path, capsys, extra):
    args = ["train", *TINY, "--steps", "12", *extra]
    code, whole, _ = run([*args, "--out", tmp_path / "a"], capsys)
    assert code == 0
    code, first, _ = run([*args, "--out", tmp_path / "b", "--stop-at", "5"], capsys)
    assert code == 0 and "final: step 5" in first
    code, rest, _ = run([*args, "--out", tmp_path / "b", "--resume"], capsys)
    assert code == 0 and "resumed from" in rest and "at step 5" in rest
    assert final_line(whole) == final_line(rest)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["history"] == b["history"]


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "flora", "train", *TINY, "--steps", "100000"]
    cmd += ["--out", str(tmp_path), "--no-plot"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("training to step"):
            break
    time.sleep(1.0)  # a few steps
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: checkpoint saved at step" in out
    assert "Traceback" not in err
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["step"] < 100000


def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--rank", "0"], "rank"),
        (["--optimizer", "sgd"], "optimizer"),
        ([tmp_path / "missing.txt"], "no such file"),
        ([empty], "empty"),
        (["--out", blocker / "sub"], "cannot write to output folder"),
        (["--lr", "-1"], "--lr"),
        (
            ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "xpu9"],
            "device",
        ),
        (["--n-head", "3"], "divisible"),
    ]
    for extra, words in cases:
        out_dir = [] if "--out" in map(str, extra) else ["--out", tmp_path / "run"]
        code, out, err = run(["train", *TINY, "--steps", "2", *out_dir, *extra], capsys)
        assert code == 2, (extra, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("flora: error:"), err
        assert words in lines[0], (words, lines[0])


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path, capsys):
    garbage = b"not a checkpoint" * 10
    (tmp_path / "checkpoint.pt").write_bytes(garbage)
    code, _, err = run(["train", *TINY, "--steps", "2", "--out", tmp_path, "--resume"], capsys)
    assert code == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "checkpoint.pt").read_bytes() == garbage


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    code, _, _ = run(["train", *TINY, "--steps", "3", "--out", tmp_path], capsys)
    assert code == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    code, _, err = run(
        ["train", *TINY, "--steps", "3", "--out", tmp_path, "--resume", "--rank", "8"], capsys
    )
    assert code == 2 and "rank=4" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_python_m_flora_without_command_shows_help():
    out = subprocess.run(
        [sys.executable, "-m", "flora"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert out.returncode == 2 and "train" in out.stdout
