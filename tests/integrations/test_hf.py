"""Flora inside transformers.Trainer and accelerate loops (tiny models, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from flora import FloraAdamW, GradientAccumulator  # noqa: E402
from flora.data import load_corpus  # noqa: E402
from flora.integrations.hf import (  # noqa: E402
    FloraAccumulationCallback,
    accelerate_sync,
    create_flora_optimizer,
)

SEQ = 16


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=SEQ, vocab_size=256, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    data = load_corpus(max_bytes=n * SEQ).data
    return [{"input_ids": x, "labels": x} for x in data[: n * SEQ].view(n, SEQ)]


class Probe(transformers.TrainerCallback):
    """Records, just before each optimizer step, the norm of the gradient the step sees."""

    def __init__(self) -> None:
        self.callback: FloraAccumulationCallback | None = None  # set once the Trainer exists
        self.estimates: list[float] = []
        self.norms: list[float] = []
        self.missing: list[int] = []
        self.mid_cycle_full: list[int] = []

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        # mid-cycle: the attention/MLP matrices hold no full-size gradient (compressed)
        held = [n for n, p in model.named_parameters() if p.grad is not None]
        self.mid_cycle_full.append(sum(("attn" in n or "mlp" in n) and "weight" in n for n in held))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters()]
        self.missing.append(sum(g is None for g in grads))
        if self.callback is not None and self.callback.accumulator is not None:
            self.estimates.append(float(self.callback.accumulator.grad_norm))
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def make_trainer(
    tmp_path, *, max_grad_norm, epochs=2, save_steps=1000, probe=None, route="create",
    clip="estimate", distribution="sketch",
):  # fmt: skip
    model = tiny_model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,  # 8 batches per epoch: cycles of 3, 3 and 2
        num_train_epochs=epochs,
        learning_rate=1e-2,
        weight_decay=0.01,
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_steps=save_steps,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    accumulation = FloraAccumulationCallback(rank=4, clip=clip, distribution=distribution)
    callbacks = [accumulation] + ([probe] if probe else [])
    if probe is not None:
        probe.callback = callbacks[0]
    if route == "cls":  # the Trainer's own factory: it builds the optimizer from its groups
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=dataset(),
            optimizer_cls_and_kwargs=(FloraAdamW, {"lr": 1e-2, "rank": 4, "kappa": 10}),
            callbacks=callbacks,
        )
        return trainer, model, None
    optimizer = create_flora_optimizer(
        model, args, rank=4, kappa=10, target_modules=["attn", "mlp"]
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    return trainer, model, optimizer


def test_trainer_with_compressed_accumulation_logs_the_true_grad_norm(tmp_path):
    probe = Probe()
    trainer, _, optimizer = make_trainer(
        tmp_path, max_grad_norm=1e9, epochs=3, probe=probe, distribution="gaussian"
    )
    callback = next(
        c for c in trainer.callback_handler.callbacks if isinstance(c, FloraAccumulationCallback)
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert trainer.state.global_step == 9  # 3 cycles per epoch, the last one of 2 micro-batches
    assert probe.missing == [0] * 9  # every gradient was decompressed before the step
    assert probe.mid_cycle_full == [0] * (3 * 8 - 9)  # ... and compressed between steps
    for log, norm, estimate in zip(logs, probe.norms, probe.estimates, strict=True):
        # logged: the true-norm estimate, and the norm of the gradient the step used
        assert math.isclose(log["grad_norm"], estimate, rel_tol=1e-6)
        assert math.isclose(log["grad_norm_decompressed"], norm, rel_tol=1e-4)
        assert 0 < log["grad_norm"] < norm  # rank 4: the projection inflates the norm
    losses = [h["loss"] for h in logs]
    assert losses[-1] < losses[0]
    # the attention/MLP matrices were compressed by both the optimizer and the accumulator
    plan = optimizer.plan()
    compressed = {r.name for r in plan.rows if r.compressed}
    assert compressed and all(("attn" in n or "mlp" in n) for n in compressed)
    assert callback.accumulator is None  # hooks removed at the end of training
    groups = {g["compress"]: g for g in optimizer.param_groups}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # linear decay
    assert True in groups


def test_trainer_clips_with_the_true_norm_estimate(tmp_path):
    free, clipped = Probe(), Probe()
    gaussian = {"epochs": 1, "distribution": "gaussian"}  # the projection: an inflated norm
    make_trainer(tmp_path / "a", max_grad_norm=1e9, probe=free, **gaussian)[0].train()
    trainer, _, _ = make_trainer(tmp_path / "b", max_grad_norm=0.05, probe=clipped, **gaussian)
    trainer.train()
    assert trainer.args.max_grad_norm == 0.05  # restored after the run
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert all(h["grad_norm"] > 0.05 for h in logs)  # the pre-clip estimate is logged
    # first step (same weights and data in both runs): the step saw the decompressed
    # gradient scaled by 0.05 / estimate, not by 0.05 / its own (inflated) norm
    assert math.isclose(clipped.estimates[0], free.estimates[0], rel_tol=1e-6)
    expected = free.norms[0] * 0.05 / (free.estimates[0] + 1e-6)
    assert math.isclose(clipped.norms[0], expected, rel_tol=1e-4)
    assert clipped.norms[0] > 0.05  # clipping the inflated norm would have given 0.05


def test_clip_decompressed_leaves_clipping_to_the_trainer(tmp_path):
    probe = Probe()
    trainer, _, _ = make_trainer(
        tmp_path, max_grad_norm=0.05, epochs=1, probe=probe, clip="decompressed"
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert all(h["grad_norm"] > 0.05 and "grad_norm_decompressed" not in h for h in logs)
    assert all(n <= 0.05 * (1 + 1e-4) for n in probe.norms)  # the Trainer clipped
    with pytest.raises(ValueError, match="clip must be"):
        FloraAccumulationCallback(clip="true")


@pytest.mark.parametrize("route", ["create", "cls"])
def test_trainer_checkpoint_resumes(tmp_path, route):
    whole, model_a, _ = make_trainer(tmp_path / "a", max_grad_norm=1.0, save_steps=3, route=route)
    whole.train()  # also writes checkpoint-3 midway
    resumed, model_b, _ = make_trainer(tmp_path / "b", max_grad_norm=1.0, save_steps=3, route=route)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_builds_flora_through_optimizer_cls_and_kwargs(tmp_path):
    """``Trainer(optimizer_cls_and_kwargs=(FloraAdamW, {...}))``: the Trainer's parameter
    groups (weight decay off for biases and norms) reach Flora, whose policy compresses the
    matrices; the lr comes from the kwargs (the Trainer passes no learning_rate there)."""
    trainer, model, _ = make_trainer(tmp_path, max_grad_norm=1.0, epochs=3, route="cls")
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, FloraAdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert optimizer.param_groups[0]["initial_lr"] == 1e-2  # the scheduler started from ours
    plan = optimizer.plan()
    matrices = sum(p.dim() == 2 and min(p.shape) > 4 for p in model.parameters())
    assert sum(r.compressed for r in plan.rows) == matrices > 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_accelerate_accumulate_loop_equals_micro_batch_api():
    from accelerate import Accelerator

    batches = [d["input_ids"].unsqueeze(0) for d in dataset(5)]  # 5 batches: cycles 2, 2, 1

    ref = tiny_model()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    acc_ref = GradientAccumulator(ref, 2, rank=4)
    for i, x in enumerate(batches):
        with acc_ref.micro_batch(last=i == len(batches) - 1):
            (ref(input_ids=x, labels=x).loss / 2).backward()
        if acc_ref.sync_gradients:
            opt_ref.step()
            opt_ref.zero_grad()

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    loader = torch.utils.data.DataLoader([x[0] for x in batches], batch_size=1)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    acc = GradientAccumulator(model, 2, rank=4, is_last_micro_batch=accelerate_sync())
    for x in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=x, labels=x).loss)
            opt.step()
            opt.zero_grad()
    assert acc.cycle == 3 and acc.position == 0
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_target_modules_that_match_nothing_warn():
    """The old README snippet, target_modules=["attn", "mlp"], compresses nothing of a BERT."""
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    bert = transformers.BertModel(config)
    args = transformers.TrainingArguments(output_dir="unused", report_to=[])
    unmatched = r"target_modules \['attn', 'mlp'\] match no parameter.*encoder\.layer\.\*\."
    with pytest.warns(UserWarning, match=unmatched):
        create_flora_optimizer(bert, args, rank=4, target_modules=["attn", "mlp"])
    with pytest.warns(UserWarning, match=r"target_modules \['mlp'\] match no parameter"):
        create_flora_optimizer(bert, args, rank=4, target_modules=["attention", "mlp"])
