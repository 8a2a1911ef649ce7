"""Regression tests for defects found by adversarial use (issue 13), one or more per defect:
loading (hooks, names, validation), duplicate names, bad inputs, odd tensors, the momentum
growth warning, unmatched patterns, frozen parameters and the explicit window change."""

import io
import warnings

import pytest
import torch

import flora
from flora.momentum import compressed_ema_
from flora.projection import projection_matrix

CLASSES = [flora.Flora, flora.FloraAdamW]


@pytest.fixture(params=CLASSES, ids=lambda c: c.__name__)
def cls(request):
    return request.param


def _two_same_shaped():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"a": torch.nn.Linear(16, 12), "b": torch.nn.Linear(16, 12)})


def _train(model, opt, steps=3):
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(5, 16, generator=g)
        opt.zero_grad()
        (model["a"](x).square().mean() + 2 * model["b"](x).sin().mean()).backward()
        opt.step()


# ------------------------------------------------------------------ load_state_dict
def _saved_and_fresh(cls):
    """A trained optimizer's state_dict as it comes back from disk (no tensor shared with
    the optimizer), and a fresh optimizer of the same model to load it into."""
    model = _two_same_shaped()
    opt = cls(model.named_parameters(), rank=4)
    _train(model, opt)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True), cls(model.named_parameters(), rank=4)


def test_load_keeps_what_a_post_hook_does(cls):
    sd, opt2 = _saved_and_fresh(cls)

    def reset_momentum(optimizer):  # torch's documented use of a post-hook
        for state in optimizer.state.values():
            if "exp_avg" in state:
                state["exp_avg"] = torch.zeros_like(state["exp_avg"])

    opt2.register_load_state_dict_post_hook(reset_momentum)
    opt2.load_state_dict(sd)
    assert all(s["exp_avg"].abs().sum() == 0 for s in opt2.state.values())


def test_load_keeps_what_a_pre_hook_does(cls):
    sd, opt2 = _saved_and_fresh(cls)
    moments = ("row_var", "col_var", "variance", "exp_avg_sq")

    def scale_second_moments(optimizer, state_dict):  # returns a new dict, as torch allows
        state = {
            pid: {k: v * 0 + 7.0 if k in moments else v for k, v in st.items()}
            for pid, st in state_dict["state"].items()
        }
        return {**state_dict, "state": state}

    opt2.register_load_state_dict_pre_hook(scale_second_moments)
    opt2.load_state_dict(sd)
    for state in opt2.state.values():
        for key in moments:
            if key in state:
                assert torch.all(state[key] == 7.0)


def test_load_matches_parameters_by_name(cls):
    model = _two_same_shaped()
    opt = cls(model.named_parameters(), rank=4)
    _train(model, opt)
    sd = opt.state_dict()
    reordered = [(n, p) for n, p in model.named_parameters()][::-1]  # same shapes, swapped
    opt2 = cls(reordered, rank=4)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            other = opt2.state[p][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    _train(model, opt2, 1)  # and the next step runs


def test_load_refuses_other_names(cls):
    model = _two_same_shaped()
    opt = cls(model.named_parameters(), rank=4)
    _train(model, opt)
    renamed = [("x." + n, p) for n, p in model.named_parameters()]
    opt2 = cls(renamed, rank=4)
    with pytest.raises(ValueError, match=r"missing \['x\.a\.bias'"):
        opt2.load_state_dict(opt.state_dict())
    assert not opt2.state  # nothing changed


def test_load_refuses_a_torch_adamw_state(cls):
    model = _two_same_shaped()
    adamw = torch.optim.AdamW(model.named_parameters())
    _train(model, adamw)
    opt = cls(model.named_parameters(), rank=4)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(adamw.state_dict())
    assert not opt.state


def test_load_refuses_a_state_with_other_compression(cls):
    model = _two_same_shaped()
    full = cls(model.named_parameters(), compress=False)
    _train(model, full)
    opt = cls(model.named_parameters(), rank=4)
    # the saved groups say compress=False, so loading them is consistent ...
    opt.load_state_dict(full.state_dict())
    assert not opt.plan().compressed_count
    # ... but a compressed state under groups that now say compress=False is not
    comp = cls(model.named_parameters(), rank=4)
    _train(model, comp)
    sd = comp.state_dict()
    sd["param_groups"][0]["compress"] = False
    with pytest.raises(ValueError, match="compressed momentum, but"):
        cls(model.named_parameters(), rank=4).load_state_dict(sd)


def test_load_refuses_a_wrong_side_or_key(cls):
    model = _two_same_shaped()
    opt = cls(model.named_parameters(), rank=4)
    _train(model, opt)
    sd = opt.state_dict()
    sd["param_groups"][0]["side"] = "right"
    with pytest.raises(ValueError, match=r"left side.*pass side='left'"):
        cls(model.named_parameters(), rank=4).load_state_dict(sd)
    unnamed = cls(model.parameters(), rank=4)  # keyed by position, not by name
    with pytest.raises(ValueError, match="projection key"):
        unnamed.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "change, match",
    [
        (("param_groups", "rank", -5), r"param_groups\[0\]\.rank"),
        (("param_groups", "lr", float("nan")), r"param_groups\[0\]\.lr"),
        (("state", "exp_avg", "shape"), "'exp_avg' has shape"),
        (("state", "step", "float"), "'step' must be a non-negative int"),
        (("state", "bogus", None), "unexpected entry 'bogus'"),
    ],
)
def test_load_validates_groups_and_state(cls, change, match):
    model = _two_same_shaped()
    opt = cls(model.named_parameters(), rank=4)
    _train(model, opt)
    sd = opt.state_dict()
    where, key, value = change
    if where == "param_groups":
        sd["param_groups"][0][key] = value
    else:
        state = sd["state"][0]
        if key == "exp_avg":
            state[key] = torch.zeros(1, 2)
        elif key == "step":
            state[key] = torch.tensor(3.0)  # torch AdamW's kind of step
        else:
            state[key] = torch.zeros(3)
    opt2 = cls(model.named_parameters(), rank=4)
    with pytest.raises(ValueError, match=match):
        opt2.load_state_dict(sd)
    assert not opt2.state and opt2.param_groups[0]["rank"] == 4


