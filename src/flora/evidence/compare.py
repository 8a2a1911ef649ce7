"""``flora compare``: run one experiment of the evidence harness and write its results.

Each experiment has a ``quick`` size (a few minutes on 2 CPU cores) and a full size; results
go to ``<out>/<experiment>_<quick|full>.{md,json,png}``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["EXPERIMENTS", "compare"]


@dataclass(frozen=True)
class Experiment:
    summary: str
    config: Callable[[bool], Any]  # quick -> config
    runner: Callable[..., Any]  # (config, name=..., data_root=...) -> Results


def _pilot() -> Experiment:
    from flora.evidence import pilot

    return Experiment(
        "pilot study, Fashion-MNIST MLP: SGD / LoRA / LoRA(B) / RP / RRP (paper Figure 1)",
        lambda quick: pilot.PilotConfig.quick() if quick else pilot.PilotConfig(),
        pilot.run,
    )


def _lm() -> Experiment:
    from flora.evidence import lm

    return Experiment(
        "LM pre-training, LLaMA-style on Shakespeare: Flora vs AdamW, Adafactor, flora-opt, "
        "GaLore, APOLLO, LoRA (Tables 2, 4, 6)",
        lambda quick: lm.LMConfig.quick() if quick else lm.LMConfig(),
        lm.run,
    )


def _kappa() -> Experiment:
    from flora.evidence import lm

    return Experiment(
        "resampling interval kappa sweep, LM pre-training (Table 3)",
        lambda quick: lm.LMConfig.quick() if quick else lm.LMConfig(),
        lm.run_kappa,
    )


def _vit() -> Experiment:
    from flora.evidence import vit

    return Experiment(
        "ViT on Fashion-MNIST: AdamW vs Flora / FloraAdamW (Appendix C.1)",
        lambda quick: vit.ViTConfig.quick() if quick else vit.ViTConfig(),
        vit.run,
    )


def _profile() -> Experiment:
    from flora.evidence import profile

    return Experiment(
        "memory by category for AdamW / LoRA / Flora, activation checkpointing and "
        "step-in-backward on and off (Appendix C.3, Figure 2)",
        lambda quick: profile.ProfileConfig.quick() if quick else profile.ProfileConfig(),
        profile.run,
    )


EXPERIMENTS: dict[str, Callable[[], Experiment]] = {
    "pilot": _pilot,
    "lm": _lm,
    "kappa": _kappa,
    "vit": _vit,
    "profile": _profile,
}


def compare(
    experiment: str,
    *,
    quick: bool,
    out: str | Path,
    seed: int = 0,
    data_root: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Path]:
    """Run ``experiment`` and write its results into ``out``; returns the files written."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {tuple(EXPERIMENTS)}, got {experiment!r}")
    exp = EXPERIMENTS[experiment]()
    cfg = exp.config(quick)
    unknown = set(overrides or {}) - set(vars(cfg))
    if unknown:
        raise ValueError(f"{experiment} has no setting(s) {sorted(unknown)}")
    cfg = replace(cfg, seed=seed, **(overrides or {}))
    torch.manual_seed(seed)
    name = f"{experiment}_{'quick' if quick else 'full'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peers' deprecation notices
        results = exp.runner(cfg, name=name, data_root=Path(data_root) if data_root else None)
    return results.write(out)
