"""Measured memory of the lean preset on the CPU: the resident set, not a formula.

Trains GPT-2-small shapes (``flora.gpt.SIZES["gpt2"]``, real bf16 weights; by default with
the lean preset's vocabulary blocks, :func:`flora.gpt.lean_config`) through the lean preset
(:func:`flora.lean_setup`: bf16 weights with stochastic rounding, bf16 state, compressed
accumulation of ``--accumulate`` micro-batches, step-in-backward) for ``--cycles``
optimizer steps, and measures how far the process's resident memory rises above where it
stood after building the model: the kernel's high-water mark (``VmHWM``, reset before the
run), with glibc told to return every freed block of 128 KiB or more at once, so that the
resident set follows the live tensors. That rise plus the parameters' exact bytes is the
measured peak of everything: parameters, gradients, optimizer state, accumulation buffers,
the optimizer's workspace and the activations. Activations are measured on their own in
the same run (the rise during one forward that keeps its autograd graph, no optimizer). The
default micro-batch is one token (``--tokens``), whose activations are about 0.002 bytes per
parameter, so the measured peak is what the planner counts, whose figure is printed beside
it; with longer sequences "the peak less the activations" is only a lower bound of it (at
the peak, inside backward, part of the activations is already freed). (The PyTorch
profiler's allocation events would be exact, but at this size they take more memory than
the machine has.)

    python benchmarks/lean_memory.py --out benchmarks/results/lean_memory_cpu.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

import flora
from flora.gpt import GPT, SIZES, lean_config
from flora.model_memory import lean_rows
from flora.training import tensor_bytes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _fixed_mmap_threshold() -> None:
    """Make glibc return every freed block of 128 KiB or more to the OS at once (a fixed
    mmap threshold: the dynamic one would keep freed blocks up to 32 MiB in the heap), so
    the resident set follows the live tensors."""
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 128 * 1024) and libc.mallopt(m_trim_threshold, 0)):
        raise RuntimeError("mallopt failed: this benchmark needs glibc")


def resident_peak(fn) -> tuple[int, int]:
    """(peak, final) growth of the resident set while ``fn()`` runs, in bytes: the kernel's
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) less the resident
    set before."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    start = _status_kib("VmRSS")
    fn()
    return 1024 * (_status_kib("VmHWM") - start), 1024 * (_status_kib("VmRSS") - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="gpt2", choices=list(SIZES))
    parser.add_argument("--accumulate", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--tokens", type=int, default=1,
        help="sequence length of a micro-batch (1: activations are negligible, so the peak is "
        "what the planner counts)",
    )  # fmt: skip
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument(
        "--whole-vocabulary",
        action="store_true",
        help="keep the embedding and head whole (not the lean preset's vocabulary blocks)",
    )
    parser.add_argument(
        "--tie-embeddings",
        action="store_true",
        help="GPT-2's weight tying: the head is the token embedding (124M parameters for gpt2)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    _fixed_mmap_threshold()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = SIZES[args.size] if args.whole_vocabulary else lean_config(SIZES[args.size])
    config = replace(config, tie_embeddings=args.tie_embeddings)
    model = GPT(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = tensor_bytes(model.parameters())
    gen = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(config.vocab_size, (1, args.tokens + 1), generator=gen)
        return idx[:, :-1], idx[:, 1:]

    x, y = batch()  # warm-up: the first forward and backward load code and caches
    model(x, y).backward()
    model.zero_grad(set_to_none=True)
    # activations alone: the peak of one forward with its autograd graph (what backward
    # then frees while the gradients appear), no optimizer, no accumulator
    held = []

    def forward() -> None:
        x, y = batch()
        held.append(model(x, y))

    activations, _ = resident_peak(forward)
    held.clear()

    setup = flora.lean_setup(model, accumulate=args.accumulate, rank=args.rank, kappa=1000)
    acc = setup.accumulator

    def train(cycles: int) -> None:
        for _ in range(cycles):
            for _ in range(args.accumulate):
                x, y = batch()
                with acc.micro_batch():
                    (model(x, y) / args.accumulate).backward()
            setup.optimizer.zero_grad(set_to_none=True)

    train(1)  # warm-up: the optimizer's first step creates its state and loads its code
    held_before = setup.optimizer.state_bytes() + acc.buffer_bytes()  # exact, between cycles
    peak, final = resident_peak(lambda: train(args.cycles))
    measured = param_bytes + held_before + peak
    state = setup.optimizer.plan().state_bytes
    buffers = acc.plan().state_bytes
    acc.remove()
    with torch.device("meta"):
        meta = GPT(config).to(torch.bfloat16)
    planned = dict(lean_rows(meta, rank=args.rank, kappa=1000, accumulate=args.accumulate))
    plan_total = planned["total (without activations)"]

    if args.whole_vocabulary or args.tie_embeddings:
        how = ", ".join(
            what
            for what, on in (("whole vocabulary", args.whole_vocabulary),
                             ("tied embeddings", args.tie_embeddings))
            if on
        )  # fmt: skip
        planner = f"flora.model_memory.lean_rows of GPT {args.size!r}, {how}"
    else:
        planner = f"flora plan --model {args.size} --lean --accumulate {args.accumulate}"

    def row(name: str, value: int) -> str:
        return f"| {name} | {value:,} | {value / n_params:.3f} |"

    lines = [
        f"# Lean preset memory, measured on the CPU: GPT {args.size!r} ({n_params:,} "
        f"parameters, vocabulary in {config.vocab_chunks} block(s)"
        + (", head tied to the embedding)" if args.tie_embeddings else ")"),
        "",
        "Reproduce: `python benchmarks/lean_memory.py"
        + (f" --size {args.size}" if args.size != "gpt2" else "")
        + (" --whole-vocabulary" if args.whole_vocabulary else "")
        + (" --tie-embeddings" if args.tie_embeddings else "")
        + (f" --tokens {args.tokens}" if args.tokens != 1 else "")
        + (f" --out {args.out}" if args.out else "")
        + "`",
        "",
        f"Lean preset (`flora.lean_setup`: Flora r{args.rank}, accumulate {args.accumulate}, "
        f"step-in-backward), one warm-up step, then {args.cycles} measured optimizer steps of "
        f"{args.accumulate} micro-batches "
        f"of 1 x {args.tokens} tokens; the rise of the resident set (`VmHWM`, glibc's mmap "
        "threshold fixed at 128 KiB) above where it stood after the warm-up step, plus the "
        "exact bytes of the parameters, state and buffers then held.",
        "",
        "| | bytes | bytes/parameter |",
        "|---|---|---|",
        row("parameters (bf16, exact)", param_bytes),
        row("optimizer state after the run (exact)", state),
        row("accumulation buffers (exact)", buffers),
        row("**measured peak of all tensor memory**", measured),
        row(f"  of which activations of one micro-batch ({args.tokens} tokens, measured)",
            activations),
        row("  measured peak less those activations", measured - activations),
        row(f"planner (`{planner}`): total without activations", plan_total),
        row("  planner: gradients at their peak", planned["gradients at their peak"]),
        row("resident growth left after the run", final),
        "",
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"flora-optim {flora.__version__}.",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
