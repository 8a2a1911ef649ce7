r"""Writing a float32 update into bf16 parameters without float32 master weights.

The optimizers compute each bf16 parameter's step in float32 (:func:`flora.options.state_dtype`)
and then write the result back into the bf16 tensor. ``rounding`` chooses how:

* ``"nearest"`` (default): round to nearest even, torch's ``copy_``. An update smaller than
  half a bf16 ulp of the weight (``2^-9`` relative) is lost, so long runs with small step
  sizes stall.
* ``"stochastic"``: round up (in magnitude) with probability equal to the remainder's share
  of the ulp, so :math:`\mathbb{E}[\operatorname{SR}(x)] = x` and small updates survive on
  average. With :math:`b(x)` the float32 bit pattern and :math:`u` a uniform 16-bit integer,
  :math:`\operatorname{SR}(x) = \lfloor (b(x) + u) / 2^{16} \rfloor \cdot 2^{16}` (the top 16
  bits of a float32 are a bf16). :math:`u` comes from Philox4x32-10 (:mod:`flora.philox`),
  keyed by (seed, parameter key, step) and indexed by the element's position in the whole
  parameter, so a run is bit-reproducible and resumes exactly; an FSDP2 shard draws the
  words of its own rows (what one device would draw for them; not yet tested end to
  end). NaN stays NaN, infinities stay infinite; a value within an ulp of the largest bf16
  may round to infinity, as in any stochastic rounding.
* ``"compensated"``: Kahan summation with a bf16 compensation buffer :math:`c` (2 bytes per
  parameter, ``state["compensation"]``): :math:`t = x + c`, :math:`\theta = \operatorname{RN}(t)`,
  :math:`c = \operatorname{RN}_{\text{bf16}}(t - \theta)`. Deterministic and without rounding
  noise; the buffer keeps the part of the weight bf16 cannot hold, to bf16 precision. The
  optimizer reads the bf16 weight (weight decay, Adafactor's parameter RMS), not
  :math:`\theta + c`.

Only bf16 parameters are rounded this way; float32/float64 parameters need no rounding and
float16 ones are refused with ``"stochastic"``/``"compensated"`` (their narrower exponent
range needs another scheme).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flora.philox import random_words

__all__ = ["ROUNDINGS", "ROUNDING_CHUNK", "compensated_round_", "stochastic_round_",
           "stochastic_round_stream_"]  # fmt: skip

#: how a float32 update is written into a bf16 parameter
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic", "compensated")
#: elements :func:`stochastic_round_stream_` rounds per pass: the random words and the
#: rounding's int64 temporaries take about 46 bytes per element of a pass, so this bounds
#: the workspace (about 1.5 MiB) whatever the tensor's size; on the CPU this size is as fast
#: as 4 to 32 times larger passes (one 3072 x 768 matrix: 0.26 s against 0.25 s, and 0.37 s
#: in one pass)
ROUNDING_CHUNK = 2**15


def stochastic_round_(out: Tensor, x: Tensor, words: Tensor) -> Tensor:
    """Write ``x`` (float32) into ``out`` (bf16, same shape), rounded stochastically with the
    low 16 bits of ``words`` (int64, one per element, in flat order)."""
    if out.dtype != torch.bfloat16 or x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding is float32 -> bfloat16, got {x.dtype} -> {out.dtype}")
    bits = x.contiguous().view(torch.int32).to(torch.int64).bitwise_and_(0xFFFFFFFF)
    bits.add_(words.view(x.shape).bitwise_and(0xFFFF)).bitwise_and_(0xFFFF0000)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    rounded = bits.view(torch.float32)
    rounded = torch.where(torch.isnan(x), x, rounded)  # a NaN payload in the low bits
    return out.copy_(rounded)  # exact: the low 16 bits are zero


def stochastic_round_stream_(
    out: Tensor, x: Tensor, words: tuple[int, int, int, int, int], *, offset: int = 0
) -> Tensor:
    """:func:`stochastic_round_` of ``x`` into ``out`` with words ``offset, offset + 1, ...``
    of the stream ``words`` (:func:`flora.philox.stream_words`), drawn and applied
    :data:`ROUNDING_CHUNK` elements at a time. The words of a slice do not depend on where
    drawing starts (:func:`flora.philox.random_words`), so the result is the one of a single
    pass, bit for bit; only the workspace is bounded. A non-contiguous ``out`` or ``x`` is
    rounded in one pass."""
    if out.shape != x.shape:
        raise ValueError(f"out {tuple(out.shape)} and x {tuple(x.shape)} differ in shape")
    if not (out.is_contiguous() and x.is_contiguous()) or out.numel() <= ROUNDING_CHUNK:
        bits = random_words(out.numel(), words, offset=offset, device=out.device)
        return stochastic_round_(out, x, bits)
    flat_out, flat_x = out.view(-1), x.view(-1)
    for start in range(0, flat_out.numel(), ROUNDING_CHUNK):
        part = flat_out[start : start + ROUNDING_CHUNK]
        bits = random_words(part.numel(), words, offset=offset + start, device=out.device)
        stochastic_round_(part, flat_x[start : start + ROUNDING_CHUNK], bits)
    return out


def compensated_round_(out: Tensor, x: Tensor, compensation: Tensor) -> Tensor:
    """Write ``x`` (float32) into ``out`` (bf16) by Kahan summation with the bf16
    ``compensation`` buffer, which is updated in place."""
    target = x + compensation.float()
    out.copy_(target)
    residual = target.sub_(out.float())  # NaN where the weight is infinite: no carry there
    compensation.copy_(residual.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0))
    return out
