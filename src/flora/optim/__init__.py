"""Optimizers: thin ``torch.optim.Optimizer`` shells over pure per-parameter update functions."""

from flora.optim.adafactor import Flora, flora_adafactor_update_
from flora.optim.adamw import FloraAdamW, flora_adamw_update_
from flora.optim.base import FloraOptimizerBase

__all__ = [
    "Flora",
    "FloraAdamW",
    "FloraOptimizerBase",
    "flora_adafactor_update_",
    "flora_adamw_update_",
]
