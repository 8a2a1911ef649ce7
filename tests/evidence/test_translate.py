"""The translation experiment's pieces: the dictionary parser, the BLEU wrapper and one tiny
training run per kind of method."""

import pytest

from flora.evidence.datasets import parse_de_en
from flora.evidence.translate import TranslateConfig, bleu, train_one

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


def test_every_method_trains_and_decodes():
    pytest.importorskip("sacrebleu")
    cfg = TranslateConfig(n_layer=1, n_embd=32, n_head=2, block_size=64, batch=4, steps=3,
                          kappa=2, test_pairs=2)  # fmt: skip
    pairs = parse_de_en(LINES) * 4
    rows = {m: train_one(m, cfg, pairs, pairs[:2]) for m in ("none", "naive", "flora-4")}
    assert (
        rows["none"]["state_bytes"] < rows["flora-4"]["state_bytes"] < rows["naive"]["state_bytes"]
    )
    assert all(0 <= r["bleu"] <= 100 and " → " in r["example"] for r in rows.values())
    pytest.importorskip("peft")
    assert train_one("lora-4", cfg, pairs, pairs[:2])["state_bytes"] > 0
    with pytest.raises(ValueError, match="method"):
        train_one("flora", cfg, pairs, pairs[:2])
