"""The summarization experiment's pieces: the ROUGE wrapper, the leak-free split, encoding,
the held-out loss and one tiny training run per kind of method on a tiny T5."""

import dataclasses

import pytest
import torch

from flora_experiments.summarize import SummarizeConfig, rouge, split_pairs

PAIRS = [
    (f"Package number {i} provides a {kind} for handling {thing} files quickly and safely.",
     f"{kind} for {thing} files")
    for i, (kind, thing) in enumerate(
        (k, t) for k in ("library", "tool", "daemon", "plugin") for t in ("audio", "image", "text")
    )
]  # fmt: skip


def test_rouge_wrapper():
    pytest.importorskip("rouge_score")
    refs = ["library for audio files", "tool for image files"]
    assert rouge(refs, refs) == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    partial = rouge(["library for video", "a tool for images"], refs)
    assert 0 < partial["rouge2"] < partial["rouge1"] < 100  # stemming: images ~ image
    assert rouge(["xyz", "qqq"], refs) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    with pytest.raises(ValueError, match="hypotheses"):
        rouge(["a"], refs)


def test_split_keeps_near_duplicates_on_one_side():
    # three pairs for each first 100 characters
    pairs = [(f"{i:03d}{'x' * 97} then {j}", f"s{i} {j}") for i in range(200) for j in range(3)]
    train, test = split_pairs(pairs, 5, seed=0)
    assert len(test) == 5 and not set(train) & set(test)
    test_starts = {d[:100] for d, _ in test}
    assert len(train) + len(test) < len(pairs)  # unused candidates are not trained on
    assert not any(d[:100] in test_starts for d, _ in train)
    assert split_pairs(pairs, 5, seed=0) == (train, test)  # deterministic
    with pytest.raises(ValueError, match="test_pairs"):
        split_pairs(pairs[:10], 50, seed=0)


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("transformers")
    pytest.importorskip("rouge_score")
    from flora_experiments.tokenize import train_bpe

    cfg = SummarizeConfig(d_model=32, num_layers=1, num_heads=2, vocab_size=300,
                          source_tokens=16, target_tokens=6, batch=4, steps=3, kappa=2)  # fmt: skip
    return cfg, train_bpe([t for p in PAIRS for t in p], cfg.vocab_size)


def test_encoding_truncates_and_ends_with_eos(setup):
    from flora_experiments.summarize import _encode
    from flora_experiments.tokenize import EOS, PAD

    cfg, tokenizer = setup
    x, y = _encode(tokenizer, PAIRS[:3], cfg)
    assert x.shape[1] == cfg.source_tokens and y.shape[1] <= cfg.target_tokens
    for row in range(3):
        ids = x[row][x[row] != PAD].tolist()
        assert ids[-1] == EOS and len(ids) == cfg.source_tokens  # long source: cut, then </s>
        labels = y[row][y[row] != -100].tolist()
        assert labels[-1] == EOS
        assert tokenizer.decode(labels[:-1]) == PAIRS[row][1][: len(tokenizer.decode(labels[:-1]))]


def test_held_out_loss_is_the_mean_over_synopsis_tokens(setup):
    from flora_experiments.summarize import _encode, _loss, _model, held_out_loss

    cfg, tokenizer = setup
    model = _model(cfg, 0).eval()
    with torch.no_grad():
        mean = float(_loss(model, *_encode(tokenizer, PAIRS[:7], cfg)))
    assert held_out_loss(model, tokenizer, PAIRS[:7], cfg) == pytest.approx(mean, rel=1e-5)


def test_every_method_trains_and_summarizes(setup):
    from flora_experiments.summarize import train_one

    cfg, tokenizer = setup
    rows = {
        m: train_one(m, 1e-2, cfg, tokenizer, PAIRS, PAIRS[:3])
        for m in ("none", "naive", "flora-4")
    }
    assert (
        rows["none"]["state_bytes"] < rows["flora-4"]["state_bytes"] < rows["naive"]["state_bytes"]
    )
    for r in rows.values():
        assert r["loss"] > 0 and " → " in r["example"]
        assert all(0 <= r[k] <= 100 for k in ("rouge1", "rouge2", "rougeL"))
    pytest.importorskip("peft")
    lora = train_one("lora-4", 1e-2, dataclasses.replace(cfg, steps=1), tokenizer, PAIRS, PAIRS[:2])
    assert 0 < lora["state_bytes"] < rows["naive"]["state_bytes"]
    with pytest.raises(ValueError, match="method"):
        train_one("lora", 1e-2, cfg, tokenizer, PAIRS, PAIRS[:2])
