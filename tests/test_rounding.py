"""bf16 parameters without float32 masters (flora.rounding and the optimizers' ``rounding``).

- stochastic rounding returns one of the two bf16 neighbours, is unbiased, keeps exact
  values, NaN and infinities; compensated (Kahan) summation carries what bf16 cannot hold;
- in an optimizer, ``"stochastic"`` is the float32 result rounded with the documented Philox
  words of (seed, parameter key, step); a long run of updates below half an ulp stalls
  with ``"nearest"`` and tracks float32 with both other modes;
- resume is bit-identical for both; the compensation buffer is state (bf16, 2 bytes per
  parameter, in the plan, kept bf16 by ``load_state_dict``); bad values are refused;
- ``moment_dtype=torch.bfloat16``: every moment is stored in bf16 (the basis, the limiter's
  scalar and the compensation keep theirs), equal to the float32 step's moments rounded with
  the stated words; exact bytes in the plan; bf16 and int8 moments round-trip exactly,
  resume bit-identically and still train.
"""

import io

import pytest
import torch

import flora
from flora.philox import random_words, stream_words
from flora.projection import parameter_key
from flora.rounding import compensated_round_, stochastic_round_, stochastic_round_stream_


def _neighbours(x):
    down = x.to(torch.bfloat16)  # nearest; step to the other side where needed
    lo = torch.where(
        down.float() > x,
        torch.nextafter(down, torch.tensor(-torch.inf, dtype=torch.bfloat16)),
        down,
    )
    hi = torch.where(
        down.float() < x, torch.nextafter(down, torch.tensor(torch.inf, dtype=torch.bfloat16)), down
    )
    return lo.float(), hi.float()


def test_stochastic_rounding_is_unbiased_between_neighbours():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * torch.logspace(-3, 3, 64)
    draws = torch.stack([
        stochastic_round_(torch.empty(64, dtype=torch.bfloat16), x,
                          random_words(64, stream_words("test", k))).float()
        for k in range(4000)
    ])  # fmt: skip
    lo, hi = _neighbours(x)
    assert ((draws == lo) | (draws == hi)).all()
    ulp = (hi - lo).clamp(min=1e-30)
    # the mean is x to within 5 standard errors of a two-point distribution
    p = (x - lo) / ulp
    stderr = ulp * (p * (1 - p)).sqrt() / 4000**0.5
    assert ((draws.mean(0) - x).abs() <= 5 * stderr + 1e-6 * ulp).all()


@pytest.mark.parametrize("numel,offset", [(4321, 0), (4321, 7), (1001, 3), (2000, 5)])
def test_chunked_rounding_is_the_single_pass_bit_for_bit(monkeypatch, numel, offset):
    """Drawn ROUNDING_CHUNK words at a time (here 1000: several passes, a tail of one or
    none, offsets not a multiple of 4), the result is the one-pass result; a non-contiguous
    pair takes the one pass; shapes must agree."""
    monkeypatch.setattr("flora.rounding.ROUNDING_CHUNK", 1000)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3
    words = stream_words("test-chunks", numel)
    whole = stochastic_round_(
        torch.empty(numel, dtype=torch.bfloat16), x, random_words(numel, words, offset=offset)
    )
    chunked = stochastic_round_stream_(
        torch.empty(numel, dtype=torch.bfloat16), x, words, offset=offset
    )
    assert torch.equal(whole.view(torch.int16), chunked.view(torch.int16))
    assert not torch.equal(whole, x.bfloat16())  # not merely round-to-nearest
    m = x[: (numel // 3) * 3].view(3, -1)
    out = torch.empty(m.shape[1], 3, dtype=torch.bfloat16).T  # non-contiguous
    stochastic_round_stream_(out, m, words, offset=offset)
    ref = stochastic_round_(
        torch.empty_like(m, dtype=torch.bfloat16), m, random_words(m.numel(), words, offset=offset)
    )
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    with pytest.raises(ValueError, match="shape"):
        stochastic_round_stream_(torch.empty(numel + 1, dtype=torch.bfloat16), x, words)


def test_stochastic_rounding_keeps_exact_values_and_specials():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan")])
    words = torch.full((7,), 0xFFFF, dtype=torch.int64)  # the largest carry
    out = stochastic_round_(torch.empty(7, dtype=torch.bfloat16), x, words).float()
    assert torch.equal(out[:6], x[:6]) and out[6].isnan()
    payload = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)  # NaN, low bits
    assert stochastic_round_(torch.empty(1, dtype=torch.bfloat16), payload, words[:1]).isnan()
    with pytest.raises(TypeError, match="bfloat16"):
        stochastic_round_(torch.empty(1, dtype=torch.float16), x[:1], words[:1])


def test_compensated_summation_carries_what_bf16_cannot_hold():
    weight = torch.ones(8, dtype=torch.bfloat16)
    comp = torch.zeros(8, dtype=torch.bfloat16)
    exact = torch.ones(8, dtype=torch.float64)
    for i in range(2000):
        step = 1e-4 * (1 + (i % 3))
        compensated_round_(weight, weight.float() - step, comp)
        exact -= step
    # the carry is itself bf16 (8 bits of the part the weight cannot hold): 0.4 of updates
    # far below the weight's half ulp arrive to 2e-3, where round-to-nearest loses all
    assert (weight.double() + comp.double() - exact).abs().max() < 4e-3
    assert (weight.double() - exact).abs().max() < 2**-8 + 4e-3  # the weight: within an ulp
    nearest = torch.ones(8, dtype=torch.bfloat16)
    for i in range(2000):
        nearest.copy_(nearest.float() - 1e-4 * (1 + (i % 3)))
    assert torch.equal(nearest, torch.ones(8, dtype=torch.bfloat16))


def _bf16_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8)).to(
        torch.bfloat16
    )


