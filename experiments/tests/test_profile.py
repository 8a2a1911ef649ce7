"""The memory profile's exact accounting on a tiny GPT: each category against its definition."""

import pytest

from flora_experiments.profile import ProfileConfig, measure

TINY = ProfileConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, accumulate=3, steps=2, rank=4)


def _param_stats(cfg):
    from flora_experiments.profile import _model

    sizes = [p.numel() * 4 for p in _model(cfg).parameters()]
    return sum(sizes), max(sizes), len(sizes)


def test_adamw_categories_are_exact():
    total, _, count = _param_stats(TINY)
    row = measure("AdamW", "adamw", False, False, TINY)
    assert row["parameters"] == row["gradients"] == row["accumulation"] == total
    assert row["optimizer_state"] == 2 * total + 4 * count  # exp_avg, exp_avg_sq, step
    assert row["sum"] == sum(row[k] for k in ("parameters", "gradients", "accumulation",
                                              "optimizer_state", "activations"))  # fmt: skip


def test_step_in_backward_holds_one_gradient_and_ac_saves_less():
    total, largest, _ = _param_stats(TINY)
    plain = measure("AdamW", "adamw", False, False, TINY)
    sib = measure("AdamW + sib", "adamw", False, True, TINY)
    assert sib["gradients"] == largest < total
    assert sib["accumulation"] == total  # uncompressed accumulation still holds every .grad
    ac = measure("AdamW + AC", "adamw", True, False, TINY)
    assert 0 < ac["activations"] < plain["activations"]


def test_flora_and_lora_shrink_their_categories():
    total, largest, _ = _param_stats(TINY)
    plain = measure("AdamW", "adamw", False, False, TINY)
    fl = measure("Flora", "flora", False, False, TINY)
    assert fl["gradients"] == total  # all decompressed at the optimizer step
    assert measure("Flora sib", "flora", False, True, TINY)["gradients"] == largest
    assert fl["optimizer_state"] < plain["optimizer_state"] / 3
    assert fl["accumulation"] < plain["accumulation"]
    assert fl["parameters"] == plain["parameters"]
    pytest.importorskip("peft")
    lora = measure("LoRA + AC", "lora", True, False, TINY)
    assert lora["parameters"] > plain["parameters"]  # adapters on top of the base
    assert lora["gradients"] < plain["gradients"]
