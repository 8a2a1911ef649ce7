"""Compressed gradient accumulation inside an `accelerator.accumulate(model)` loop.

python examples/accelerate_accumulate.py              # seconds on a CPU
"""

import argparse

import torch
from accelerate import Accelerator

import flora
from flora.data import get_batch, load_corpus
from flora.gpt import GPT, GPTConfig
from flora.integrations.hf import accelerate_sync

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--accumulate", type=int, default=4)
parser.add_argument("--rank", type=int, default=8)
args = parser.parse_args()

corpus = load_corpus(max_bytes=2**19)
gen = torch.Generator().manual_seed(0)
batches = [get_batch(corpus.train, 8, 64, gen) for _ in range(args.steps * args.accumulate)]

torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
optimizer = flora.Flora(model.named_parameters(), lr=2e-2, rank=args.rank, kappa=50)
accelerator = Accelerator(gradient_accumulation_steps=args.accumulate, cpu=True)
loader = torch.utils.data.DataLoader(batches, batch_size=None)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

# each backward pass is a micro-batch; accelerate's sync flag ends the cycle, and the
# accumulator clips the gradient by its estimate of the true norm (max_grad_norm)
acc = flora.GradientAccumulator(
    model, args.accumulate, rank=args.rank, is_last_micro_batch=accelerate_sync(),
    max_grad_norm=1.0,
)  # fmt: skip
for i, (x, y) in enumerate(loader):
    with accelerator.accumulate(model):
        loss = model(x, y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    if accelerator.sync_gradients and (i + 1) % (5 * args.accumulate) == 0:
        print(f"step {(i + 1) // args.accumulate:4d}  loss {loss.item():.4f}")
print(acc.plan())
print(f"final: loss {loss.item():.4f}, cycles {acc.cycle}")
