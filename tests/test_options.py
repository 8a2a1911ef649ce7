"""The shared validators (flora.options): each names the argument, refuses bools where an
int or a real is meant, NaN and out-of-range values, and unknown choices."""

import math

import pytest
import torch

from flora.options import (
    BASIS_DTYPES,
    check_bool,
    check_choice,
    check_dtype,
    check_int,
    check_real,
    state_dtype,
)


@pytest.mark.parametrize(
    "value,low,exc",
    [(True, 0, TypeError), (1.0, 0, TypeError), ("3", 0, TypeError), (0, 1, ValueError),
     (-1, 0, ValueError)],
)  # fmt: skip
def test_check_int_refuses(value, low, exc):
    with pytest.raises(exc, match="kappa"):
        check_int("kappa", value, low)


def test_check_int_accepts():
    check_int("seed", 0, 0)
    check_int("rank", 7, 1)


@pytest.mark.parametrize(
    "value,exc",
    [(math.nan, ValueError), (-0.1, ValueError), (1.0, ValueError), (False, TypeError),
     ("0.5", TypeError), (torch.ones(2), ValueError), (1j, TypeError)],
)  # fmt: skip
def test_check_real_refuses(value, exc):
    with pytest.raises(exc, match="beta1"):
        check_real("beta1", value, 0.0, 1.0, high_open=True)


def test_check_real_accepts_the_closed_end_and_one_element_tensors():
    check_real("d", 1.0, 1.0, math.inf, high_open=False)
    check_real("lr", torch.tensor(1e-3), 0.0, math.inf, high_open=False)


def test_check_bool_and_choice():
    with pytest.raises(TypeError, match="compress"):
        check_bool("compress", 1)
    with pytest.raises(ValueError, match=r"side must be one of \('auto', 'left', 'right'\)"):
        check_choice("side", "top", ("auto", "left", "right"))
    check_choice("side", "left", ("auto", "left", "right"))


def test_check_dtype():
    check_dtype("basis_dtype", None, BASIS_DTYPES)
    check_dtype("basis_dtype", torch.bfloat16, BASIS_DTYPES)
    with pytest.raises(TypeError, match="basis_dtype"):
        check_dtype("basis_dtype", "bfloat16", BASIS_DTYPES)
    with pytest.raises(ValueError, match="basis_dtype"):
        check_dtype("basis_dtype", torch.int32, BASIS_DTYPES)


def test_state_dtype_is_float32_for_half_precision():
    assert state_dtype(torch.zeros(1, dtype=torch.bfloat16)) is torch.float32
    assert state_dtype(torch.zeros(1, dtype=torch.float16)) is torch.float32
    assert state_dtype(torch.zeros(1, dtype=torch.float64)) is torch.float64
