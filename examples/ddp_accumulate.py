"""Data-parallel training with compressed accumulation: one all-reduce of the rank-r buffers
per cycle instead of full-size gradients.

    torchrun --nproc-per-node 2 examples/ddp_accumulate.py     # gloo on CPU, nccl on GPUs
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import flora
from flora.data import get_batch, load_corpus
from flora.gpt import GPT, GPTConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--accumulate", type=int, default=4)
parser.add_argument("--rank", type=int, default=8)
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")

corpus = load_corpus(max_bytes=2**19)
gen = torch.Generator().manual_seed(rank)  # each rank draws its own micro-batches
torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).to(device)
ddp = DistributedDataParallel(model)
optimizer = flora.Flora(model.named_parameters(), lr=2e-2, rank=args.rank, kappa=50)
acc = flora.GradientAccumulator(ddp, args.accumulate, rank=args.rank)  # same seed on all ranks

for step in range(args.steps):
    for _ in range(args.accumulate):
        x, y = (t.to(device) for t in get_batch(corpus.train, 8, 64, gen))
        with acc.micro_batch():  # runs in ddp.no_sync(); the cycle's end all-reduces C
            loss = ddp(x, y)
            (loss / args.accumulate).backward()
    optimizer.step()
    optimizer.zero_grad()
    if rank == 0 and (step + 1) % 5 == 0:
        print(f"step {step + 1:4d}  loss {loss.item():.4f}  "
              f"all-reduced {acc.last_communicated_bytes:,} bytes "
              f"(full gradients: {acc.plan().uncompressed_bytes:,})")  # fmt: skip
if rank == 0:
    print(f"final: loss {loss.item():.4f}, world {world}")
dist.destroy_process_group()
# The DDP model, alive until the interpreter shuts down, keeps the gloo group alive past
# destroy_process_group, and a gloo worker thread that releases its last collective
# during interpreter shutdown aborts the process ("terminate called without an active
# exception", seen once on a loaded 2-core CI machine). Everything is written and printed, so
# leave without the shutdown, as multiprocessing's workers do.
sys.stdout.flush()
os._exit(0)