def test_float32_state_follows_a_model_made_double(cls):
    model = _two_same_shaped()
    opt = cls(model.named_parameters(), rank=4)
    _train(model, opt)
    sd = opt.state_dict()
    model.double()
    opt2 = cls(model.named_parameters(), rank=4)
    opt2.load_state_dict(sd)
    for state in opt2.state.values():  # (the default gradient basis stays bf16)
        assert all(
            v.dtype == (torch.bfloat16 if k == "projection" else torch.float64)
            for k, v in state.items()
            if torch.is_tensor(v)
        )
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    (model["a"](x).sum() + model["b"](x).sum()).backward()
    opt2.step()  # crashed before: float32 state against float64 gradients


# ------------------------------------------------------------------ construction
def test_duplicate_names_are_refused(cls):
    enc, dec = torch.nn.Linear(16, 12), torch.nn.Linear(16, 12)
    named = list(enc.named_parameters()) + list(dec.named_parameters())
    with pytest.raises(ValueError, match="'bias', 'weight' occur more than once"):
        cls(named, rank=4)
    opt = cls(enc.named_parameters(prefix="enc"), rank=4)
    with pytest.raises(ValueError, match=r"'enc\.weight' occur"):
        opt.add_param_group({"params": list(dec.named_parameters(prefix="enc"))})
    opt.add_param_group({"params": list(dec.named_parameters(prefix="dec"))})
    assert len(opt.param_groups) == 2


def test_add_param_group_validates_before_keeping_the_group(cls):
    model = _two_same_shaped()
    opt = cls(model["a"].named_parameters("a"), rank=4)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.rank"):
        opt.add_param_group({"params": list(model["b"].named_parameters("b")), "rank": -1})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": list(model["b"].named_parameters("b")), "rank": 2})
    assert len(opt.param_groups) == 2
    _train(model, opt, 1)


def test_multi_element_tensor_lr_is_a_value_error(cls):
    model = _two_same_shaped()
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls(model.named_parameters(), lr=torch.tensor([1e-3, 2e-3]))
    cls(model.named_parameters(), lr=torch.tensor(1e-3))  # one element is fine


def test_exclude_pattern_that_matches_nothing_warns(cls):
    model = _two_same_shaped()
    with pytest.warns(UserWarning, match=r"\['lm_head'\] match no parameter.*a\.weight"):
        cls(model.named_parameters(), rank=4, exclude=["lm_head", r"^b\."])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(model.named_parameters(), rank=4, exclude=[r"^b\."])


def test_small_kappa_warns_and_the_plan_says_so(cls):
    model = torch.nn.Linear(64, 8, bias=False)  # 8 x 64, left side, d = 8: 0.81 * sqrt(1 + 9/4)
    legacy = dict(momentum_variant="history", distribution="gaussian")  # an inflating transfer
    if cls is flora.FloraAdamW:
        legacy["preconditioner"] = "elementwise"
    with pytest.warns(RuntimeWarning, match=r"grow without bound.*weight \(1\.46\)"):
        opt = cls(model.named_parameters(), rank=4, kappa=2, **legacy)
    assert "UNSTABLE (growth 1.46" in str(opt.plan())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = cls(model.named_parameters(), rank=4, kappa=100, **legacy)
        assert "UNSTABLE" not in str(opt.plan())
        # the default subspace form projects at a transfer: it cannot grow, even at kappa 2
        opt = cls(model.named_parameters(), rank=4, kappa=2)
        assert "UNSTABLE" not in str(opt.plan())


