"""Beyond text (paper Appendix C.1): a small Vision Transformer (``transformers``
``ViTConfig``, no download) on Fashion-MNIST, AdamW against Flora and FloraAdamW (and
Adafactor, Flora's base), each with a small step-size sweep.

Deviation: the paper uses CIFAR-100, which no registry reachable here carries; Fashion-MNIST
(28×28 grey images, 10 classes, patches of 7×7) stands in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_experiments.memory import optimizer_state_bytes
from flora_experiments.methods import best_of_sweep, edge_note, sweep
from flora_experiments.report import Results

__all__ = ["OPTIMIZERS", "ViTConfig", "run"]

OPTIMIZERS: dict[str, tuple[float, ...]] = {
    "adamw": (3e-4, 1e-3, 3e-3),
    "adafactor": (1e-2, 3e-2, 1e-1),
    "flora": (1e-2, 3e-2, 1e-1),
    "flora-adamw": (3e-4, 1e-3, 3e-3),
}


@dataclass
class ViTConfig:
    epochs: int = 5
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    intermediate: int = 256
    patch: int = 7
    batch: int = 128
    rank: int = 16
    kappa: int = 200
    train_limit: int | None = None
    evals_per_epoch: int = 2
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    lr_slice: slice | None = None  # run only this part of each sweep (None: all of it)
    widen: int = 2  # step sizes tried past a sweep edge while the best sits on it
    seed: int = 0

    @classmethod
    def quick(cls) -> ViTConfig:
        return cls(
            epochs=1, hidden=64, layers=4, intermediate=128, batch=64, rank=8, kappa=100,
            train_limit=20000, lr_slice=slice(1, 3),
        )  # fmt: skip


def _model(cfg: ViTConfig) -> nn.Module:
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTForImageClassification

    torch.manual_seed(cfg.seed)
    config = HFViTConfig(
        image_size=28, patch_size=cfg.patch, num_channels=1, hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate, num_labels=10,
    )  # fmt: skip
    return ViTForImageClassification(config)


def _optimizer(name: str, model: nn.Module, lr: float, cfg: ViTConfig) -> torch.optim.Optimizer:
    import flora

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if name == "adafactor":
        return torch.optim.Adafactor(model.parameters(), lr=lr)
    if name == "flora":
        return flora.Flora(model.named_parameters(), lr=lr, rank=cfg.rank, kappa=cfg.kappa)
    if name == "flora-adamw":
        return flora.FloraAdamW(model.named_parameters(), lr=lr, rank=cfg.rank, kappa=cfg.kappa)
    raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(pixel_values=x[i : i + 1000]).logits.argmax(-1) == y[i : i + 1000]).sum())
        for i in range(0, len(x), 1000)
    )
    model.train()
    return correct / len(x)


def train_one(name: str, lr: float, cfg: ViTConfig, train, test) -> dict[str, Any]:
    model = _model(cfg)
    opt = _optimizer(name, model, lr, cfg)
    x, y = train
    steps_per_epoch = len(x) // cfg.batch
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total, pct_start=0.1, anneal_strategy="cos",
        cycle_momentum=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    curve, times, step = [], [], 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch : (s + 1) * cfg.batch]
            start = time.perf_counter()
            F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            times.append(time.perf_counter() - start)
            step += 1
            if step % every == 0:
                curve.append((step / steps_per_epoch, _accuracy(model, *test)))
    return {
        "optimizer": name,
        "lr": lr,
        "accuracy": curve[-1][1],
        "state_bytes": optimizer_state_bytes(opt),
        "seconds_per_step": sum(times[5:]) / max(1, len(times[5:])),
        "curve": curve,
    }


def _step_seconds(cfg: ViTConfig, lrs: dict[str, float], train) -> dict[str, float]:
    """Seconds per training step of each optimizer at its best lr, timed interleaved."""
    from flora_experiments.timing import interleaved_seconds

    x, y = train[0][: cfg.batch], train[1][: cfg.batch]
    steps = {}
    for name, lr in lrs.items():
        model = _model(cfg)
        opt = _optimizer(name, model, lr, cfg)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            F.cross_entropy(model(pixel_values=x).logits, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    return interleaved_seconds(steps)


def run(cfg: ViTConfig, *, name: str, data_root=None) -> Results:
    from flora_experiments.datasets import fashion_mnist

    unknown = [o for o in cfg.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"optimizers must be among {tuple(OPTIMIZERS)}, got {unknown}")
    images, labels = fashion_mnist("train", data_root, cfg.train_limit)
    test_images, test_labels = fashion_mnist("test", data_root)
    train = (images.unsqueeze(1), labels)
    test = (test_images.unsqueeze(1), test_labels)
    runs = {}
    for o in cfg.optimizers:
        lrs = OPTIMIZERS[o][cfg.lr_slice] if cfg.lr_slice else OPTIMIZERS[o]
        runs[o] = sweep(lambda lr, o=o: train_one(o, lr, cfg, train, test), lrs, "accuracy",
                        lower=False, extend=cfg.widen)  # fmt: skip
    best = {
        o: best_of_sweep(rs, "accuracy", lower=False, describe=lambda r: f"{r['accuracy']:.4f}")
        for o, rs in runs.items()
    }
    base = runs.get("adamw") or next(iter(runs.values()))
    seconds = _step_seconds(cfg, {o: b["lr"] for o, b in best.items()}, train)
    base_time = seconds[base[0]["optimizer"]]
    res = Results(
        name=name,
        title="ViT on Fashion-MNIST (Appendix C.1): test accuracy and optimizer state",
        columns=[
            ("optimizer", "optimizer"),
            ("lr", "best lr"),
            ("accuracy", "test accuracy"),
            ("state_bytes", "state bytes"),
            ("state_ratio", "state / AdamW"),
            ("time_ratio", "time/step vs AdamW"),
            ("sweep", "accuracy at each lr"),
        ],
        seed=cfg.seed,
        curve_axes=("epoch", "test accuracy"),
    )
    for o, b in best.items():
        res.rows.append(
            {
                **{k: v for k, v in b.items() if k != "curve"},
                "state_ratio": b["state_bytes"] / base[0]["state_bytes"],
                "time_ratio": seconds[o] / base_time,
            }
        )
        res.curves[f"{o} (lr {b['lr']:g})"] = b["curve"]
    res.notes.append(
        f"ViT: hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads, MLP "
        f"{cfg.intermediate}, patches {cfg.patch}×{cfg.patch}; {len(images):,} training and "
        f"{len(test_images):,} test images, {cfg.epochs} epoch(s), batch {cfg.batch}, one-cycle "
        f"schedule; Flora rank {cfg.rank}, kappa {cfg.kappa}."
    )
    res.notes.append(edge_note(res.rows, cfg.widen, "optimizer"))
    acc = {r["optimizer"]: r["accuracy"] for r in res.rows}
    if "flora" in acc and "adamw" in acc:
        res.notes.append(
            f"Paper (C.1, CIFAR-100): Flora matches Adam's accuracy with less optimizer memory. "
            f"Here Flora {acc['flora']:.4f} vs AdamW {acc['adamw']:.4f}."
        )
    return res