def _loss(model, i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(6, 16, generator=g).to(torch.bfloat16)
    return model(x).float().square().mean()


OPTIMIZERS = [
    (flora.Flora, dict(lr=0.02)),
    (flora.FloraAdamW, dict(lr=1e-2)),
    (flora.FloraSGD, dict(lr=0.1)),
    (flora.FloraLion, dict(lr=1e-3)),
]


@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_stochastic_step_is_the_float32_result_rounded_with_the_stated_words(cls, kw):
    m16 = _bf16_model()
    m32 = _bf16_model().float()
    o16 = cls(m16.named_parameters(), rank=4, rounding="stochastic", seed=3, **kw)
    o32 = cls(m32.named_parameters(), rank=4, seed=3, **kw)
    _loss(m16, 0).backward()
    for p16, p32 in zip(m16.parameters(), m32.parameters(), strict=True):
        p32.grad = p16.grad.float()
    o16.step()
    o32.step()
    for (name, p16), p32 in zip(m16.named_parameters(), m32.parameters(), strict=True):
        words = stream_words("flora-rounding/v1", 3, parameter_key(name), 1)
        bits = random_words(p32.numel(), words)
        expected = stochastic_round_(torch.empty_like(p16), p32.detach(), bits)
        assert torch.equal(p16, expected), name


@pytest.mark.parametrize("cls,kw", OPTIMIZERS[2:3])
def test_small_updates_stall_with_nearest_and_survive_otherwise(cls, kw):
    results = {}
    for rounding in ("nearest", "stochastic", "compensated"):
        p = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
        opt = cls([p], lr=1e-4, momentum=0.0, rounding=rounding)
        for _ in range(1000):
            p.grad = torch.ones_like(p)
            opt.step()
        results[rounding] = p.float().mean().item()
    assert results["nearest"] == 1.0  # 1e-4 is below half an ulp of 1.0 (2**-9)
    assert abs(results["stochastic"] - 0.9) < 0.005
    assert abs(results["compensated"] - 0.9) < 2**-8


@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS[:2])
def test_resume_is_bit_identical(cls, kw, rounding):
    model = _bf16_model()
    opt = cls(model.named_parameters(), rank=4, kappa=2, rounding=rounding, **kw)

    def steps(m, o, start, stop):
        for i in range(start, stop):
            o.zero_grad()
            _loss(m, i).backward()
            o.step()

    steps(model, opt, 0, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    steps(model, opt, 3, 7)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = _bf16_model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls(resumed.named_parameters(), rank=4, kappa=2, rounding=rounding, **kw)
    opt2.load_state_dict(ckpt["opt"])
    if rounding == "compensated":
        assert all(s["compensation"].dtype == torch.bfloat16 for s in opt2.state.values())
    steps(resumed, opt2, 3, 7)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_compensation_is_state_in_the_plan():
    model = _bf16_model()
    opt = flora.FloraSGD(model.named_parameters(), lr=0.1, momentum=0.0, rounding="compensated")
    _loss(model, 0).backward()
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    assert opt.state_bytes() == 2 * numel == opt.plan().state_bytes


def test_bad_rounding_is_refused():
    with pytest.raises(ValueError, match="rounding"):
        flora.Flora(_bf16_model().named_parameters(), rounding="up")
    half = torch.nn.Linear(4, 4).half()
    with pytest.raises(ValueError, match="rounding"):
        flora.FloraAdamW(half.named_parameters(), rounding="stochastic")
    flora.FloraAdamW(half.named_parameters())  # nearest: fine for float16


# ---------------------------------------------------------------- bf16 moments
def _fp32_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))


