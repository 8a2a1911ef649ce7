r"""German→English with a small GPT-style decoder trained from scratch, scored by sacreBLEU
on held-out pairs (greedy decoding) and by the teacher-forced cross-entropy of the held-out
English side. Two experiments share the data, model and scoring:

* :func:`run` — momentum (paper Table 2, its GPT-2 row), all Adafactor-based as in the paper:
  ``none`` = ``flora.Flora(beta1=0)`` (= ``torch.optim.Adafactor``, no momentum); ``naive`` =
  ``flora.Flora(compress=False)`` (full-size momentum); ``lora-r`` = ``peft`` LoRA of rank r on
  every block matrix (base frozen at its random initialization; embeddings, norms and head
  trained) with naive momentum; ``flora-r`` = ``flora.Flora(rank=r)`` (compressed momentum).
* :func:`run_accumulate` — gradient accumulation (Table 1, its decoder row): physical batch 1,
  ``accumulate`` micro-batches per update, ``torch.optim.Adafactor`` for every row; ``none``
  updates after every micro-batch, ``naive`` accumulates in ``.grad``, ``lora-r`` accumulates
  the adapters' gradients, ``flora-r`` uses :class:`flora.GradientAccumulator` of rank r.

A sequence is ``German <sep> English </s>`` in a byte-level BPE vocabulary trained on the
training pairs (:mod:`flora_experiments.tokenize`); only the English side and ``</s>`` are
predicted. Each row is the best of a small step-size sweep (``lrs``, Adafactor's relative
step cap); every point is kept.

Deviations: the paper trains GPT-2 base on IWSLT17 de-en (Table 2) and fine-tunes pretrained
T5 (Table 1); neither data nor weights are reachable here, so the pairs are the ~15k full
sentences of Debian's ``trans-de-en`` dictionary and the model is small and from scratch in
both tables. BLEU is low in absolute terms; the comparison between rows is the point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_experiments.memory import optimizer_state_bytes
from flora_experiments.methods import (
    best_rows,
    chosen_methods,
    edge_note,
    headline,
    momentum_optimizer,
    parse_method,
    plot_sweeps,
    ratios_to_naive,
)
from flora_experiments.report import Results
from flora_experiments.tokenize import EOS, PAD, SEP, train_bpe

__all__ = [
    "Pair",
    "TranslateAccumulateConfig",
    "TranslateConfig",
    "bleu",
    "encode_pairs",
    "greedy_translate",
    "held_out_loss",
    "run",
    "run_accumulate",
    "train_one",
]

LORA_TARGETS = ["attn", "proj", "fc", "out"]


@dataclass
class TranslateConfig:
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 4096
    max_tokens: int = 64  # German + <sep> + English + </s>
    batch: int = 32
    steps: int = 2000
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    widen: int = 2  # step sizes tried past a sweep edge while the best sits on it
    ranks: tuple[int, ...] = (8, 32, 128)
    methods: tuple[str, ...] = ()  # rows to run; (): none, naive, lora-r, flora-r per rank
    kappa: int = 200
    test_pairs: int = 500
    seed: int = 0

    @classmethod
    def quick(cls) -> TranslateConfig:
        return cls(n_embd=128, vocab_size=2048, steps=500, ranks=(8, 32), kappa=100,
                   test_pairs=200)  # fmt: skip


@dataclass
class TranslateAccumulateConfig(TranslateConfig):
    """Table 1's decoder row: ``batch`` is the physical batch, ``accumulate`` micro-batches
    make one update."""

    batch: int = 1
    accumulate: int = 16
    steps: int = 1000
    lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1)  # few updates: larger steps than Table 2's
    distribution: str = "gaussian"  # the accumulator's (flora.GradientAccumulator)
    exact_rows: bool = False  # the accumulator's exact_rows (row-sparse gradients held exactly)

    @classmethod
    def quick(cls) -> TranslateAccumulateConfig:
        return cls(n_embd=128, vocab_size=2048, steps=200, ranks=(8, 32), test_pairs=200)


@dataclass(frozen=True)
class Pair:
    """One sentence pair: the texts and their token ids (no special tokens)."""

    de: str
    en: str
    source: tuple[int, ...]
    target: tuple[int, ...]


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU of ``hypotheses`` against one reference each (sacreBLEU, default 13a)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]], max_tokens: int) -> list[Pair]:
    """The pairs whose ``source <sep> target </s>`` fits in ``max_tokens``, tokenized."""
    out = []
    for de, en in pairs:
        source = tuple(tokenizer.encode(de).ids)
        target = tuple(tokenizer.encode(en).ids)
        if len(source) + len(target) + 2 <= max_tokens:
            out.append(Pair(de, en, source, target))
    return out


def _batch(pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (padded with ``PAD``) and targets (``-100`` on the source and the padding)."""
    seqs = [(*p.source, SEP, *p.target, EOS) for p in pairs]
    width = max(map(len, seqs)) - 1
    x = torch.full((len(pairs), width), PAD, dtype=torch.long)
    y = torch.full((len(pairs), width), -100, dtype=torch.long)
    for row, (p, seq) in enumerate(zip(pairs, seqs, strict=True)):
        x[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        start = len(p.source)  # the <sep> position predicts the first target token
        y[row, start : len(seq) - 1] = torch.tensor(seq[start + 1 :])
    return x, y


@torch.no_grad()
def held_out_loss(model: nn.Module, pairs: list[Pair], batch: int = 64) -> float:
    """Mean cross-entropy per target token (English side and ``</s>``), teacher-forced."""
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch):
        x, y = _batch(pairs[i : i + batch])
        logits = model(x)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += int((y != -100).sum())
    return total / count


