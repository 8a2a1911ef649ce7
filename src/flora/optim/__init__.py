"""Optimizers: thin ``torch.optim.Optimizer`` shells over pure per-parameter update functions."""

from flora.optim.adafactor import Flora, flora_adafactor_update_
from flora.optim.adamw import FloraAdamW, flora_adamw_update_
from flora.optim.base import FloraOptimizerBase
from flora.optim.lion import FloraLion, flora_lion_update_
from flora.optim.sgd import FloraSGD, flora_sgd_update_

__all__ = [
    "Flora",
    "FloraAdamW",
    "FloraLion",
    "FloraOptimizerBase",
    "FloraSGD",
    "flora_adafactor_update_",
    "flora_adamw_update_",
    "flora_lion_update_",
    "flora_sgd_update_",
]