def _loss32(model, i):
    g = torch.Generator().manual_seed(i)
    return model(torch.randn(6, 16, generator=g)).square().mean()


@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_bf16_moments_are_the_float32_moments_rounded_with_the_stated_words(cls, kw):
    m16, m32 = _fp32_model(), _fp32_model()
    o16 = cls(m16.named_parameters(), rank=4, moment_dtype=torch.bfloat16, seed=2, **kw)
    o32 = cls(m32.named_parameters(), rank=4, seed=2, **kw)
    for m, o in ((m16, o16), (m32, o32)):
        _loss32(m, 0).backward()
        o.step()
    for (name, p16), p32 in zip(m16.named_parameters(), m32.parameters(), strict=True):
        assert torch.equal(p16, p32)  # the first step's update reads fp32 moments
        s16, s32 = o16.state[p16], o32.state[p32]
        assert s16.keys() == s32.keys()
        for k, v in s32.items():
            if not torch.is_tensor(v):
                continue
            if k == "projection" or v.dim() == 0:
                assert torch.equal(s16[k], v), (name, k)
                continue
            words = stream_words("flora-state/v1", 2, parameter_key(name), 1, k)
            expected = stochastic_round_(
                torch.empty_like(v, dtype=torch.bfloat16), v, random_words(v.numel(), words)
            )
            assert torch.equal(s16[k], expected), (name, k)
    assert o16.state_bytes() == o16.plan().state_bytes < o32.state_bytes()


@pytest.mark.parametrize("moment_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_narrow_moments_round_trip_exactly_resume_bit_identically_and_train(cls, kw, moment_dtype):
    """bf16 moments, and int8 compressed momentum (flora.quantization): every loaded state
    tensor is the saved one, dtype included (torch would cast them all to floats)."""

    def run(model, opt, start, stop):
        for i in range(start, stop):
            opt.zero_grad()
            loss = _loss32(model, i % 2)
            loss.backward()
            opt.step()
        return loss.item()

    options = dict(rank=4, kappa=2, moment_dtype=moment_dtype, **kw)
    model = _fp32_model()
    opt = cls(model.named_parameters(), **options)
    first = _loss32(model, 0).item()
    run(model, opt, 0, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    last = run(model, opt, 3, 40)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = _fp32_model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls(resumed.named_parameters(), **options)
    opt2.load_state_dict(ckpt["opt"])
    saved = ckpt["opt"]["state"]
    for i, p in enumerate(resumed.parameters()):
        assert opt2.state[p].keys() == saved[i].keys()
        for k, v in opt2.state[p].items():
            if torch.is_tensor(v):
                assert v.dtype == saved[i][k].dtype and torch.equal(v, saved[i][k]), k
    other = ("projection", "exp_avg_absmax")
    kinds = {
        v.dtype
        for s in opt2.state.values()
        for k, v in s.items()
        if torch.is_tensor(v) and v.dim() > 0 and k not in other
    }
    assert kinds == (
        {torch.bfloat16, torch.int8} if moment_dtype == torch.int8 else {torch.bfloat16}
    )
    run(resumed, opt2, 3, 40)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert last < 0.7 * first


def test_bad_moment_dtype_is_refused():
    with pytest.raises(ValueError, match="moment_dtype"):
        flora.Flora(_fp32_model().named_parameters(), moment_dtype=torch.float16)
    with pytest.raises(TypeError, match="moment_dtype"):
        flora.Flora(_fp32_model().named_parameters(), moment_dtype="bf16")
