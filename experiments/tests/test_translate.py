"""The translation experiments' pieces: the dictionary parser, the BPE tokenizer, batching,
the held-out loss, batched greedy decoding, the BLEU wrapper and one tiny training run per kind
of method, for momentum (Table 2) and accumulation (Table 1)."""

import pytest
import torch

from flora_experiments.datasets import parse_de_en
from flora_experiments.tokenize import EOS, PAD, SEP, SPECIAL, UNK, train_bpe
from flora_experiments.translate import (
    TranslateAccumulateConfig,
    TranslateConfig,
    _batch,
    bleu,
    encode_pairs,
    greedy_translate,
    held_out_loss,
    train_one,
)

LINES = [
    "# comment :: line\n",
    "Haus {n} | Das Haus ist sehr alt. :: house | The house is very old.\n",
    "Wie spät ist es? | Wie geht es dir heute? :: "
    "What time is it now? | How are you doing today?\n",
    "kurz | Er kam. :: short | He came.\n",  # fewer than 5 English words
    "a | b :: only one side\n",  # misaligned sub-entries
    "Er sagt; sie sagt. :: He says; she says that.\n",  # alternatives
]


def test_parse_de_en_keeps_aligned_full_sentences():
    assert parse_de_en(LINES) == [
        ("Das Haus ist sehr alt.", "The house is very old."),
        ("Wie spät ist es?", "What time is it now?"),
        ("Wie geht es dir heute?", "How are you doing today?"),
    ]


def test_bleu_wrapper():
    pytest.importorskip("sacrebleu")
    refs = ["The house is very old .", "How are you today ?"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert 0 < bleu(["The house is old .", "How are you ?"], refs) < 100
    assert bleu(["xyz", "qqq"], refs) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="hypotheses"):
        bleu(["a"], refs)


@pytest.fixture(scope="module")
def tokenized():
    pytest.importorskip("tokenizers")
    pairs = parse_de_en(LINES)
    tokenizer = train_bpe([t for p in pairs for t in p], 300)
    return tokenizer, encode_pairs(tokenizer, pairs * 4, 40)


def test_bpe_round_trips_and_reserves_the_special_ids():
    pytest.importorskip("tokenizers")
    tokenizer = train_bpe(["Das Haus ist alt.", "The house is old."] * 3, 300)
    for text in ("Das Haus ist alt.", "Über 3 Brücken!"):  # unseen bytes too
        ids = tokenizer.encode(text).ids
        assert min(ids) > SEP and tokenizer.decode(ids) == text
    assert [tokenizer.token_to_id(t) for t in SPECIAL] == [PAD, EOS, UNK, SEP]
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["a"], 100)
    with pytest.raises(TypeError, match="vocab_size"):
        train_bpe(["a"], 300.0)


def test_encode_pairs_drops_what_does_not_fit(tokenized):
    tokenizer, pairs = tokenized
    assert all(len(p.source) + len(p.target) + 2 <= 40 for p in pairs)
    short = encode_pairs(tokenizer, [(p.de, p.en) for p in pairs[:3]], 12)
    assert all(len(p.source) + len(p.target) + 2 <= 12 for p in short) and len(short) < 3


def test_batch_predicts_only_the_target_side(tokenized):
    _, pairs = tokenized
    x, y = _batch(pairs[:3])
    for row, p in enumerate(pairs[:3]):
        n = len(p.source) + len(p.target) + 1  # inputs: source, <sep>, target
        assert x[row, :n].tolist() == [*p.source, SEP, *p.target]
        assert (x[row, n:] == PAD).all()
        assert (y[row, : len(p.source)] == -100).all() and (y[row, n:] == -100).all()
        assert y[row, len(p.source) : n].tolist() == [*p.target, EOS]


def test_held_out_loss_is_the_mean_over_target_tokens(tokenized):
    from flora.gpt import GPT, GPTConfig

    _, pairs = tokenized
    torch.manual_seed(0)
    model = GPT(GPTConfig(1, 2, 16, 40, 300))
    x, y = _batch(pairs[:5])
    with torch.no_grad():
        mean = float(model(x, y))
    # one batch: the same as the model's own mean loss; batches of 2: weighted by tokens
    assert held_out_loss(model, pairs[:5], batch=5) == pytest.approx(mean, rel=1e-6)
    assert held_out_loss(model, pairs[:5], batch=2) == pytest.approx(mean, rel=1e-6)


def test_batched_greedy_decoding_equals_one_at_a_time(tokenized):
    from flora.gpt import GPT, GPTConfig

    tokenizer, pairs = tokenized
    torch.manual_seed(0)
    model = GPT(GPTConfig(1, 2, 16, 40, 300))
    batched = greedy_translate(model, tokenizer, pairs[:8], 40)
    single = [greedy_translate(model, tokenizer, [p], 40, batch=1)[0] for p in pairs[:8]]
    assert batched == single and len(batched) == 8


TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 300, "max_tokens": 40,
        "kappa": 2, "test_pairs": 2}  # fmt: skip


def test_every_momentum_method_trains_and_decodes(tokenized):
    pytest.importorskip("sacrebleu")
    tokenizer, pairs = tokenized
    cfg = TranslateConfig(batch=4, steps=3, **TINY)
    rows = {
        m: train_one(m, 1e-2, cfg, tokenizer, pairs, pairs[:2])
        for m in ("none", "naive", "flora-4")
    }
    assert (
        rows["none"]["state_bytes"] < rows["flora-4"]["state_bytes"] < rows["naive"]["state_bytes"]
    )
    assert all(0 <= r["bleu"] <= 100 and " → " in r["example"] for r in rows.values())
    assert all(r["loss"] > 0 and "accumulation_bytes" not in r for r in rows.values())
    pytest.importorskip("peft")
    assert train_one("lora-4", 1e-2, cfg, tokenizer, pairs, pairs[:2])["state_bytes"] > 0
    with pytest.raises(ValueError, match="method"):
        train_one("flora", 1e-2, cfg, tokenizer, pairs, pairs[:2])


def test_accumulation_rows_hold_what_they_claim(tokenized):
    pytest.importorskip("sacrebleu")
    tokenizer, pairs = tokenized
    cfg = TranslateAccumulateConfig(batch=1, accumulate=3, steps=2, **TINY)
    rows = {
        m: train_one(m, 1e-2, cfg, tokenizer, pairs, pairs[:2])
        for m in ("none", "naive", "flora-4")
    }
    torch.manual_seed(0)
    param_bytes = sum(p.nbytes for p in _gpt(cfg).parameters())
    assert rows["none"]["accumulation_bytes"] == 0
    assert rows["naive"]["accumulation_bytes"] == param_bytes
    assert 0 < rows["flora-4"]["accumulation_bytes"] < param_bytes
    # all rows use torch.optim.Adafactor: the same state for the same parameters
    assert (
        rows["none"]["state_bytes"]
        == rows["naive"]["state_bytes"]
        == rows["flora-4"]["state_bytes"]
    )


def _gpt(cfg):
    from flora.gpt import GPT, GPTConfig

    return GPT(GPTConfig(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.max_tokens, cfg.vocab_size))
