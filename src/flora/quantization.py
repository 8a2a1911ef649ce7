r"""8-bit block quantization of a compressed momentum (``moment_dtype=torch.int8``).

A matrix :math:`X \in \mathbb{R}^{m \times n}` is cut into blocks of at most :data:`BLOCK`
consecutive entries of a row; block :math:`b` keeps its absolute maximum
:math:`s_b = \max_{j \in b} |x_j|` in float32 and int8 codes

.. math::
    q_j = \operatorname{clamp}\bigl(\lfloor 127\, x_j / s_b + u_j \rfloor, -127, 127\bigr),
    \qquad \hat x_j = s_b\, q_j / 127,

with :math:`u_j` uniform on the grid :math:`k/2^{24}` of :math:`[0, 1)` from Philox
(:mod:`flora.philox`, exact in float32), so that
:math:`\mathbb{E}[\hat x_j] = x_j` (stochastic rounding) and the error is at most
:math:`s_b / 127` per entry. State: 1 byte per entry plus 4 bytes per block. Blocks never
span rows, so a row-sharded matrix (FSDP2) quantizes exactly as one device does. The codes
and scales are plain tensors: ``state_dict`` round trips are exact (flora-opt's 8-bit
state does not survive a reload).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BLOCK", "absmax_shape", "dequantize_int8", "quantize_int8_"]

#: entries per quantization block (along a row)
BLOCK = 256


def absmax_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The shape of the per-block scales of a matrix of ``shape`` (rows, blocks per row)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return rows, max(1, math.ceil(cols / BLOCK))


def _blocks(x: Tensor) -> Tensor:
    """``x`` as (rows, blocks, BLOCK), zero-padded at the end of each row."""
    rows, cols = x.shape[0], math.prod(x.shape[1:])
    nblk = max(1, math.ceil(cols / BLOCK))
    flat = x.reshape(rows, cols)
    if nblk * BLOCK != cols:
        flat = torch.nn.functional.pad(flat, (0, nblk * BLOCK - cols))
    return flat.view(rows, nblk, BLOCK)


def quantize_int8_(codes: Tensor, absmax: Tensor, x: Tensor, words: Tensor) -> None:
    """Quantize ``x`` (float) into ``codes`` (int8, ``x``'s shape) and ``absmax`` (float32,
    :func:`absmax_shape`) with stochastic rounding; ``words`` (int64, one per entry of ``x``
    in flat order) supply the uniforms."""
    if codes.dtype != torch.int8 or absmax.dtype != torch.float32:
        raise TypeError(f"codes must be int8 and absmax float32, got {codes.dtype}, {absmax.dtype}")
    rows, cols = x.shape[0], math.prod(x.shape[1:])
    blocks = _blocks(x.float())
    scale = blocks.abs().amax(dim=-1)  # (rows, nblk)
    absmax.copy_(scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    uniform = _blocks((words.reshape(x.shape) >> 8).to(torch.float32).mul_(2.0**-24))
    q = blocks.div(safe).mul_(127.0).add_(uniform).floor_().clamp_(-127, 127)
    codes.copy_(q.view(rows, -1)[:, :cols].reshape(codes.shape).to(torch.int8))


def dequantize_int8(codes: Tensor, absmax: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values ``codes`` and ``absmax`` stand for, in ``dtype``, of ``codes``' shape."""
    rows, cols = codes.shape[0], math.prod(codes.shape[1:])
    blocks = _blocks(codes.to(dtype))
    values = blocks.mul_(absmax.to(dtype).unsqueeze(-1) / 127.0)
    return values.view(rows, -1)[:, :cols].reshape(codes.shape)
