"""8-bit block quantization of the compressed momentum (flora.quantization and
``moment_dtype=torch.int8``).

- codes are within one step of the value, the mean over draws is the value (stochastic
  rounding), zero blocks stay zero, rows are padded, not merged;
- in an optimizer: the compressed momentum is int8 codes plus float32 block scales (the
  other moments bf16), equal to the float32 step's momentum quantized with the stated words;
  exact bytes in the plan (exact round trips and resume: tests/test_rounding.py; FSDP2:
  tests/test_fsdp.py).
"""

import pytest
import torch

import flora
from flora.philox import random_words, stream_words
from flora.projection import parameter_key
from flora.quantization import BLOCK, absmax_shape, dequantize_int8, quantize_int8_


def _quantize(x, k=0):
    codes = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(absmax_shape(tuple(x.shape)))
    quantize_int8_(codes, scale, x, random_words(x.numel(), stream_words("q", k)))
    return codes, scale


def test_codes_are_unbiased_and_within_one_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, generator=g) * torch.tensor([[1e-3], [1.0], [1e3]])
    x[1, 256:] = 0.0  # a zero-padded partial block, all zeros
    draws = []
    for k in range(2000):
        codes, scale = _quantize(x, k)
        assert codes.dtype == torch.int8 and scale.shape == (3, 2)
        values = dequantize_int8(codes, scale)
        step = (scale / 127).repeat_interleave(BLOCK, dim=1)[:, :300]
        assert ((values - x).abs() <= step * (1 + 1e-6)).all()
        draws.append(values)
    mean = torch.stack(draws).mean(0)
    step = (scale / 127).repeat_interleave(BLOCK, dim=1)[:, :300]
    assert ((mean - x).abs() <= 5 * step / 2000**0.5 + 1e-9).all()
    assert torch.equal(dequantize_int8(*_quantize(x))[1, 256:], torch.zeros(44))
    assert torch.equal(scale[:, 0], x[:, :256].abs().amax(dim=1))  # blocks never span rows


OPTIMIZERS = [
    (flora.Flora, dict(lr=0.02)),
    (flora.FloraAdamW, dict(lr=1e-2)),
    (flora.FloraSGD, dict(lr=0.1)),
    (flora.FloraLion, dict(lr=1e-3)),
]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(300, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))


def _loss(model, i):
    g = torch.Generator().manual_seed(i)
    return model(torch.randn(6, 300, generator=g)).square().mean()


@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_int8_momentum_is_the_float32_momentum_quantized_with_the_stated_words(cls, kw):
    m8, m32 = _model(), _model()
    o8 = cls(m8.named_parameters(), rank=4, moment_dtype=torch.int8, seed=2, **kw)
    o32 = cls(m32.named_parameters(), rank=4, seed=2, **kw)
    for m, o in ((m8, o8), (m32, o32)):
        _loss(m, 0).backward()
        o.step()
    for (name, p8), p32 in zip(m8.named_parameters(), m32.parameters(), strict=True):
        s8, s32 = o8.state[p8], o32.state[p32]
        if "side" not in s32:  # uncompressed: bf16 moments
            assert all(v.dtype == torch.bfloat16 for k, v in s8.items()
                       if torch.is_tensor(v) and v.dim() > 0)  # fmt: skip
            continue
        words = stream_words("flora-state/v1", 2, parameter_key(name), 1, "exp_avg")
        momentum = s32["exp_avg"]
        codes = torch.empty(momentum.shape, dtype=torch.int8)
        scale = torch.empty(absmax_shape(tuple(momentum.shape)))
        quantize_int8_(codes, scale, momentum, random_words(momentum.numel(), words))
        assert torch.equal(s8["exp_avg"], codes) and torch.equal(s8["exp_avg_absmax"], scale)
    assert o8.state_bytes() == o8.plan().state_bytes


def test_a_float_momentum_is_refused_where_int8_codes_are_expected():
    model = _model()
    plain = flora.Flora(model.named_parameters(), rank=4)
    _loss(model, 0).backward()
    plain.step()
    with pytest.raises(ValueError, match="int8"):
        flora.Flora(model.named_parameters(), rank=4, moment_dtype=torch.int8).load_state_dict(
            {**plain.state_dict(), "param_groups": [
                {**g, "moment_dtype": torch.int8} for g in plain.state_dict()["param_groups"]
            ]}
        )  # fmt: skip