def test_plan_gives_frozen_parameters_no_state(cls):
    model = _two_same_shaped()
    model["b"].requires_grad_(False)
    opt = cls(model.named_parameters(), rank=4)
    _train(model, opt, 1)
    plan = opt.plan()
    assert plan.state_bytes == opt.state_bytes()
    frozen = [r for r in plan.rows if r.name.startswith("b.")]
    assert frozen and all(r.state_bytes == 0 and "frozen" in r.reason for r in frozen)


# ------------------------------------------------------------------ odd tensors
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize(
    "distribution,atol",
    [("orthonormal", 1e-7), ("gradient", 1e-6)],  # the gradient basis's products round
)  # differently with the memory layout
def test_unfactored_second_moment_on_non_contiguous_parameters(layout, distribution, atol):
    """Same steps as on a contiguous copy (it crashed: ``view`` on a non-contiguous clone)."""
    torch.manual_seed(0)
    if layout == "channels_last":
        weight = torch.randn(16, 8, 3, 3)
        odd = weight.to(memory_format=torch.channels_last)
    else:
        weight = torch.randn(24, 12)
        odd = weight.t()  # a (12, 24) non-contiguous view
        weight = weight.t().contiguous()
    p_odd, p_ref = torch.nn.Parameter(odd.clone()), torch.nn.Parameter(weight.clone())
    assert not p_odd.is_contiguous()
    # a gradient with a clear rank-4 part: its dominant subspace (the gradient basis) is well
    # separated, so layout-dependent rounding moves it by rounding only (with a flat spectrum
    # the range finder's eigenvectors rotate by far more: 2e-5 measured)
    rows = weight.shape[0]
    low = torch.randn(rows, 4) @ torch.randn(4, weight.numel() // rows)
    target = weight + (3 * low + 0.1 * torch.randn(low.shape)).reshape(weight.shape)
    optimizers = [
        flora.Flora(
            [("w", p)], rank=4, kappa=2, factor_second_moment=False, distribution=distribution
        )
        for p in (p_odd, p_ref)
    ]
    for _ in range(4):
        for p, opt in zip((p_odd, p_ref), optimizers, strict=True):
            opt.zero_grad()
            (p - target).square().sum().backward()
            opt.step()
    assert torch.allclose(p_odd, p_ref, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_subspace_preconditioner_on_a_non_contiguous_parameter(layout):
    """FloraAdamW's subspace step subtracts its direction from the parameter in place — a
    transposed matrix through its own strides, a channels-last weight (no (m, n) view)
    through a copy written back: the same steps as on a contiguous copy."""
    torch.manual_seed(0)
    if layout == "transposed":
        weight = torch.randn(24, 12)
        p_odd = torch.nn.Parameter(weight.clone().t())  # a (12, 24) non-contiguous view
        p_ref = torch.nn.Parameter(weight.t().contiguous())
    else:
        weight = torch.randn(16, 8, 3, 3)
        p_odd = torch.nn.Parameter(weight.to(memory_format=torch.channels_last))
        p_ref = torch.nn.Parameter(weight.clone())
    target = torch.randn(p_ref.shape)
    optimizers = [flora.FloraAdamW([("w", p)], rank=4, kappa=2, lr=0.01) for p in (p_odd, p_ref)]
    for _ in range(4):
        for p, opt in zip((p_odd, p_ref), optimizers, strict=True):
            opt.zero_grad()
            (p - target).square().sum().backward()
            opt.step()
    assert not p_odd.is_contiguous()
    assert torch.allclose(p_odd, p_ref, rtol=1e-6, atol=1e-7)


def test_zero_element_parameter(cls):
    empty = torch.nn.Parameter(torch.zeros(0, 5))
    w = torch.nn.Parameter(torch.randn(6, 5))
    opt = cls([("empty", empty), ("w", w)], rank=2)
    for _ in range(2):
        opt.zero_grad()
        (w.sum() + empty.sum()).backward()
        opt.step()  # Flora raised ZeroDivisionError
    assert empty.shape == (0, 5) and torch.isfinite(w).all()


# ------------------------------------------------------------------ the window change
def test_transfer_happens_only_when_the_caller_says_so():
    torch.manual_seed(0)
    update = torch.randn(12, 20)
    proj = projection_matrix(4, 12, seed=0, key=1, window=0)
    momentum = torch.randn(4, 20)
    copy_of_proj = proj.clone()  # equal, but another tensor: not a new window
    a = compressed_ema_(update, momentum.clone(), beta=0.9, proj=proj, side="left")
    b = compressed_ema_(update, momentum.clone(), beta=0.9, proj=copy_of_proj, side="left")
    assert torch.equal(a, b)
    m1, m2 = momentum.clone(), momentum.clone()
    compressed_ema_(update, m1, beta=0.9, proj=proj, side="left")
    compressed_ema_(update, m2, beta=0.9, proj=proj, proj_next=copy_of_proj, side="left")
    assert not torch.allclose(m1, m2)  # an explicit window change transfers (P P^T != I)
