"""Flora: optimizer states compressed by seeded, resampled random projections.

Hao, Cao, Mou, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors", ICML 2024.
"""

from flora.accumulation import AccumulationMemory, GradientAccumulator
from flora.lean import Lean, lean_setup
from flora.optim import Flora, FloraAdamW, FloraLion, FloraSGD
from flora.policy import Decision, decide
from flora.projection import down, parameter_key, projection_matrix, transfer, up
from flora.state_plan import Plan, PlanRow

__version__ = "0.1.0"

__all__ = [
    "AccumulationMemory",
    "Decision",
    "Flora",
    "FloraAdamW",
    "FloraLion",
    "FloraSGD",
    "GradientAccumulator",
    "Lean",
    "Plan",
    "PlanRow",
    "__version__",
    "decide",
    "down",
    "lean_setup",
    "parameter_key",
    "projection_matrix",
    "transfer",
    "up",
]
