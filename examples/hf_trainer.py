"""Flora with the Hugging Face Trainer: compressed momentum and compressed accumulation.

A small GPT-2 (from a config, no download) on byte tokens of the Python stdlib source.
No Trainer subclass: the optimizer comes from `create_flora_optimizer`, the scheduler from
the Trainer, and `FloraAccumulationCallback` compresses gradient accumulation.

    python examples/hf_trainer.py                       # ~1 minute on 2 CPU cores
    python examples/hf_trainer.py --steps 4 --n-layer 1 --out /tmp/hf   # seconds
"""

import argparse

import torch
import transformers

from flora.data import load_corpus
from flora.integrations.hf import FloraAccumulationCallback, create_flora_optimizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--n-layer", type=int, default=2)
parser.add_argument("--n-embd", type=int, default=128)
parser.add_argument("--seq", type=int, default=64)
parser.add_argument("--accumulate", type=int, default=4)
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--out", default="runs/hf_trainer")
args = parser.parse_args()

data = load_corpus(max_bytes=2**20).data
n = len(data) // args.seq
train = [{"input_ids": x, "labels": x} for x in data[: n * args.seq].view(n, args.seq)]

torch.manual_seed(0)
config = transformers.GPT2Config(
    n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, n_positions=args.seq, vocab_size=256
)
model = transformers.GPT2LMHeadModel(config)

training_args = transformers.TrainingArguments(
    output_dir=args.out,
    max_steps=args.steps,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=args.accumulate,
    learning_rate=3e-3,  # from scratch; fine-tuning a pretrained model wants ~3e-4
    weight_decay=0.01,
    warmup_steps=max(1, args.steps // 10),
    lr_scheduler_type="cosine",
    max_grad_norm=1.0,  # clips and logs the decompressed gradient (≈ sqrt(1+(n+1)/r) × true norm)
    logging_steps=max(1, args.steps // 10),
    save_steps=args.steps,  # a checkpoint at the end; resume with trainer.train(True)
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
    disable_tqdm=True,
)
optimizer = create_flora_optimizer(
    model, training_args, rank=args.rank, kappa=100, target_modules=["attn", "mlp", "wte"]
)
print(optimizer.plan())
trainer = transformers.Trainer(
    model=model,
    args=training_args,
    train_dataset=train,
    optimizers=(optimizer, None),
    callbacks=[FloraAccumulationCallback(rank=args.rank)],
)
trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
print(f"final: step {trainer.state.global_step}, loss {logs[-1]['loss']:.4f}, "
      f"grad_norm {logs[-1]['grad_norm']:.4f}, first loss {logs[0]['loss']:.4f}")  # fmt: skip
