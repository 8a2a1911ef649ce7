"""Train a small byte-level GPT with Flora on the Python standard library's own source.

Every machine with Python has this corpus, so the script needs no download. It prints the
loss as it trains, the held-out loss at the end, Flora's compression plan and the optimizer
state memory against torch.optim.AdamW on the same model (both measured from real state).

    python examples/train_gpt_stdlib.py                      # defaults: ~2-3 minutes, 2 CPU cores
    python examples/train_gpt_stdlib.py --steps 20 --n-layer 2 --n-embd 64   # a few seconds
    python examples/train_gpt_stdlib.py --accumulate 4    # + compressed gradient accumulation
"""

import argparse
import contextlib
import math
import time

import torch

import flora
import flora.data
from flora.gpt import GPT, GPTConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--optimizer", choices=["flora", "flora-adamw"], default="flora")
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--block-size", type=int, default=128)
parser.add_argument("--n-layer", type=int, default=4)
parser.add_argument("--n-embd", type=int, default=128)
parser.add_argument("--n-head", type=int, default=4)
parser.add_argument("--lr", type=float, default=None, help="default: 2e-2 Flora, 2e-3 FloraAdamW")
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--kappa", type=int, default=100)
parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
parser.add_argument("--accumulate-rank", type=int, default=None, help="default: --rank")
parser.add_argument("--corpus-mb", type=float, default=4.0)
parser.add_argument("--eval-batches", type=int, default=20)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)

# -------------------------------------------------------------------------- data, model
corpus = flora.data.load_corpus(max_bytes=int(args.corpus_mb * 2**20))  # stdlib source
train_data, val_data = corpus.train, corpus.val
print(f"corpus: {corpus.description}")


def get_batch(source, generator):
    return flora.data.get_batch(source, args.batch_size, args.block_size, generator)


config = GPTConfig(args.n_layer, args.n_head, args.n_embd, args.block_size, vocab_size=256)
model = GPT(config)
n_params = sum(p.numel() for p in model.parameters())
print(f"model: {args.n_layer} layers, d={args.n_embd}, {n_params / 1e6:.2f}M parameters")

if args.optimizer == "flora":
    lr = args.lr or 2e-2
    opt = flora.Flora(model.named_parameters(), lr=lr, rank=args.rank, kappa=args.kappa)
else:
    lr = args.lr or 2e-3
    opt = flora.FloraAdamW(model.named_parameters(), lr=lr, rank=args.rank, kappa=args.kappa)
warmup = max(1, min(20, args.steps // 10))
schedule = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
)

# compressed accumulation (Algorithm 1): each micro-batch's gradient is projected to rank r
# in a backward hook and freed; after the last one p.grad holds the decompressed sum
tau = args.accumulate
acc = None
if tau > 1:
    acc = flora.GradientAccumulator(model, tau, rank=args.accumulate_rank or args.rank, seed=1)

# -------------------------------------------------------------------------- train
gen = torch.Generator().manual_seed(args.seed)
start = time.perf_counter()
for step in range(args.steps):
    for _ in range(tau):
        x, y = get_batch(train_data, gen)
        with acc.micro_batch() if acc else contextlib.nullcontext():
            loss = model(x, y)
            (loss / tau).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    schedule.step()
    if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
        elapsed = time.perf_counter() - start
        tok_s = (step + 1) * tau * args.batch_size * args.block_size / elapsed
        print(
            f"step {step:5d}  loss {loss.item():.4f}  "
            f"lr {schedule.get_last_lr()[0]:.2e}  {tok_s:,.0f} tok/s"
        )


@torch.no_grad()
def evaluate():
    g = torch.Generator().manual_seed(1234)
    return (
        sum(model(*get_batch(val_data, g)).item() for _ in range(args.eval_batches))
        / args.eval_batches
    )


val = evaluate()
print(f"held-out loss {val:.4f} nats/byte ({val / math.log(2):.3f} bits/byte)")

# -------------------------------------------------------------------------- memory
print()
print(opt.plan())
if acc is not None:
    print()
    print(acc.plan())
    acc.remove()
adamw = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: measure state, change nothing
x, y = get_batch(train_data, gen)
adamw.zero_grad()
model(x, y).backward()
adamw.step()
adamw_bytes = sum(
    v.numel() * v.element_size()
    for s in adamw.state.values()
    for v in s.values()
    if torch.is_tensor(v)
)
ours = opt.state_bytes()
print(
    f"\noptimizer state measured: {type(opt).__name__} {ours / 2**20:.3f} MiB, "
    f"torch AdamW {adamw_bytes / 2**20:.3f} MiB ({ours / adamw_bytes:.3f}x); "
    f"parameters {n_params * 4 / 2**20:.3f} MiB"
)
print(f"final: held-out loss {val:.4f}, state/AdamW {ours / adamw_bytes:.3f}")
