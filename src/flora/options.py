"""One home for the option vocabularies shared by several modules, their validators and the
state-dtype rule.

The optimizers, the accumulator and the DDP hook all validate their arguments with these
functions, so a bad value raises the same ``TypeError`` (wrong type) or ``ValueError`` (out of
range, unknown choice) naming the argument everywhere. The vocabularies that belong to one
concept stay with it and are imported from there: the projection families
(:data:`flora.projection.DISTRIBUTIONS`), the momentum forms
(:data:`flora.momentum.VARIANTS`) and FloraAdamW's preconditioners.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BASIS_DTYPES",
    "MOMENT_DTYPES",
    "NONFINITE_POLICIES",
    "SIDE_CHOICES",
    "check_bool",
    "check_choice",
    "check_dtype",
    "check_int",
    "check_real",
    "is_int",
    "state_dtype",
]

#: where a matrix is compressed: the smaller dimension (``"auto"``), its rows or its columns
SIDE_CHOICES: tuple[str, ...] = ("auto", "left", "right")
#: what a non-finite gradient does to an optimizer step
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "skip_parameter", "raise", "unchecked")


#: dtypes a stored projection basis may be kept in (None: the state dtype)
BASIS_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
)


#: dtypes moments (momentum, second moments) may be stored in (None: the state dtype;
#: int8: the compressed momentum block-quantized, the other moments bf16)
MOMENT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.int8)


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
        isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex()
    )


def check_real(name: str, value: object, low: float, high: float, *, high_open: bool) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``low <= value <= high`` (or ``<``)."""
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)  # type: ignore[arg-type]
    if math.isnan(v) or v < low or (v >= high if high_open else v > high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {v}")


def check_int(name: str, value: object, low: int) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is an int, ValueError if ``< low``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:  # type: ignore[operator]
        raise ValueError(
            f"{name} must be positive, got {value}"
            if low == 1
            else f"{name} must be >= {low}, got {value}"
        )


def check_bool(name: str, value: object) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_dtype(name: str, value: object, choices: Sequence[torch.dtype]) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is None or a ``torch.dtype``, and
    ValueError unless it is one of ``choices``."""
    if value is None:
        return
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or None, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be None or one of {tuple(choices)}, got {value}")


def state_dtype(param: Tensor) -> torch.dtype:
    """State and update math run in float32 for fp16/bf16 parameters, else in their dtype."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
