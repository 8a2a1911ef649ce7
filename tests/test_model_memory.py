"""``flora plan``: its numbers equal the bytes real optimizers hold, and LLaMA-7B matches a
calculation by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

import flora
from flora.cli import main
from flora.gpt import GPT, SIZES
from flora.model_memory import build_meta_model, plan_memory


def held_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def stepped(opt, model):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return held_bytes(opt)


def check_against_real(meta_model, real_model, rank):
    plan = plan_memory(meta_model, rank=rank, accumulate=4)
    by_name = {name: size for name, size, _ in plan.optimizers}
    named = list(real_model.named_parameters())
    real = {
        "AdamW (torch)": stepped(torch.optim.AdamW(real_model.parameters()), real_model),
        "Adafactor (torch, no momentum)": stepped(
            torch.optim.Adafactor(real_model.parameters()), real_model
        ),
        f"Flora r{rank} (Adafactor + momentum)": stepped(flora.Flora(named, rank=rank), real_model),
        f"FloraAdamW r{rank}": stepped(flora.FloraAdamW(named, rank=rank), real_model),
    }
    for name, size in real.items():
        assert by_name[name] == size, name
    # accumulation: the buffers really held in the middle of a cycle
    acc = flora.GradientAccumulator(real_model, 4, rank=rank)
    real_model.zero_grad()
    return plan, acc


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gpt_plan_equals_real_optimizers():
    with torch.device("meta"):
        meta = GPT(SIZES["tiny"])
    real = GPT(SIZES["tiny"])
    plan, acc = check_against_real(meta, real, rank=8)
    x = torch.randint(0, 256, (2, 16))
    with acc.micro_batch():
        real(x, x).backward()
    accumulation = dict(plan.accumulation)
    assert accumulation["Flora GradientAccumulator r8"] == acc.buffer_bytes()
    assert accumulation["naive (full .grad)"] == sum(p.numel() * 4 for p in real.parameters())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_transformers_config_plan_equals_real_optimizers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    meta, description = build_meta_model(str(tmp_path))
    assert "LlamaForCausalLM" in description
    assert next(meta.parameters()).device.type == "meta"
    real = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    check_against_real(meta, real, rank=8)


def flora_bytes_by_hand(shapes, rank, *, momentum_vectors=True):
    """Flora (Adafactor + momentum) state, fp32, from the paper's formulas, plus the default
    gradient basis (r x the compressed, smaller dimension, in bf16)."""
    total = 0
    for m, n in shapes:
        if n is None:  # a vector: full variance + full momentum
            total += m * (2 if momentum_vectors else 1)
        elif rank < min(m, n):
            # row + column factors, compressed momentum; its basis in bf16 (2 bytes)
            total += m + n + rank * max(m, n) + rank * min(m, n) / 2
        else:
            total += m + n + m * n
    return int(4 * total)


def test_llama_7b_matches_a_hand_calculation(capsys):
    pytest.importorskip("transformers")
    d, ff, layers, vocab, rank = 4096, 11008, 32, 32000, 256
    shapes = [(vocab, d), (vocab, d), (d, None)]  # embed, lm_head (untied), final norm
    per_layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff)] + [(d, None)] * 2
    shapes += per_layer * layers
    numel = sum(m * (n or 1) for m, n in shapes)
    assert numel == 6_738_415_616  # LLaMA-7B

    model, _ = build_meta_model("llama-7b")
    plan = plan_memory(model, rank=rank, accumulate=16)
    by_name = {name: size for name, size, _ in plan.optimizers}
    assert plan.parameters == numel
    assert by_name["AdamW (torch)"] == 8 * numel + 4 * len(shapes)
    assert by_name["Flora r256 (Adafactor + momentum)"] == flora_bytes_by_hand(shapes, rank)
    matrices = [(m, n) for m, n in shapes if n is not None]
    vectors = sum(m for m, n in shapes if n is None)
    acc = dict(plan.accumulation)
    assert acc["naive (full .grad)"] == 4 * numel
    assert acc["Flora GradientAccumulator r256"] == 4 * (
        sum(rank * max(m, n) for m, n in matrices) + vectors
    )
    # about 1.57 GiB of accumulation buffers instead of 25.1 GiB
    assert math.isclose(acc["Flora GradientAccumulator r256"] / 2**30, 1.57, abs_tol=0.01)

    assert main(["plan", "--model", "llama-7b", "--rank", "256", "--accumulate", "16"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "GaLore AdamW r256" in out and "8-bit AdamW" in out


def test_plan_cli_errors_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [["--model", "nope"], ["--model", str(bad)], ["--rank", "0"]]
    base = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10}  # fmt: skip
    for i, change in enumerate([{"hidden_size": -4}, {"hidden_size": 0},
                                {"hidden_size": "big"}, {"num_attention_heads": 3},
                                {"rope_scaling": {"rope_type": "nonsense"}}]):  # fmt: skip
        path = tmp_path / f"config{i}.json"
        path.write_text(json.dumps({**base, **change}))
        cases.append(["--model", str(path)])
    for argv in cases:
        assert main(["plan", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flora: error:"), err


def test_plan_details_prints_the_per_parameter_table(capsys):
    assert main(["plan", "--model", "tiny", "--rank", "4", "--details"]) == 0
    out = capsys.readouterr().out
    assert "Flora plan:" in out and "tok.weight" in out


def test_lean_plan_equals_what_flora_train_lean_holds(tmp_path):
    """The planner's lean rows for a model are the bytes `flora train --lean` reports; at
    n_embd 32 the byte vocabulary is in two blocks (lean_config), the planner's too."""
    from flora.model_memory import lean_rows
    from flora.training import TrainConfig, train

    cfg = TrainConfig(size="tiny", n_embd=32, batch_size=2, corpus_mb=0.05, eval_batches=1,
                      rank=4, kappa=5, steps=3, accumulate=2, lean=True, dtype="bfloat16",
                      out=str(tmp_path), plot=False, progress=False)  # fmt: skip
    assert cfg.model_config().vocab_chunks == 2
    result = train(cfg, echo=lambda line: None)
    with torch.device("meta"):
        meta = GPT(cfg.model_config()).to(torch.bfloat16)
    rows = dict(lean_rows(meta, rank=4, kappa=5, accumulate=2))
    assert rows["gradients at their peak"] == 128 * 32 * 2  # an MLP matrix, not the head
    assert rows["parameters (bf16)"] == result.memory["parameters"]
    assert rows["gradients at their peak"] == result.memory["gradients at their peak"]
    assert rows["optimizer state (Flora r4)"] == result.memory["optimizer state"]
    assert rows["accumulation buffers (2)"] == result.memory["accumulation buffers"]


