"""``flora-experiments``: run one experiment of the evidence harness and write its results.

Each experiment has a ``quick`` size (3 to 40 minutes on 2 CPU cores) and a full size;
results go to ``<out>/<experiment>_<quick|full>.{md,json,png}``.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["EXPERIMENTS", "compare"]


@dataclass(frozen=True)
class Experiment:
    """One experiment: its module under ``flora_experiments``, config class and runner."""

    summary: str
    module: str
    config_class: str
    runner: str = "run"

    def config(self, quick: bool) -> Any:
        cls = getattr(
            importlib.import_module(f"flora_experiments.{self.module}"), self.config_class
        )
        return cls.quick() if quick else cls()

    def run(self, cfg: Any, **kwargs: Any) -> Any:
        module = importlib.import_module(f"flora_experiments.{self.module}")
        return getattr(module, self.runner)(cfg, **kwargs)


EXPERIMENTS: dict[str, Experiment] = {
    "pilot": Experiment(
        "pilot study, Fashion-MNIST MLP: SGD / LoRA / LoRA(B) / RP / RRP (paper Figure 1)",
        "pilot", "PilotConfig",
    ),
    "accumulate": Experiment(
        "gradient accumulation, MiniLM fine-tuned with batch 1 and tau 16: none / naive / "
        "LoRA(r) / Flora(r) (Table 1)",
        "accumulate", "AccumulateConfig",
    ),
    "translate": Experiment(
        "momentum from scratch, GPT decoder on German-English pairs, BLEU: none / naive / "
        "LoRA(r) / Flora(r) (Table 2)",
        "translate", "TranslateConfig",
    ),
    "translate-accumulate": Experiment(
        "gradient accumulation, GPT decoder on German-English pairs with batch 1 and tau 16, "
        "BLEU: none / naive / LoRA(r) / Flora(r) (Table 1's decoder row)",
        "translate", "TranslateAccumulateConfig", "run_accumulate",
    ),
    "summarize": Experiment(
        "momentum from scratch, T5-style model on Debian description -> synopsis pairs, ROUGE: "
        "none / naive / LoRA(r) / Flora(r) (Table 2)",
        "summarize", "SummarizeConfig",
    ),
    "lm": Experiment(
        "LM pre-training, LLaMA-style on Shakespeare: Flora vs AdamW, Adafactor, flora-opt, "
        "GaLore, APOLLO, LoRA (Tables 2, 4, 6)",
        "lm", "LMConfig",
    ),
    "kappa": Experiment(
        "resampling interval kappa sweep, LM pre-training (Table 3)", "lm", "LMConfig", "run_kappa"
    ),
    "vit": Experiment(
        "ViT on Fashion-MNIST: AdamW vs Flora / FloraAdamW (Appendix C.1)", "vit", "ViTConfig"
    ),
    "profile": Experiment(
        "memory by category for AdamW / LoRA / Flora, activation checkpointing and "
        "step-in-backward on and off (Appendix C.3, Figure 2)",
        "profile", "ProfileConfig",
    ),
}  # fmt: skip


def _check_override(experiment: str, key: str, value: Any, default: Any) -> None:
    """An override must have its field's kind (int, float, str, bool, tuple): ``steps=x``
    would otherwise fail deep inside the run, after minutes."""

    def kind(v: Any) -> str:
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, (int, float)):
            return "number" if isinstance(default, float) else type(v).__name__
        if isinstance(v, (tuple, list)):
            return "tuple"
        return type(v).__name__

    if default is None or kind(value) == kind(default):
        return
    raise ValueError(
        f"{experiment}: {key} takes a {kind(default)} value like {default!r}, got {value!r}"
    )


def compare(
    experiment: str,
    *,
    quick: bool,
    out: str | Path,
    seed: int = 0,
    data_root: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    tag: str | None = None,
) -> list[Path]:
    """Run ``experiment`` and write its results into ``out``; returns the files written.

    ``overrides`` replace fields of the experiment's config (``ValueError`` for an unknown
    one); ``tag`` is appended to the file names (``lm_quick_<tag>.md``) so that a variant
    does not overwrite the standard results."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {tuple(EXPERIMENTS)}, got {experiment!r}")
    exp = EXPERIMENTS[experiment]
    cfg = exp.config(quick)
    unknown = set(overrides or {}) - set(vars(cfg))
    if unknown:
        raise ValueError(f"{experiment} has no setting(s) {sorted(unknown)}")
    for key, value in (overrides or {}).items():
        _check_override(experiment, key, value, getattr(cfg, key))
    cfg = replace(cfg, seed=seed, **(overrides or {}))
    torch.manual_seed(seed)
    name = f"{experiment}_{'quick' if quick else 'full'}" + (f"_{tag}" if tag else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peers' deprecation notices
        results = exp.run(cfg, name=name, data_root=Path(data_root) if data_root else None)
    return results.write(out)