@torch.no_grad()
def greedy_translate(
    model: nn.Module, tokenizer: Any, pairs: list[Pair], max_tokens: int, batch: int = 64
) -> list[str]:
    """Greedy decoding of each pair's source, batched over sources of equal length (so no
    padding is ever attended to); stops at ``</s>`` or ``max_tokens``."""
    out: list[str] = [""] * len(pairs)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(pairs):
        by_length.setdefault(len(p.source), []).append(i)
    for length, indices in sorted(by_length.items()):
        for c in range(0, len(indices), batch):
            chunk = indices[c : c + batch]
            ids = torch.tensor([[*pairs[i].source, SEP] for i in chunk])
            done = torch.zeros(len(chunk), dtype=torch.bool)
            while ids.shape[1] < max_tokens and not bool(done.all()):
                nxt = model(ids)[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                done |= nxt == EOS
            for row, i in enumerate(chunk):
                generated = ids[row, length + 1 :].tolist()
                generated = generated[: generated.index(EOS)] if EOS in generated else generated
                out[i] = tokenizer.decode(generated).strip()
    return out


def _model(cfg: TranslateConfig, lora_rank: int) -> nn.Module:
    from flora.gpt import GPT, GPTConfig

    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.max_tokens, cfg.vocab_size))
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS)
        model = get_peft_model(model, config)
        for n, p in model.named_parameters():
            if not any(f".{t}." in n for t in LORA_TARGETS) or "lora_" in n:
                p.requires_grad_(True)  # embeddings, norms, head and adapters
    return model


