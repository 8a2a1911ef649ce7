"""Sharded training with FSDP2 (fully_shard): Flora's states are sharded by rows like the
parameters, and a torch.distributed.checkpoint can be loaded at another world size.

    torchrun --nproc-per-node 2 examples/fsdp2_gpt.py --save ckpt   # gloo on CPU, nccl on GPUs
    torchrun --nproc-per-node 1 examples/fsdp2_gpt.py --resume ckpt --steps 30   # reshard 2 -> 1

The checkpoint holds the step, so a resumed run continues counting (to ``--steps`` in all).
Only rank 0 prints; the per-rank state sizes are gathered to it first.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import flora
from flora.data import get_batch, load_corpus
from flora.gpt import GPT, GPTConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--rank", type=int, default=8)
parser.add_argument("--optimizer", choices=["flora", "flora-adamw"], default="flora")
parser.add_argument("--save", default=None, help="DCP checkpoint folder written at the end")
parser.add_argument("--resume", default=None, help="DCP checkpoint folder to start from")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
if cuda:
    torch.cuda.set_device(device)

corpus = load_corpus(max_bytes=2**19)
gen = torch.Generator().manual_seed(1000 * world + rank)  # each rank draws its own batches
torch.manual_seed(0)  # same initial weights everywhere
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).to(device)
for block in model.blocks:
    fully_shard(block)  # each block's parameters become row-sharded DTensors
fully_shard(model)
if args.optimizer == "flora":  # names key the projections: identical on every rank
    optimizer = flora.Flora(model.named_parameters(), lr=2e-2, rank=args.rank, kappa=50)
else:
    optimizer = flora.FloraAdamW(model.named_parameters(), lr=2e-3, rank=args.rank, kappa=50)

start = 0
if args.resume:  # written at any world size; DCP reshards model and optimizer state
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0)}
    dcp.load(loaded, checkpoint_id=args.resume)
    set_state_dict(
        model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
    )
    start = int(loaded["step"])
    if rank == 0:
        print(f"resumed from {args.resume} at step {start}, world size {world}")

loss = torch.tensor(float("nan"))
for step in range(start, args.steps):
    x, y = (t.to(device) for t in get_batch(corpus.train, 8, 64, gen))
    loss = model(x, y)
    loss.backward()  # FSDP2 reduce-scatters: each rank gets the gradient of its rows
    optimizer.step()  # shard-local, plus two small all-reduces per parameter for Flora
    optimizer.zero_grad()
    if rank == 0 and (step + 1) % 5 == 0:
        print(f"step {step + 1:4d}  loss {loss.item():.4f}")

full = optimizer.plan().state_bytes  # what one process would hold for the whole model
held = [0] * world
dist.all_gather_object(held, optimizer.state_bytes())  # one printer: no interleaved lines
if rank == 0:
    for r, local in enumerate(held):
        print(f"rank {r}: optimizer state {local:,} bytes (whole model on one process: {full:,})")
if args.save:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    step = torch.tensor(max(start, args.steps))
    dcp.save({"model": model_sd, "optim": optim_sd, "step": step}, checkpoint_id=args.save)
if rank == 0:
    print(f"final: step {max(start, args.steps)}, loss {loss.item():.4f}, world {world}, "
          f"checkpoint {args.save}")  # fmt: skip
dist.destroy_process_group()
# FSDP2 keeps the gloo group alive past destroy_process_group (torch 2.13, even once the
# model is freed), and a gloo worker thread that releases its last collective
# during interpreter shutdown aborts the process ("terminate called without an active
# exception", seen once on a loaded 2-core CI machine). Everything is written and printed, so
# leave without the shutdown, as multiprocessing's workers do.
sys.stdout.flush()
os._exit(0)
