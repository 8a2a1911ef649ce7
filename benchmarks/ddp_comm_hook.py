"""Communicated bytes and training quality of DDP gradient compression: plain all-reduce vs
flora_comm_hook vs PowerSGD, in one run (2 gloo processes on CPU by default).

Each configuration trains the same byte-level GPT (flora.gpt) on the Python stdlib source
with torch AdamW for ``--steps`` steps, each rank on its own batches. Bytes are counted from
every tensor passed to ``torch.distributed.all_reduce`` by the hooks (plain DDP: the gradient
size, reduced in C++). Held-out loss is measured on rank 0 at the end; time per step is a
ratio to plain DDP in the same run.

    python benchmarks/ddp_comm_hook.py                   # ~5 minutes on 2 CPU cores
    python benchmarks/ddp_comm_hook.py --steps 50        # quick look

Writes benchmarks/results/ddp_comm_hook_cpu.md.

DDP runs with a single bucket (``bucket_cap_mb=1024``) for every row: with several buckets,
torch's ``powerSGD_hook`` aborted on gloo with a collective size mismatch in this torch
version (cause not investigated; ``batched_powerSGD_hook`` failed an internal assertion).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

import flora
from flora.data import get_batch, load_corpus
from flora.distributed import FloraCommState, flora_comm_hook
from flora.gpt import GPT, GPTConfig

CONFIGS = ["plain", "flora r8", "flora r32", "flora r64", "powersgd r4", "powersgd r16"]


def worker(rank: int, world: int, args: argparse.Namespace, name: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.rdzv", rank=rank, world_size=world)
    sent = [0]
    real = dist.all_reduce

    def counting(tensor, *a, **k):
        sent[0] += tensor.numel() * tensor.element_size()
        return real(tensor, *a, **k)

    dist.all_reduce = counting
    corpus = load_corpus(max_bytes=2**21)
    torch.manual_seed(0)
    cfg = GPTConfig(args.layers, 4, args.embd, args.block)
    model = GPT(cfg)
    ddp = DistributedDataParallel(model, bucket_cap_mb=1024)  # one bucket (see note)
    kind, _, r = name.partition(" r")
    if kind == "flora":
        ddp.register_comm_hook(FloraCommState(ddp, rank=int(r), seed=1), flora_comm_hook)
    elif kind == "powersgd":
        state = powersgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=int(r), start_powerSGD_iter=2
        )
        ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    gen = torch.Generator().manual_seed(100 + rank)
    start, bytes_per_step = None, []
    for step in range(args.steps):
        if step == 5:
            start = time.perf_counter()
        x, y = get_batch(corpus.train, args.batch, args.block, gen)
        sent[0] = 0
        ddp(x, y).backward()
        bytes_per_step.append(sent[0])
        opt.step()
        opt.zero_grad()
        sched.step()
    elapsed = (time.perf_counter() - start) / (args.steps - 5)
    if rank == 0:
        model.eval()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            val = sum(float(model(*get_batch(corpus.val, 16, args.block, g))) for _ in range(40))
        torch.save(
            {
                "val": val / 40,
                "bytes": bytes_per_step[-1],
                "time": elapsed,
                "params": sum(p.numel() for p in model.parameters()),
            },
            f"{out}.pt",
        )
    dist.all_reduce = real
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/ddp_comm_hook_cpu.md")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            out = str(Path(tmp) / name.replace(" ", "_"))
            mp.start_processes(worker, args=(args.world, args, name, out), nprocs=args.world)
            results[name] = torch.load(f"{out}.pt", weights_only=True)
            print(name, results[name], flush=True)
    plain = results["plain"]
    full = 4 * plain["params"]
    lines = [
        "# DDP gradient compression: bytes and quality (CPU, gloo)",
        "",
        f"{args.world} processes, byte-level GPT ({plain['params'] / 1e6:.2f}M parameters, "
        f"{args.layers} layers, d={args.embd}) on the CPython stdlib source, batch "
        f"{args.batch}x{args.block} per rank, torch AdamW lr {args.lr} cosine, {args.steps} "
        "steps. Bytes: tensors the hook passed to all_reduce in the last step, per rank (plain "
        "DDP: all gradients). Time per step after 5 warm-up steps, as a ratio to plain DDP. "
        "One DDP bucket for every row (torch's powerSGD_hook aborted on gloo with several).",
        "",
        "| hook | bytes / step | / plain | held-out loss | time / plain |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        b = full if name == "plain" else r["bytes"]
        ratio = r["time"] / plain["time"]
        lines.append(f"| {name} | {b:,} | {b / full:.3f} | {r['val']:.4f} | {ratio:.2f} |")
    lines += [
        "",
        "Command: `" + " ".join(["python benchmarks/ddp_comm_hook.py", *sys.argv[1:]]) + "`",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"flora {flora.__version__}.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
