r"""Language-model pre-training from scratch (paper Table 6, with Tables 2 and 4's rows and
the peers of the issue): a small LLaMA-style decoder built from a ``transformers``
``LlamaConfig`` (no download) on real text, byte-level (vocabulary 256), every optimizer from
its real package with a small step-size sweep; the best step size per optimizer is reported
and every run is kept in the JSON.

Optimizers (``OPTIMIZERS``):

* ``adamw`` — ``torch.optim.AdamW``; ``adafactor`` — ``torch.optim.Adafactor`` (no momentum,
  the paper's "None"); ``adafactor-momentum`` — ``flora.Flora(compress=False)``: Adafactor
  with full-size momentum (the paper's "Naive");
* ``flora`` — ``flora.Flora`` (Adafactor base, compressed momentum, rank ``r``) in
  flora-opt's form (``momentum_variant="history"``, Gaussian projection), the library's
  default before the quality study;
  ``linear-momentum`` / ``flora-linear`` — the same with a full-size second moment
  (``factor_second_moment=False``, Table 4's linear-memory base) and full-size / compressed
  momentum; ``flora-adamw`` — ``flora.FloraAdamW`` (AdamW base);
* ``flora-subspace`` / ``flora-subspace-coords`` / ``flora-subspace-gaussian`` —
  ``flora.Flora`` with ``momentum_variant="subspace"`` and an orthonormal / coordinate /
  Gaussian projection;
  ``flora-orthonormal`` — the default variant with an orthonormal projection;
  ``flora-adamw-subspace`` — ``flora.FloraAdamW`` with the subspace variant (``FLORA_FORMS``);
  ``flora-gradient`` / ``flora-adamw-gradient`` — the subspace variant with each window's
  basis taken from the gradient (``distribution="gradient"``, the basis kept in the state);
  ``flora-gradient-bf16`` — the same with the basis kept in bf16 (``basis_dtype``);
  the lean ingredients (issue 16), each on ``flora-gradient``: ``-sr`` bf16 weights without
  float32 masters, rounded stochastically; ``-nearest`` bf16 weights rounded to nearest (what
  ``-sr`` fixes); ``-compensated`` bf16 weights with Kahan compensation; ``-bf16state`` bf16
  moments and basis (float32 weights); ``-lean`` bf16 weights (stochastic) and state;
  ``flora-lean-preset`` — the whole preset, :func:`flora.lean_setup` with default Flora: the
  same as ``-lean`` plus compressed accumulation of each batch as ``LEAN_ACCUMULATE``
  micro-batches with step-in-backward (as many examples per step as every other row);
  ``flora-accumulate`` — default Flora in float32 with the same compressed accumulation
  (:class:`flora.GradientAccumulator`, rank ``r``, then ``opt.step()``): the preset's
  accumulation without its bf16; ``flora-accumulate-sketch`` — the same with the
  accumulator's low-rank sketch (``distribution="sketch"``) in place of its projection;
  ``flora-adamw-fira`` / ``flora-adamw-fira-gradient`` — ``flora.FloraAdamW`` with
  ``preconditioner="subspace"`` (both moments in the subspace, the remainder scaled, GaLore +
  Fira) on an orthonormal / gradient basis; a ``-xemb`` suffix leaves the token embedding
  and the head uncompressed (``exclude``), the scope of the GaLore / APOLLO / LoRA rows;
* ``flora-opt`` — the official ``flora_opt.Flora`` (rank ``r``, ``beta1=0.9``);
* ``adamw-quarter`` — ``torch.optim.AdamW`` with the attention and MLP matrices at a quarter
  of the step size: GaLore's step sizes (its ``scale=0.25``) without its projection;
  ``flora-adamw-galore-split`` — ``flora.FloraAdamW(preconditioner="subspace",
  distribution="gradient")`` in GaLore's setting: the attention and MLP matrices compressed at
  a quarter of the step size, the rest uncompressed (AdamW) at the full step size;
* ``galore`` — ``galore_torch.GaLoreAdamW`` and ``apollo`` — ``apollo_torch.APOLLOAdamW``
  (random projection), both at rank ``r`` on the attention and MLP matrices with their
  projection refreshed every ``kappa`` steps (``update_proj_gap``), AdamW elsewhere;
* ``lora`` — ``peft`` LoRA of rank ``r`` on the attention and MLP matrices (alpha = r), with
  the embeddings, norms and head trained in full, ``torch.optim.AdamW``.

Equal rank, equal data order and initial weights, warm-up of 10% then cosine decay to 10%
for all. The state bytes are exact (:func:`flora_experiments.memory.optimizer_state_bytes`,
projection matrices of GaLore/APOLLO included); time per step (forward, backward, step) is a
ratio to AdamW's, timed interleaved after the sweeps (:mod:`flora_experiments.timing`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from flora_experiments.memory import optimizer_state_bytes, parameter_bytes
from flora_experiments.methods import best_of_sweep, edge_note, sweep
from flora_experiments.report import Results

__all__ = ["OPTIMIZERS", "LMConfig", "run", "run_kappa", "train_one"]

MATRICES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDINGS = [r"embed_tokens", r"lm_head"]  # what the peers' rows leave to AdamW with the norms
ADAM_LRS = (1e-3, 3e-3, 1e-2)
ADAFACTOR_LRS = (1e-2, 3e-2, 1e-1)  # relative step caps
OPTIMIZERS: dict[str, tuple[str, tuple[float, ...]]] = {  # name -> (package, full lr sweep)
    "adamw": ("torch", ADAM_LRS),
    "adafactor": ("torch", ADAFACTOR_LRS),
    "adafactor-momentum": ("flora (compress=False)", ADAFACTOR_LRS),
    "flora": ("flora", ADAFACTOR_LRS),
    "flora-adamw": ("flora", ADAM_LRS),
    "flora-subspace": ("flora (subspace momentum, orthonormal)", ADAFACTOR_LRS),
    "flora-subspace-gaussian": ("flora (subspace momentum, gaussian)", ADAFACTOR_LRS),
    "flora-subspace-coords": ("flora (subspace momentum, coordinates)", ADAFACTOR_LRS),
    "flora-orthonormal": ("flora (orthonormal projection)", ADAFACTOR_LRS),
    "flora-adamw-subspace": ("flora (subspace momentum, orthonormal)", ADAM_LRS),
    "flora-gradient": ("flora (subspace momentum, gradient basis)", ADAFACTOR_LRS),
    "flora-adamw-gradient": ("flora (subspace momentum, gradient basis)", ADAM_LRS),
    "flora-gradient-bf16": ("flora (subspace momentum, gradient basis in bf16)", ADAFACTOR_LRS),
    "flora-gradient-sr": ("flora (bf16 weights, stochastic rounding)", ADAFACTOR_LRS),
    "flora-gradient-nearest": ("flora (bf16 weights, round to nearest)", ADAFACTOR_LRS),
    "flora-gradient-compensated": ("flora (bf16 weights, Kahan compensation)", ADAFACTOR_LRS),
    "flora-gradient-bf16state": ("flora (bf16 moments and basis)", ADAFACTOR_LRS),
    "flora-gradient-lean": ("flora (bf16 weights and state, stochastic)", ADAFACTOR_LRS),
    "flora-lean-preset": ("flora.lean_setup (+ accumulation of 4, in backward)", ADAFACTOR_LRS),
    "flora-accumulate": ("flora (float32; compressed accumulation of 4)", ADAFACTOR_LRS),
    "flora-accumulate-sketch": ("flora (float32; sketched accumulation of 4)", ADAFACTOR_LRS),
    "flora-adamw-fira": ("flora (subspace Adam + scaled remainder, orthonormal)", ADAM_LRS),
    "flora-adamw-fira-gradient": ("flora (subspace Adam + scaled remainder, gradient)", ADAM_LRS),
    "flora-gradient-xemb": ("flora (gradient basis; embeddings, head full)", ADAFACTOR_LRS),
    "flora-subspace-xemb": ("flora (orthonormal; embeddings, head full)", ADAFACTOR_LRS),
    "flora-adamw-fira-xemb": ("flora (subspace Adam; embeddings, head full)", ADAM_LRS),
    "linear-momentum": ("flora (compress=False, factor_second_moment=False)", ADAFACTOR_LRS),
    "flora-linear": ("flora (factor_second_moment=False)", ADAFACTOR_LRS),
    "flora-opt": ("flora-opt", ADAFACTOR_LRS),
    "galore": ("galore-torch", ADAM_LRS),
    "adamw-quarter": ("torch (matrices at lr / 4)", ADAM_LRS),
    "flora-adamw-galore-split": ("flora (subspace Adam, gradient; GaLore's groups)", ADAM_LRS),
    "apollo": ("apollo-torch", ADAM_LRS),
    "lora": ("peft", ADAM_LRS),
}


#: micro-batches per step of the ``flora-lean-preset`` row (each batch split into them)
LEAN_ACCUMULATE = 4
_GRADIENT = {"momentum_variant": "subspace", "distribution": "gradient", "basis_dtype": None}
_BF16_STATE = {"moment_dtype": torch.bfloat16, "basis_dtype": torch.bfloat16}
# the quality study's forms of Flora (issue 17): options on top of the defaults
FLORA_FORMS: dict[str, dict[str, Any]] = {
    # every form pins what it measured, so a change of the library's defaults leaves it be;
    # flora-opt's form, the library default before the study: the ``flora`` rows keep it
    "flora": {"momentum_variant": "history", "distribution": "gaussian"},
    "flora-adamw": {
        "momentum_variant": "history",
        "distribution": "gaussian",
        "preconditioner": "elementwise",
    },
    "flora-linear": {"momentum_variant": "history", "distribution": "gaussian"},
    "flora-subspace": {"momentum_variant": "subspace", "distribution": "orthonormal"},
    "flora-subspace-gaussian": {"momentum_variant": "subspace", "distribution": "gaussian"},
    "flora-subspace-coords": {"momentum_variant": "subspace", "distribution": "coordinates"},
    "flora-orthonormal": {"momentum_variant": "history", "distribution": "orthonormal"},
    "flora-adamw-subspace": {
        "momentum_variant": "subspace",
        "distribution": "orthonormal",
        "preconditioner": "elementwise",
    },
    "flora-gradient": _GRADIENT,  # the basis in float32 (the state dtype)
    "flora-gradient-bf16": {
        "momentum_variant": "subspace",
        "distribution": "gradient",
        "basis_dtype": torch.bfloat16,
    },
    "flora-adamw-gradient": {**_GRADIENT, "preconditioner": "elementwise"},
    "flora-adamw-fira": {"preconditioner": "subspace", "distribution": "orthonormal"},
    "flora-adamw-fira-gradient": {
        "preconditioner": "subspace",
        "distribution": "gradient",
        "basis_dtype": None,
    },
    # the lean ingredients; "bf16_weights" casts the model to bf16 (no float32 masters)
    "flora-gradient-sr": {**_GRADIENT, "bf16_weights": True, "rounding": "stochastic"},
    "flora-gradient-nearest": {**_GRADIENT, "bf16_weights": True, "rounding": "nearest"},
    "flora-gradient-compensated": {**_GRADIENT, "bf16_weights": True, "rounding": "compensated"},
    "flora-gradient-bf16state": {**_GRADIENT, **_BF16_STATE},
    "flora-gradient-lean": {
        **_GRADIENT,
        **_BF16_STATE,
        "bf16_weights": True,
        "rounding": "stochastic",
    },
    # the scope of the GaLore / APOLLO / LoRA rows: the token embedding and the head uncompressed
    "flora-gradient-xemb": {"distribution": "gradient", "basis_dtype": None, "exclude": EMBEDDINGS},
    "flora-subspace-xemb": {"distribution": "orthonormal", "exclude": EMBEDDINGS},
    "flora-adamw-fira-xemb": {"preconditioner": "subspace", "exclude": EMBEDDINGS},
}


@dataclass
class LMConfig:
    corpus: str = "shakespeare"
    max_bytes: int | None = None
    hidden: int = 256
    layers: int = 6
    heads: int = 4
    intermediate: int = 688
    seq: int = 128
    batch: int = 16
    steps: int = 2000
    rank: int = 64
    kappa: int = 200
    eval_batches: int = 40
    evals: int = 10
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    lr_slice: slice | None = None  # run only this part of each sweep (None: all of it)
    lr: float | None = None  # run only this step size (seeds at a sweep's best; no sweep)
    widen: int = 2  # step sizes tried past a sweep edge while the best sits on it
    kappas: tuple[int, ...] = (1, 10, 100, 1000, 10000)
    kappa_lr: float = 3e-2
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> LMConfig:
        return cls(
            hidden=128, layers=4, intermediate=352, batch=8, steps=200, rank=32, kappa=50,
            eval_batches=20, evals=5, kappas=(1, 10, 50, 1000),
        )  # fmt: skip

    def lrs(self, name: str) -> tuple[float, ...]:
        if self.lr is not None:
            return (float(self.lr),)
        sweep = OPTIMIZERS[name][1]
        return sweep[self.lr_slice] if self.lr_slice else sweep


def _model(cfg: LMConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=cfg.seq,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _lowrank_groups(model: nn.Module, extra: dict[str, Any]) -> list[dict[str, Any]]:
    low = [p for n, p in model.named_parameters() if any(m in n for m in MATRICES)]
    ids = {id(p) for p in low}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest}, {"params": low, **extra}]


def build(name: str, cfg: LMConfig, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model (same initial weights every time) and ``name``'s optimizer at ``lr``."""
    model = _model(cfg)
    r, kappa = cfg.rank, cfg.kappa
    if name == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if name == "adamw-quarter":  # GaLore's step sizes without its projection (scale 0.25)
        rest, low = _lowrank_groups(model, {})
        groups = [rest, {**low, "lr": lr * 0.25}]
        return model, torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    if name == "adafactor":
        return model, torch.optim.Adafactor(model.parameters(), lr=lr)
    if name in ("adafactor-momentum", "linear-momentum") or (
        name in FLORA_FORMS and not name.startswith("flora-adamw")
    ):
        from flora import Flora

        form = dict(FLORA_FORMS.get(name, {}))
        if form.pop("bf16_weights", False):
            model.to(torch.bfloat16)
        opt = Flora(
            model.named_parameters(), lr=lr, rank=r, kappa=kappa,
            compress=name.startswith("flora"), factor_second_moment="linear" not in name,
            **form,
        )  # fmt: skip
        return model, opt
    if name == "flora-adamw-galore-split":  # GaLore's setting: matrices at lr/4, rest AdamW
        from flora import FloraAdamW

        named = dict(model.named_parameters())
        low = [n for n in named if any(m in n for m in MATRICES)]
        rest = [n for n in named if n not in low]
        groups = [
            {"params": [(n, named[n]) for n in rest], "compress": False},
            {"params": [(n, named[n]) for n in low], "lr": lr * 0.25},
        ]
        return model, FloraAdamW(
            groups, lr=lr, rank=r, kappa=kappa, weight_decay=0.0, preconditioner="subspace",
            distribution="gradient", basis_dtype=None,
        )  # fmt: skip
    if name.startswith("flora-adamw"):
        from flora import FloraAdamW

        return model, FloraAdamW(
            model.named_parameters(), lr=lr, rank=r, kappa=kappa, weight_decay=0.0,
            **FLORA_FORMS.get(name, {}),
        )  # fmt: skip
    if name == "flora-opt":
        from flora_opt import Flora as OfficialFlora

        return model, OfficialFlora(model.parameters(), lr=lr, rank=r, kappa=kappa, beta1=0.9)
    if name == "galore":
        from galore_torch import GaLoreAdamW

        groups = _lowrank_groups(
            model, {"rank": r, "update_proj_gap": kappa, "scale": 0.25, "proj_type": "std"}
        )
        return model, GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
    if name == "apollo":
        from apollo_torch import APOLLOAdamW

        extra = {"rank": r, "proj": "random", "scale_type": "channel", "update_proj_gap": kappa,
                 "scale": 1.0, "proj_type": "std"}  # fmt: skip
        return model, APOLLOAdamW(_lowrank_groups(model, extra), lr=lr, weight_decay=0.0)
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=r, target_modules=MATRICES, lora_dropout=0.0)
        )
        for n, p in peft_model.named_parameters():
            if "lora_" in n or not any(m in n for m in MATRICES):
                p.requires_grad_(True)  # adapters, embeddings, norms and head
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        return peft_model, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, steps // 10)

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        progress = (t - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _batches(data: torch.Tensor, cfg: LMConfig, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ix = torch.randint(len(data) - cfg.seq - 1, (cfg.batch,), generator=gen)
        yield torch.stack([data[i : i + cfg.seq] for i in ix.tolist()])


@torch.no_grad()
def _evaluate(model: nn.Module, val: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(float(model(input_ids=x, labels=x).loss) for x in val) / len(val)
    model.train()
    return loss


def build_run(
    name: str, cfg: LMConfig, lr: float
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[torch.Tensor], None], Any]:
    """:func:`build`, with the training step for one batch (forward, backward, step) and the
    row's gradient accumulator (None but for the ``flora-accumulate`` rows and
    ``flora-lean-preset``; the preset's steps inside backward, so its training step calls no
    ``opt.step()``)."""
    if name not in ("flora-accumulate", "flora-accumulate-sketch", "flora-lean-preset"):
        model, opt = build(name, cfg, lr)

        def step(x: torch.Tensor) -> None:
            model(input_ids=x, labels=x).loss.backward()
            opt.step()

        return model, opt, step, None
    import flora

    model = _model(cfg)
    if name == "flora-lean-preset":  # the accumulator steps inside backward
        setup = flora.lean_setup(
            model, "flora", accumulate=LEAN_ACCUMULATE, rank=cfg.rank, kappa=cfg.kappa, lr=lr
        )
        opt, acc = setup.optimizer, setup.accumulator
    else:  # the preset's seeds: the accumulator's is the optimizer's + 1
        opt = flora.Flora(model.named_parameters(), lr=lr, rank=cfg.rank, kappa=cfg.kappa)
        how = "sketch" if name == "flora-accumulate-sketch" else "gaussian"
        acc = flora.GradientAccumulator(
            model, LEAN_ACCUMULATE, rank=cfg.rank, seed=1, distribution=how
        )

    def accumulated_step(x: torch.Tensor) -> None:  # equal micro-batches: mean of means
        for micro in x.chunk(LEAN_ACCUMULATE):
            with acc.micro_batch():
                (model(input_ids=micro, labels=micro).loss / LEAN_ACCUMULATE).backward()
        if name != "flora-lean-preset":
            opt.step()

    return model, opt, accumulated_step, acc


def train_one(
    name: str,
    lr: float,
    cfg: LMConfig,
    train: torch.Tensor,
    val: list[torch.Tensor],
    kappa: int | None = None,
) -> dict[str, Any]:
    """Train one (optimizer, lr); returns held-out loss, curve, exact state bytes, timing."""
    run_cfg = cfg if kappa is None else replace(cfg, kappa=kappa)
    model, opt, train_step, acc = build_run(name, run_cfg, lr)
    sched = _schedule(opt, cfg.steps)
    every = max(1, cfg.steps // cfg.evals)
    curve, times = [], []
    for step, x in enumerate(_batches(train, cfg, cfg.steps, cfg.seed + 1), start=1):
        start = time.perf_counter()
        train_step(x)
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter() - start)
        if step % every == 0 or step == cfg.steps:
            curve.append((step, _evaluate(model, val)))
    warm = min(5, len(times) - 1)
    final = curve[-1][1]
    if acc is not None:
        acc.remove()
    return {
        "optimizer": name,
        "lr": lr,
        "kappa": run_cfg.kappa,
        "val_loss": final,
        "val_ppl": math.exp(final) if final < 50 else float("inf"),
        "state_bytes": optimizer_state_bytes(opt),
        "trainable_bytes": parameter_bytes(model.parameters(), trainable_only=True),
        "param_bytes": parameter_bytes(model.parameters()),
        "seconds_per_step": sum(times[warm:]) / len(times[warm:]),
        "curve": curve,
    }


def _data(cfg: LMConfig, data_root=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from flora_experiments.datasets import text_corpus

    data = text_corpus(cfg.corpus, data_root, cfg.max_bytes)
    split = int(0.9 * len(data))
    val = list(_batches(data[split:], cfg, cfg.eval_batches, cfg.seed + 2))
    return data[:split], val


def _describe(cfg: LMConfig, train: torch.Tensor) -> str:
    return (
        f"LLaMA-style decoder: hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads, "
        f"MLP {cfg.intermediate}, byte vocabulary; {cfg.corpus} ({len(train):,} training bytes), "
        f"sequence {cfg.seq}, batch {cfg.batch}, {cfg.steps} steps; rank {cfg.rank}, "
        f"kappa / update_proj_gap {cfg.kappa}; held-out loss over {cfg.eval_batches} fixed "
        "batches, perplexity per byte."
    )


def run(cfg: LMConfig, *, name: str, data_root=None) -> Results:
    """Every optimizer over its step-size sweep; best per optimizer reported."""
    unknown = [o for o in cfg.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"optimizers must be among {tuple(OPTIMIZERS)}, got {unknown}")
    train, val = _data(cfg, data_root)
    runs = {}
    for o in cfg.optimizers:
        runs[o] = sweep(lambda lr, o=o: train_one(o, lr, cfg, train, val), cfg.lrs(o),
                        "val_loss", lower=True, extend=cfg.widen)  # fmt: skip
    best = {
        o: best_of_sweep(rs, "val_loss", lower=True, describe=lambda r: f"{r['val_ppl']:.3f}")
        for o, rs in runs.items()
    }
    base = runs.get("adamw") or next(iter(runs.values()))
    base_state = base[0]["state_bytes"]
    best_lr = {o: b["lr"] for o, b in best.items()}
    seconds = _step_seconds(cfg, best_lr, train)
    base_time = seconds[base[0]["optimizer"]]
    res = Results(
        name=name,
        title="LM pre-training from scratch (Table 6 + peers): held-out perplexity, state memory",
        columns=[
            ("optimizer", "optimizer"),
            ("package", "package"),
            ("lr", "best lr"),
            ("val_ppl", "held-out ppl"),
            ("state_bytes", "state bytes"),
            ("state_ratio", f"state / {base[0]['optimizer']}"),
            ("trainable_bytes", "trainable param bytes"),
            ("time_ratio", f"time/step vs {base[0]['optimizer']}"),
            ("sweep", "ppl at each lr"),
        ],
        seed=cfg.seed,
        curve_axes=("step", "held-out loss (nats/byte)"),
    )
    for o, b in best.items():
        res.rows.append(
            {
                **{k: v for k, v in b.items() if k != "curve"},
                "package": OPTIMIZERS[o][0],
                "state_ratio": b["state_bytes"] / base_state if base_state else None,
                "time_ratio": seconds[o] / base_time,
            }
        )
        res.curves[f"{o} (lr {b['lr']:g})"] = b["curve"]
    res.notes.append(_describe(cfg, train))
    if cfg.lr is None:
        res.notes.append(edge_note(res.rows, cfg.widen, "optimizer"))
    else:
        res.notes.append(
            f"No sweep: every row at lr {cfg.lr:g} (`--set lr=...`, a seed rerun at the best "
            "step size of a sweep made with another seed)."
        )
    res.notes += _lm_findings(res.rows)
    return res


def _step_seconds(cfg: LMConfig, lrs: dict[str, float], train: torch.Tensor) -> dict[str, float]:
    """Seconds per training step of each optimizer at its best lr, timed interleaved."""
    from flora_experiments.timing import interleaved_seconds

    x = next(_batches(train, cfg, 1, cfg.seed + 3))
    steps = {}
    accumulators = []
    for name, lr in lrs.items():
        _, opt, train_step, acc = build_run(name, cfg, lr)
        accumulators.append(acc)

        def step(train_step=train_step, opt: torch.optim.Optimizer = opt) -> None:
            train_step(x)
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    seconds = interleaved_seconds(steps)
    for acc in accumulators:
        if acc is not None:
            acc.remove()
    return seconds


def _loss_key(run: dict[str, Any]) -> float:
    """A diverged run (NaN loss) ranks last."""
    return run["val_loss"] if math.isfinite(run["val_loss"]) else math.inf


def _lm_findings(rows: list[dict[str, Any]]) -> list[str]:
    ppl = {r["optimizer"]: r["val_ppl"] for r in rows}
    notes = []
    if "flora" in ppl and "galore" in ppl:
        better = "better than" if ppl["flora"] < ppl["galore"] else "NOT better than"
        notes.append(
            f"Paper (Table 6): Flora reaches lower perplexity than GaLore at equal rank. Here "
            f"Flora {ppl['flora']:.3f} is {better} GaLore {ppl['galore']:.3f}."
        )
    if {"flora", "adafactor", "adafactor-momentum"} <= ppl.keys():
        notes.append(
            "Paper (Table 2): None > Flora ≳ Naive momentum in loss. Here: Adafactor without "
            f"momentum {ppl['adafactor']:.3f}, Flora {ppl['flora']:.3f}, full momentum "
            f"{ppl['adafactor-momentum']:.3f}."
        )
    if {"flora-linear", "linear-momentum"} <= ppl.keys():
        notes.append(
            "Paper (Table 4, linear-memory base = Adafactor with an unfactored second moment): "
            f"Flora close to naive momentum. Here: Flora {ppl['flora-linear']:.3f}, full "
            f"momentum {ppl['linear-momentum']:.3f}."
        )
    if {"flora-adamw", "adamw"} <= ppl.keys():
        notes.append(
            f"AdamW base: FloraAdamW {ppl['flora-adamw']:.3f} vs AdamW {ppl['adamw']:.3f}."
        )
    return notes


def run_kappa(cfg: LMConfig, *, name: str, data_root=None) -> Results:
    """Flora at one step size for each resampling interval kappa (Table 3)."""
    train, val = _data(cfg, data_root)
    runs = [train_one("flora", cfg.kappa_lr, cfg, train, val, kappa=k) for k in cfg.kappas]
    res = Results(
        name=name,
        title="Resampling interval kappa (Table 3): Flora, LM pre-training",
        columns=[
            ("kappa", "kappa"),
            ("resamples", "resamplings in the run"),
            ("val_ppl", "held-out ppl"),
            ("val_loss", "held-out loss"),
            ("state_bytes", "state bytes"),
        ],
        seed=cfg.seed,
        curve_axes=("step", "held-out loss (nats/byte)"),
    )
    for r in runs:
        res.rows.append(
            {
                **{k: v for k, v in r.items() if k != "curve"},
                "resamples": (cfg.steps - 1) // r["kappa"],
            }
        )
        res.curves[f"kappa {r['kappa']}"] = r["curve"]
    res.notes.append(_describe(cfg, train) + f" Step size {cfg.kappa_lr:g} for every kappa.")
    best = min(runs, key=_loss_key)
    res.notes.append(
        f"Best kappa here: {best['kappa']} (held-out ppl {best['val_ppl']:.3f}). The paper finds "
        "both extremes worse: kappa too small forgets the momentum at every transfer, kappa "
        "too large keeps the update in one subspace for long."
    )
    return res
