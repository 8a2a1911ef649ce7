"""``flora train`` end to end on tiny settings, resume, Ctrl-C, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flora.cli import main
from flora.training import load_checkpoint

TINY = ["--size", "tiny", "--batch-size", "4", "--corpus-mb", "0.2", "--eval-batches", "2"]
TINY += ["--rank", "4", "--no-progress"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def final_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("final:"))


@pytest.mark.parametrize(
    "extra", [[], ["--accumulate", "2"], ["--optimizer", "adamw"], ["--lean", "--accumulate", "2"]]
)
def test_train_end_to_end(tmp_path, capsys, extra):
    code, out, err = run(["train", *TINY, "--steps", "30", "--out", tmp_path, *extra], capsys)
    assert code == 0, err
    losses = [
        float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if "/30" in line
    ]
    assert (
        len(losses) == 11 and losses[-1] < losses[0] - 0.3
    )  # step 1, then every tenth  # it learns (Flora r4: ~0.45-0.6)
    assert (tmp_path / "checkpoint.pt").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "loss.csv").read_text().count("\n") == 31
    for part in ("parameters", "gradients", "optimizer state", "accumulation buffers"):
        assert part in out
    if "--accumulate" in extra:
        assert "GradientAccumulator plan" in out
    if "--lean" in extra:  # what it turned on, and bytes per parameter with the total
        assert "lean preset: bf16 weights without float32 masters" in out
        assert "parameters                     " in out and "    2.000" in out
        assert "total (without activations)" in out
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 30


@pytest.mark.parametrize("extra", [[], ["--accumulate", "3"], ["--lean", "--accumulate", "3"]])
def test_resume_continues_exactly(tmp_path, capsys, extra):
    args = ["train", *TINY, "--steps", "12", *extra]
    code, whole, _ = run([*args, "--out", tmp_path / "a"], capsys)
    assert code == 0
    code, first, _ = run([*args, "--out", tmp_path / "b", "--stop-at", "5"], capsys)
    assert code == 0 and "final: step 5" in first
    code, rest, _ = run([*args, "--out", tmp_path / "b", "--resume"], capsys)
    assert code == 0 and "resumed from" in rest and "at step 5" in rest
    assert final_line(whole) == final_line(rest)
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["history"] == b["history"]


def _start(tmp_path, *extra):
    """``flora train`` in a subprocess, read until its first progress line (no sleeps)."""
    cmd = [sys.executable, "-m", "flora", "train", *TINY, "--out", str(tmp_path), "--no-plot"]
    proc = subprocess.Popen(
        [*cmd, *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen = []
    for line in proc.stdout:  # blocks until the run prints; ends if it exits
        seen.append(line)
        if line.startswith("step "):
            return proc, "".join(seen)
    raise AssertionError("no progress line: " + "".join(seen) + proc.stderr.read())


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint(tmp_path, sig, code):
    proc, _ = _start(tmp_path, "--steps", "100000", "--eval-every", "0")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"interrupted ({signal.Signals(sig).name}): checkpoint saved at step" in out
    assert "Traceback" not in err
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert 0 < ckpt["step"] < 100000


def test_a_signal_during_the_final_evaluation_still_saves(tmp_path):
    """Ctrl-C in the final evaluation used to exit 130 with no checkpoint. The evaluation is
    made long (many batches) and the signal is sent once the last training step printed."""
    proc, _ = _start(tmp_path, "--steps", "10", "--eval-every", "0", "--eval-batches", "100000")
    for line in proc.stdout:
        if line.startswith("step    10/10"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "final evaluation cut short" in out and "Traceback" not in err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 10


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
        (["--corpus-mb", "inf"], "--corpus-mb"),
        (["--seed", "-5", "--accumulate", "2"], "--seed"),
        (["--seed", str(2**70)], "--seed"),
        (["--device", "meta"], "meta holds no data"),
        (["--device", "mps"], "not usable on this machine"),
        (["--device", "xpu"], "not usable on this machine"),
        (["--resume", "--overwrite"], "exclude each other"),
        (["--lean", "--optimizer", "adamw"], "--lean needs"),
        (["--lean", "--dtype", "float32"], "--lean trains in bfloat16"),
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


def test_a_new_run_refuses_to_replace_a_checkpoint(tmp_path, capsys):
    code, _, _ = run(["train", *TINY, "--steps", "2", "--out", tmp_path], capsys)
    assert code == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    code, _, err = run(["train", *TINY, "--steps", "2", "--out", tmp_path], capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    code, _, _ = run(["train", *TINY, "--steps", "3", "--out", tmp_path, "--overwrite"], capsys)
    assert code == 0 and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


def test_a_finished_run_can_be_extended(tmp_path, capsys):
    code, _, _ = run(["train", *TINY, "--steps", "4", "--out", tmp_path], capsys)
    assert code == 0
    code, out, err = run(["train", *TINY, "--steps", "6", "--out", tmp_path, "--resume"], capsys)
    assert code == 0, err
    assert "extending the run from 4 to 6 steps" in out and "final: step 6" in out
    code, _, err = run(["train", *TINY, "--steps", "5", "--out", tmp_path, "--resume"], capsys)
    assert code == 2 and "beyond --steps 5" in err


def test_a_nan_loss_stops_with_an_error(tmp_path, capsys):
    code, out, err = run(["train", *TINY, "--steps", "50", "--out", tmp_path, "--lr", "1e30",
                          "--optimizer", "adamw"], capsys)  # fmt: skip
    assert code == 1, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the training loss became nan" in lines[0]
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_damaged_checkpoint_is_refused(tmp_path, capsys):
    code, _, _ = run(["train", *TINY, "--steps", "2", "--out", tmp_path], capsys)
    assert code == 0
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    flipped = bytearray(good)
    payload = good.index(b"model")  # a byte inside the checked payload
    flipped[payload] ^= 0x01
    path.write_bytes(bytes(flipped))
    code, _, err = run(["train", *TINY, "--steps", "2", "--out", tmp_path, "--resume"], capsys)
    assert code == 2 and "SHA-256 does not match" in err


@pytest.mark.parametrize("damage", ["missing optimizer", "wrong shape", "bad generator"])
def test_a_checkpoint_with_wrong_contents_is_one_error(tmp_path, capsys, damage):
    from flora.training import _save_atomic

    code, _, _ = run(["train", *TINY, "--steps", "2", "--out", tmp_path], capsys)
    assert code == 0
    path = tmp_path / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    if damage == "missing optimizer":
        del ckpt["optimizer"]
    elif damage == "wrong shape":
        key = next(k for k in ckpt["model"] if k.endswith("weight"))
        ckpt["model"][key] = torch.zeros(3, 3)
    else:
        ckpt["generator"] = torch.zeros(3, dtype=torch.uint8)
    _save_atomic(ckpt, path)
    code, _, err = run(["train", *TINY, "--steps", "2", "--out", tmp_path, "--resume"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("flora: error:"), err


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys):
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux), which fails every write as a full disk does")
    code, _, _ = run(["train", *TINY, "--steps", "2", "--out", tmp_path], capsys)
    assert code == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt.tmp").symlink_to("/dev/full")  # the save writes through it
    code, _, err = run(["train", *TINY, "--steps", "4", "--out", tmp_path, "--resume"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "No space left on device" in lines[0] and "previous checkpoint is kept" in lines[0]
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    # and the start-up probe writes real bytes, so it fails on a full disk
    (tmp_path / ".write-test").symlink_to("/dev/full")
    code, _, err = run(["train", *TINY, "--steps", "4", "--out", tmp_path, "--resume"], capsys)
    assert code == 2 and "cannot write to output folder" in err


def test_binary_files_are_skipped_and_the_held_out_files_named(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"t{i}.txt").write_text(f"text {i} " * 4000)
    (corpus / "z.bin").write_bytes(bytes(range(256)) * 100)  # sorts last: it would be held out
    out_dir = tmp_path / "run"
    code, out, err = run(["train", *TINY, "--steps", "2", "--out", out_dir, corpus], capsys)
    assert code == 0, err
    assert "skipped 1 non-text file(s)" in out and "z.bin" in out
    held = next(line for line in out.splitlines() if line.startswith("held out:"))
    assert "t2.txt" in held and "z.bin" not in held


def test_corpus_mb_reads_only_what_it_needs(tmp_path):
    import tracemalloc

    from flora.data import load_corpus

    big = tmp_path / "big.txt"
    big.write_bytes(b"abcdefgh\n" * (2**21))  # 20 MiB
    tracemalloc.start()
    corpus = load_corpus([big], max_bytes=50_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(corpus.data) == 50_000
    assert peak < 5 * 2**20  # reading the whole file would need 20 MiB


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path, capsys):
    code, _, _ = run(["train", *TINY, "--steps", "2", "--out", tmp_path], capsys)
    assert code == 0
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    torch.save({**ckpt, "format": "flora-train/1"}, tmp_path / "checkpoint.pt")  # the old layout
    code, out, err = run(["train", *TINY, "--steps", "3", "--out", tmp_path, "--resume"], capsys)
    assert code == 0 and "at step 2" in out, err