def test_lean_plan_of_gpt2_uses_the_vocabulary_blocks(capsys):
    assert main(["plan", "--model", "gpt2", "--lean", "--accumulate", "16"]) == 0
    out = capsys.readouterr().out
    assert "vocab_chunks=17" in out
    rows = {x[:34].strip(): x[34:].split() for x in out.splitlines() if len(x) > 34}
    assert rows["gradients at their peak"][:2] == ["4.50", "MiB"]  # 3072 x 768 bf16
    assert float(rows["total (without activations)"][2]) <= 2.5


def test_step_workspace_is_measured_and_extrapolated_from_smaller_matrices(monkeypatch):
    """The step's workspace: deterministic; the float32 copy of the weight and the float32
    gradient estimate, less the bf16 gradient it replaces (6 bytes per entry), and no third
    float32 matrix (the update is formed in the estimate's memory: 10.4 bytes per entry
    before), nor the 46 bytes per entry the rounding's words took before they were drawn in
    passes; a matrix above the probe size, extrapolated from two smaller ones of its
    orientation, comes close to its whole measurement."""
    from flora.model_memory import step_workspace_bytes

    kw = {"rank": 8, "kappa": 5, "accumulate": 4}
    shape = (4096, 1024)
    whole = step_workspace_bytes(shape, **kw)
    assert whole == step_workspace_bytes(shape, **kw)
    assert 6 * 4096 * 1024 <= whole <= 8 * 4096 * 1024
    monkeypatch.setattr("flora.model_memory.WORKSPACE_PROBE_NUMEL", 2**21)
    rows_cut = step_workspace_bytes(shape, **kw)  # from 1024 x 1024 and 2048 x 1024
    assert 0.98 * whole <= rows_cut <= 1.02 * whole
    monkeypatch.setattr("flora.model_memory.WORKSPACE_PROBE_SIDE", 512)
    both_cut = step_workspace_bytes(shape, **kw)  # from 2048 x 512 and 4096 x 512
    assert 0.95 * whole <= both_cut <= 1.05 * whole


def test_lean_llama_7b_fits_in_17_gib(capsys):
    pytest.importorskip("transformers")
    assert main(["plan", "--model", "llama-7b", "--lean", "--accumulate", "16"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("total (without activations)"))
    size, unit = line.split()[3:5]
    assert unit == "GiB" and float(size) <= 17.0
    assert main(["plan", "--model", "tiny", "--lean", "--dtype", "float32"]) == 2