def train_one(
    method: str, lr: float, cfg: TranslateConfig, tokenizer: Any, train: list[Pair], test
) -> dict[str, Any]:
    """One row at step size ``lr``: momentum variants for a :class:`TranslateConfig`,
    accumulation variants (``cfg.batch``-sized micro-batches) for a
    :class:`TranslateAccumulateConfig`."""
    import flora

    kind, rank = parse_method(method)
    model = _model(cfg, rank if kind == "lora" else 0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    accumulating = isinstance(cfg, TranslateAccumulateConfig)
    tau = cfg.accumulate if accumulating and kind != "none" else 1
    acc = None
    if accumulating:
        opt: torch.optim.Optimizer = torch.optim.Adafactor([p for _, p in named], lr=lr)
        if kind == "flora":
            acc = flora.GradientAccumulator(
                model,
                tau,
                rank=rank,
                seed=cfg.seed,
                distribution=cfg.distribution,
                exact_rows=cfg.exact_rows,
            )
    else:
        opt = momentum_optimizer(method, named, lr, cfg.kappa, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    micro_batches = cfg.steps * (cfg.accumulate if accumulating else 1)
    held, start = 0, time.perf_counter()
    for i in range(micro_batches):
        ix = torch.randint(len(train), (cfg.batch,), generator=gen).tolist()
        x, y = _batch([train[j] for j in ix])
        if acc is not None:
            with acc.micro_batch():
                (model(x, y) / tau).backward()
        else:
            (model(x, y) / tau).backward()
        if (i + 1) % tau:
            if acc is not None:
                held = max(held, acc.buffer_bytes())
            else:
                held = max(held, sum(p.grad.nbytes for _, p in named if p.grad is not None))
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / micro_batches
    model.eval()
    hypotheses = greedy_translate(model, tokenizer, test, cfg.max_tokens)
    row = {
        "method": method,
        "lr": lr,
        "bleu": bleu(hypotheses, [p.en for p in test]),
        "loss": held_out_loss(model, test),
        "state_bytes": optimizer_state_bytes(opt),
        "seconds": seconds,
        "example": f"{test[0].de} → {hypotheses[0]}",
    }
    if accumulating:
        row["accumulation_bytes"] = held
    return row


def _data(cfg: TranslateConfig, data_root) -> tuple[Any, list[Pair], list[Pair]]:
    from flora_experiments.datasets import de_en_pairs

    pairs = de_en_pairs(data_root)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    shuffled = [pairs[i] for i in order]
    # the tokenizer sees only pairs that are not among the first test_pairs candidates
    held_back = 2 * cfg.test_pairs
    tokenizer = train_bpe((t for de, en in shuffled[held_back:] for t in (de, en)), cfg.vocab_size)
    candidates = encode_pairs(tokenizer, shuffled[:held_back], cfg.max_tokens)
    if len(candidates) < cfg.test_pairs:
        raise ValueError(
            f"only {len(candidates)} of {held_back} pairs fit in max_tokens={cfg.max_tokens}; "
            f"raise max_tokens or lower test_pairs"
        )
    test = candidates[: cfg.test_pairs]
    train = candidates[cfg.test_pairs :] + encode_pairs(
        tokenizer, shuffled[held_back:], cfg.max_tokens
    )
    return tokenizer, train, test


def _sweep(cfg: TranslateConfig, tokenizer, train, test) -> list[dict[str, Any]]:
    rows = best_rows(
        chosen_methods(cfg.methods, cfg.ranks),
        lambda method: cfg.lrs,
        lambda method, lr: train_one(method, lr, cfg, tokenizer, train, test),
        "loss",
        lower=True,
        describe=lambda r: f"{r['loss']:.3f} / {r['bleu']:.2f}",
        extend=cfg.widen,
    )
    ratios_to_naive(rows, {"state_ratio": "state_bytes", "time_ratio": "seconds"})
    return rows


def _describe(cfg: TranslateConfig, train, test) -> str:
    return (
        f"GPT: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, context "
        f"{cfg.max_tokens} tokens of a {cfg.vocab_size}-id byte-level BPE trained on the "
        f"training pairs; {len(train):,} training and {len(test):,} test pairs (Debian "
        f"trans-de-en). Best by held-out loss of a step-size sweep (Adafactor's relative step "
        f"cap) from {', '.join(f'{x:g}' for x in cfg.lrs)}; 'loss / BLEU at each lr' keeps every "
        f"point. Greedy decoding; sacreBLEU (13a) on the test pairs."
    )


def _verdict(rows: list[dict[str, Any]], key: str, label: str) -> str:
    best = headline(rows, key, lower=key == "loss")
    return f"{label}: " + ", ".join(f"{name} {r[key]:.3f}" for name, r in best) + "."


def run(cfg: TranslateConfig, *, name: str, data_root=None) -> Results:
    """Table 2's decoder row: momentum variants."""
    tokenizer, train, test = _data(cfg, data_root)
    rows = _sweep(cfg, tokenizer, train, test)
    res = Results(
        name=name,
        title="Momentum from scratch (Table 2, translation): GPT decoder on de-en",
        columns=[
            ("method", "method"),
            ("loss", "held-out loss"),
            ("bleu", "BLEU"),
            ("lr", "best lr"),
            ("sweep", "loss / BLEU at each lr"),
            ("state_bytes", "optimizer state bytes"),
            ("state_ratio", "vs naive"),
            ("time_ratio", "time/step vs naive"),
            ("example", "first test sentence"),
        ],
        seed=cfg.seed,
        rows=rows,
    )
    res.notes.append(
        _describe(cfg, train, test) + f" Batch {cfg.batch}, {cfg.steps} steps, kappa "
        f"{cfg.kappa}; LoRA on every block matrix, alpha = r."
    )
    res.notes.append(
        "Paper (Table 2): Flora(r) close to naive momentum, above LoRA(r) and no momentum. "
        "Here, " + _verdict(rows, "loss", "held-out loss") + " " + _verdict(rows, "bleu", "BLEU")
    )
    res.notes.append(edge_note(rows, cfg.widen))
    plot_sweeps(res, rows, "loss", "held-out loss", "state_ratio",
                "optimizer state bytes / naive momentum")  # fmt: skip
    return res


def run_accumulate(cfg: TranslateAccumulateConfig, *, name: str, data_root=None) -> Results:
    """Table 1's decoder row: gradient accumulation variants, physical batch ``cfg.batch``."""
    tokenizer, train, test = _data(cfg, data_root)
    rows = _sweep(cfg, tokenizer, train, test)
    ratios_to_naive(rows, {"accumulation_ratio": "accumulation_bytes"})
    res = Results(
        name=name,
        title=f"Gradient accumulation (Table 1, translation): GPT decoder on de-en, batch "
        f"{cfg.batch}, tau = {cfg.accumulate}",
        columns=[
            ("method", "method"),
            ("loss", "held-out loss"),
            ("bleu", "BLEU"),
            ("lr", "best lr"),
            ("sweep", "loss / BLEU at each lr"),
            ("accumulation_bytes", "accumulation bytes"),
            ("accumulation_ratio", "vs naive"),
            ("state_bytes", "Adafactor state bytes"),
            ("time_ratio", "time/micro-batch vs naive"),
            ("example", "first test sentence"),
        ],
        seed=cfg.seed,
        rows=rows,
    )
    res.notes.append(
        _describe(cfg, train, test) + f" {cfg.steps} updates of {cfg.accumulate} micro-batches "
        f"of {cfg.batch} (none: {cfg.steps * cfg.accumulate} updates of one micro-batch), "
        f"torch.optim.Adafactor; LoRA on every block matrix, alpha = r; the accumulator's "
        f"projection: {cfg.distribution}"
        + (", row-sparse gradients held exactly (exact_rows)." if cfg.exact_rows else ".")
    )
    res.notes.append(
        "Paper (Table 1): Flora(r) close to naive accumulation, above LoRA(r). Here, "
        + _verdict(rows, "loss", "held-out loss")
        + " "
        + _verdict(rows, "bleu", "BLEU")
    )
    res.notes.append(edge_note(rows, cfg.widen))
    plot_sweeps(res, rows, "loss", "held-out loss", "accumulation_ratio",
                "accumulation bytes / naive accumulation")  # fmt: skip
    return res
