"""One contract, run over every Flora optimizer (like torch's common_optimizers registry).

Properties:
- invalid hyperparameters raise ValueError/TypeError naming the argument (also per group);
- complex parameters, sparse and complex gradients are refused with a clear error;
- ``state_dict`` round-trips exactly, through ``torch.save``/``torch.load(weights_only=True)``,
  and a resumed run is bit-identical to an uninterrupted one (across a window change);
- non-finite gradients never reach the state: skipped with a warning, or raised;
- ``torch.amp.GradScaler`` skips steps with inf gradients; LR schedulers act on ``group["lr"]``;
- bf16 parameters get float32 state and the fp32 update rounded once; fp32 state survives
  ``load_state_dict``;
- ``maximize`` equals minimizing the negated gradient; ``cache_projection`` changes nothing;
- the window advances at steps kappa, 2 kappa, ... and ``projection()`` is what the step used.
"""

import copy
import inspect
import io
import warnings

import pytest
import torch

import flora
from flora.projection import down, parameter_key, projection_matrix

OPTIMIZERS = {
    "Flora": (flora.Flora, dict(lr=0.02)),
    "FloraAdamW": (flora.FloraAdamW, dict(lr=1e-2)),
    "FloraSGD": (flora.FloraSGD, dict(lr=0.5)),
    "FloraLion": (flora.FloraLion, dict(lr=3e-3)),
}


@pytest.fixture(params=list(OPTIMIZERS))
def opt_spec(request):
    return OPTIMIZERS[request.param]


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, 24),
        torch.nn.Linear(24, 40),
        torch.nn.GELU(),
        torch.nn.Linear(40, 50),
        # two matrices of one shape: Flora's multi-tensor step stacks them (foreach)
        torch.nn.Tanh(),
        torch.nn.Linear(50, 50),
        torch.nn.Linear(50, 50),
    )
    return model.to(dtype)


def _batch(i, device="cpu"):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, 50, (8, 6), generator=g).to(device)


def _loss(model, i):
    x = _batch(i)
    logits = model(x).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 50), x.roll(1, 1).reshape(-1))


def _steps(model, opt, start, stop, scheduler=None):
    for i in range(start, stop):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _make(opt_spec, model, **kw):
    cls, defaults = opt_spec
    return cls(model.named_parameters(), **{**defaults, "rank": 4, "kappa": 3, **kw})


def _paper_form(opt_spec) -> dict:
    """Algorithm 2 as printed, Gaussian projection (FloraAdamW: per-coordinate Adam);
    FloraSGD and FloraLion have only the subspace form: theirs, with a Gaussian."""
    if opt_spec[0] in (flora.FloraSGD, flora.FloraLion):
        return dict(distribution="gaussian")
    form = dict(momentum_variant="paper", distribution="gaussian")
    return form if opt_spec[0] is flora.Flora else {**form, "preconditioner": "elementwise"}


# ---------------------------------------------------------------- bad input
BAD = [
    (dict(factor_second_moment="no"), TypeError, "factor_second_moment"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr="fast"), TypeError, "lr"),
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-3), ValueError, "rank"),
    (dict(rank=2.5), TypeError, "rank"),
    (dict(rank=True), TypeError, "rank"),
    (dict(kappa=0), ValueError, "kappa"),
    (dict(kappa=1.5), TypeError, "kappa"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed="a"), TypeError, "seed"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(side="top"), ValueError, "side"),
    (dict(momentum_variant="fancy"), ValueError, "momentum_variant"),
    (dict(nonfinite="ignore"), ValueError, "nonfinite"),  # "unchecked" is the name
    (dict(rounding="up"), ValueError, "rounding"),
    (dict(distribution="uniform"), ValueError, "distribution"),
    (dict(distribution="gradient", momentum_variant="history"), ValueError, "distribution"),
    (dict(distribution="gradient", cache_projection=True), ValueError, "cache_projection"),
    (dict(basis_dtype="bfloat16"), TypeError, "basis_dtype"),
    (dict(basis_dtype=torch.int8), ValueError, "basis_dtype"),
    (dict(compress=1), TypeError, "compress"),
    (dict(cache_projection="yes"), TypeError, "cache_projection"),
    (dict(exclude="(["), ValueError, "exclude"),
    (dict(exclude=3), TypeError, "exclude"),
]
FLORA_BAD = [
    (dict(beta1=1.0), ValueError, "beta1"),
    (dict(beta1=-0.1), ValueError, "beta1"),
    (dict(beta1=float("nan")), ValueError, "beta1"),
    (dict(beta2_decay=0.5), ValueError, "beta2_decay"),
    (dict(d=0.5), ValueError, "d"),
    (dict(eps=1e-3), TypeError, "eps"),
    (dict(eps=(-1.0, 1e-3)), ValueError, "eps"),
    (dict(scale_parameter="no"), TypeError, "scale_parameter"),
    (dict(relative_step=0), TypeError, "relative_step"),
]
ADAMW_BAD = [
    (dict(betas=(1.0, 0.999)), ValueError, "betas"),
    (dict(betas=(0.9, -0.1)), ValueError, "betas"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(preconditioner="diagonal"), ValueError, "preconditioner"),
    (dict(growth_limit=0.9), ValueError, "growth_limit"),
    (dict(growth_limit="1.01"), TypeError, "growth_limit"),
    (dict(preconditioner="subspace", distribution="gaussian"), ValueError, "preconditioner"),
    (dict(preconditioner="subspace", momentum_variant="paper"), ValueError, "preconditioner"),
]


SGD_BAD = [
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.5), ValueError, "momentum"),
    (dict(dampening=1.5), ValueError, "dampening"),
    (dict(nesterov="yes"), TypeError, "nesterov"),
    (dict(nesterov=True, dampening=0.1), ValueError, "nesterov"),
    (dict(nesterov=True, momentum=0.0), ValueError, "nesterov"),
    (dict(momentum_variant="history"), ValueError, "momentum_variant"),
]
LION_BAD = [
    (dict(betas=(1.0, 0.99)), ValueError, "betas"),
    (dict(betas=(0.9, -0.1)), ValueError, "betas"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(momentum_variant="paper"), ValueError, "momentum_variant"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD)
def test_bad_hyperparameters_name_the_argument(opt_spec, kwargs, exc, name):
    if not set(kwargs) <= set(inspect.signature(opt_spec[0]).parameters):
        exc = TypeError  # an option this optimizer lacks is refused, never ignored
    with pytest.raises(exc, match=name):
        _make(opt_spec, _model(), **kwargs)


@pytest.mark.parametrize(
    "cls,kwargs,exc,name",
    [(flora.Flora, *b) for b in FLORA_BAD]
    + [(flora.FloraAdamW, *b) for b in ADAMW_BAD]
    + [(flora.FloraSGD, *b) for b in SGD_BAD]
    + [(flora.FloraLion, *b) for b in LION_BAD],
)
def test_bad_base_hyperparameters(cls, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        cls(_model().named_parameters(), **kwargs)


def test_bad_group_override_names_the_group(opt_spec):
    cls, defaults = opt_spec
    model = _model()
    groups = [
        {"params": list(model[0].named_parameters())},
        {"params": list(model[1].named_parameters()), "rank": 0},
    ]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.rank"):
        cls(groups, **defaults)


def test_exclude_needs_names(opt_spec):
    cls, defaults = opt_spec
    with pytest.raises(ValueError, match="exclude"):
        cls(_model().parameters(), exclude="0.weight", **defaults)


def test_complex_parameters_refused(opt_spec):
    cls, defaults = opt_spec
    with pytest.raises(TypeError, match="complex"):
        cls([torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))], **defaults)


def test_sparse_gradient_refused(opt_spec):
    model = _model()
    opt = _make(opt_spec, model)
    model[0].weight.grad = torch.eye(50, 24).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# ---------------------------------------------------------------- state dict and resume
def _same_state(a, b):
    assert a.keys() == b.keys()
    for p in a:
        sa, sb = a[p], b[p]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
            else:
                assert type(sa[k]) is type(sb[k]) and sa[k] == sb[k], k


OPTIONS = {  # the momentum forms, each resumed across a window change
    "default": {},
    "subspace": dict(momentum_variant="subspace", distribution="orthonormal"),
    "gradient": dict(distribution="gradient"),  # the basis is state: saved and restored
    "gradient-fp32": dict(distribution="gradient", basis_dtype=None),
}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("split", [2, 3, 4])  # before, at and after the window change (kappa=3)
def test_resume_is_bit_identical(opt_spec, split, options, tmp_path):
    _check_resume(opt_spec, OPTIONS[options], split, tmp_path)


def _check_resume(opt_spec, options, split, tmp_path):
    """Save at ``split``, train on to step 8; a fresh model and optimizer loaded from the
    checkpoint and trained to step 8 end bit-identical. Returns the first run's model and
    optimizer."""
    model = _model()
    opt = _make(opt_spec, model, **options)
    _steps(model, opt, 0, split)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    _steps(model, opt, split, 8)

    resumed = _model()
    ckpt = torch.load(path, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2 = _make(opt_spec, resumed, **options)
    opt2.load_state_dict(ckpt["opt"])
    _steps(resumed, opt2, split, 8)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    return model, opt


@pytest.mark.parametrize("distribution", ["orthonormal", "gradient"])
@pytest.mark.parametrize("split", [2, 3, 4])
def test_subspace_preconditioner_resume_is_bit_identical(split, distribution, tmp_path):
    spec = (flora.FloraAdamW, {"lr": 1e-2})
    options = dict(preconditioner="subspace", distribution=distribution)
    model, opt = _check_resume(spec, options, split, tmp_path)
    # a state of the elementwise form is refused, naming what differs
    other = _model()
    plain = _make(spec, other, preconditioner="elementwise")
    _steps(other, plain, 0, 1)
    with pytest.raises(
        ValueError, match="projection" if distribution == "gradient" else "exp_avg_sq"
    ):
        _make(spec, model, **options).load_state_dict(
            {**plain.state_dict(), "param_groups": opt.state_dict()["param_groups"]}
        )


def test_state_dict_round_trip_is_exact(opt_spec):
    model = _model()
    opt = _make(opt_spec, model)
    _steps(model, opt, 0, 4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    opt2 = _make(opt_spec, model)
    opt2.load_state_dict(loaded)
    _same_state(opt.state, opt2.state)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for v in (v for s in opt.state.values() for v in s.values()):
        assert torch.is_tensor(v) or type(v) in (int, float)
    # loading copies: stepping the loaded optimizer leaves the source untouched
    before = {k: v.clone() for k, v in loaded["state"][1].items() if torch.is_tensor(v)}
    _steps(model, opt2, 4, 5)
    assert all(torch.equal(before[k], loaded["state"][1][k]) for k in before)


def test_gradient_basis_state_is_checked_on_load(opt_spec):
    model = _model()
    opt = _make(opt_spec, model, distribution="gradient")
    w = model[1].weight  # (40, 24): right side, basis (4, 24)
    with pytest.raises(ValueError, match="first step"):
        opt.projection(w)
    _steps(model, opt, 0, 4)  # window 1
    assert opt.state[w]["projection"].shape == (4, 24)
    assert opt.state[w]["projection"].dtype == torch.bfloat16  # the default basis_dtype
    assert torch.equal(opt.projection(w), opt.state[w]["projection"].float())
    with pytest.raises(ValueError, match="current window"):
        opt.projection(w, window=0)
    sd = opt.state_dict()
    # a bf16 basis stays bf16 through a round trip (torch would cast it to the parameter's
    # dtype); the saved groups' basis_dtype is restored with them, like every option
    other = _model()
    half = _make(opt_spec, other, distribution="gradient", basis_dtype=torch.bfloat16)
    _steps(other, half, 0, 2)
    again = _make(opt_spec, other, distribution="gradient")
    again.load_state_dict(half.state_dict())
    assert again.param_groups[0]["basis_dtype"] is torch.bfloat16
    assert again.state[other[1].weight]["projection"].dtype == torch.bfloat16
    _same_state(half.state, again.state)
    del sd["state"][1]["projection"]
    with pytest.raises(ValueError, match="projection"):
        _make(opt_spec, model, distribution="gradient").load_state_dict(sd)


def test_seed_and_names_drive_the_projection(opt_spec):
    model = _model()
    a = _make(opt_spec, model, seed=1, distribution="orthonormal")  # seed-only families
    b = _make(opt_spec, model, seed=2, distribution="orthonormal")
    w = model[1].weight
    assert not torch.equal(a.projection(w), b.projection(w))
    expected = projection_matrix(4, 24, seed=1, key=parameter_key("1.weight"), window=0,
                                 distribution="orthonormal")  # fmt: skip
    assert torch.equal(a.projection(w), expected)
    positional = opt_spec[0](model.parameters(), rank=4, distribution="orthonormal")
    assert not torch.equal(positional.projection(w), a.projection(w))


def test_window_advances_every_kappa_and_projection_is_used(opt_spec):
    model = _model()
    opt = _make(opt_spec, model, kappa=3, **_paper_form(opt_spec))
    w = model[1].weight  # (40, 24): right side, momentum (40, 4)
    windows = []
    for i in range(7):
        _steps(model, opt, i, i + 1)
        windows.append(opt.state[w]["window"])
    assert windows == [0, 0, 1, 1, 1, 2, 2]
    assert opt.decision(w).side == "right"
    if opt_spec[0] not in (flora.Flora, flora.FloraAdamW):
        return  # FloraSGD's and FloraLion's first momentum: tests/optim/test_sgd_lion.py
    # one fresh step from zero momentum: M_1 = (1 - beta1) * down(u_1)
    is_flora = opt_spec[0] is flora.Flora
    m2 = _model()
    beta = dict(beta1=0.5) if is_flora else dict(betas=(0.5, 0.999))
    opt2 = _make(opt_spec, m2, **_paper_form(opt_spec), **beta)
    _loss(m2, 0).backward()
    weight = m2[1].weight
    grad = weight.grad.clone()
    opt2.step()
    if is_flora:  # u_1 = U_1 = G / sqrt(V_1), the preconditioned update before clipping
        sq = grad.double().square()
        row, col = sq.mean(dim=1), sq.mean(dim=0)  # beta2_hat_1 = 0: the first factors
        u1 = (grad.double() / (torch.outer(row, col) / row.mean()).sqrt()).float()
    else:  # u_1 is the gradient itself
        u1 = grad
    expected = 0.5 * down(u1, opt2.projection(weight), "right")
    torch.testing.assert_close(opt2.state[weight]["exp_avg"], expected, rtol=1e-4, atol=1e-6)


def test_cache_projection_changes_nothing(opt_spec):
    m1, m2 = _model(), _model()
    seeded = dict(distribution="orthonormal")  # the default gradient basis is state, not cached
    if "foreach" in inspect.signature(opt_spec[0]).parameters:
        seeded["foreach"] = False  # the loop both times (the engine leaves cached ones to it)
    o1, o2 = _make(opt_spec, m1, **seeded), _make(opt_spec, m2, cache_projection=True, **seeded)
    _steps(m1, o1, 0, 7)
    _steps(m2, o2, 0, 7)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert o2.projection_cache_bytes() == o2.plan().projection_cache_bytes > 0
    assert o1.projection_cache_bytes() == 0


# ---------------------------------------------------------------- non-finite, AMP, schedules
def test_nonfinite_gradient_skips_the_whole_step_by_default(opt_spec):
    model = _model()
    opt = _make(opt_spec, model)
    _steps(model, opt, 0, 2)
    state_before = copy.deepcopy(opt.state_dict()["state"])
    params_before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _loss(model, 5).backward()
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="whole step was skipped"):
        opt.step()
    for p, before in zip(model.parameters(), params_before, strict=True):
        assert torch.equal(p, before)  # no parameter moved, the finite ones neither
    _same_state(state_before, opt.state_dict()["state"])  # step counters stay equal
    assert opt.skipped_steps == 1


def test_nonfinite_skip_parameter_skips_only_the_offender(opt_spec):
    model = _model()
    opt = _make(opt_spec, model, nonfinite="skip_parameter")
    _steps(model, opt, 0, 2)
    state_before = copy.deepcopy(opt.state[model[1].weight])
    weight_before = model[1].weight.detach().clone()
    other_before = model[3].weight.detach().clone()
    opt.zero_grad()
    _loss(model, 5).backward()
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skip_parameter"):
        opt.step()
    assert torch.equal(model[1].weight, weight_before)
    state = opt.state[model[1].weight]
    assert state.pop("nonfinite_skips") == 1
    _same_state({0: state_before}, {0: state})
    assert not torch.equal(model[3].weight, other_before)  # the others still step
    assert opt.skipped_steps == 0


def test_nonfinite_gradient_can_raise_before_any_update(opt_spec):
    model = _model()
    opt = _make(opt_spec, model, nonfinite="raise")
    _loss(model, 0).backward()
    model[3].weight.grad[1, 1] = float("inf")  # the last matrix: the others come first
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"3\.weight.*no parameter was updated"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert all(not s for s in opt.state.values())


def test_nonfinite_policy_of_one_group_raise_wins(opt_spec):
    """Groups may differ: a 'raise' group's offender raises even if another group skips."""
    model = _model()
    cls, defaults = opt_spec
    groups = [
        {"params": list(model[1].named_parameters("1")), "nonfinite": "raise"},
        {"params": list(model[3].named_parameters("3"))},
    ]
    opt = cls(groups, **{**defaults, "rank": 4})
    _loss(model, 0).backward()
    model[3].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="whole step"):
        opt.step()  # the offender's group skips
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()


def test_unchecked_nonfinite_gradient_reaches_the_weights(opt_spec):
    """nonfinite="unchecked": no check, as in torch's optimizers; a checked group beside it
    still skips the whole step for its own offender."""
    model = _model()
    opt = _make(opt_spec, model, nonfinite="unchecked")
    _steps(model, opt, 0, 1)  # the gradient basis is found from a finite gradient
    opt.zero_grad()
    _loss(model, 1).backward()
    model[1].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    held = [model[1].weight] + [
        v
        for v in opt.state[model[1].weight].values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    assert any(torch.isnan(t).any() for t in held) and opt.skipped_steps == 0  # Lion: sign
    # at a window's first step the basis cannot be found from it: a FloatingPointError
    fresh = _model()
    opt = _make(opt_spec, fresh, nonfinite="unchecked", distribution="gradient")
    _loss(fresh, 0).backward()
    fresh[1].weight.grad.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="gradient basis"):
        opt.step()
    # groups may differ: the checked group's offender still skips the whole step
    model = _model()
    cls, defaults = opt_spec
    groups = [
        {"params": list(model[1].named_parameters("1")), "nonfinite": "unchecked"},
        {"params": list(model[3].named_parameters("3"))},
    ]
    opt = cls(groups, **{**defaults, "rank": 4})
    _loss(model, 0).backward()
    model[3].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="whole step"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_grad_scaler_skips_inf_steps(opt_spec):
    model = _model()
    opt = _make(opt_spec, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(_loss(model, 0)).backward()
    model[1].weight.grad[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the optimizer must not even see the bad gradient
        scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert len(opt.state) == 0 and scaler.get_scale() == 2.0**9
    opt.zero_grad()
    scaler.scale(_loss(model, 1)).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(before[1], model[1].weight)


def test_lr_scheduler_drives_group_lr(opt_spec):
    m1, m2 = _model(), _model()
    o1 = _make(opt_spec, m1)
    sched = torch.optim.lr_scheduler.LambdaLR(o1, lambda step: 0.0 if step >= 3 else 1.0)
    _steps(m1, o1, 0, 3, scheduler=sched)
    frozen = [p.detach().clone() for p in m1.parameters()]
    _steps(m1, o1, 3, 6, scheduler=sched)  # lr is 0 now: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(frozen, m1.parameters(), strict=True))
    o2 = _make(opt_spec, m2)  # halving the lr by schedule == constructing with half the lr
    sched2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda step: 0.5)
    m3 = _model()
    o3 = _make(opt_spec, m3, lr=opt_spec[1]["lr"] * 0.5)
    _steps(m2, o2, 0, 4, scheduler=sched2)
    _steps(m3, o3, 0, 4)
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), m3.parameters(), strict=True))


# ---------------------------------------------------------------- precision
def test_bf16_parameters_get_fp32_state_and_one_rounding(opt_spec):
    m16 = _model(torch.bfloat16)
    m32 = _model(torch.bfloat16).float()  # same values, float32 master copy
    o16, o32 = _make(opt_spec, m16), _make(opt_spec, m32)
    _loss(m16, 0).backward()
    for p16, p32 in zip(m16.parameters(), m32.parameters(), strict=True):
        p32.grad = p16.grad.float()
    o16.step()
    o32.step()
    for p16, p32 in zip(m16.parameters(), m32.parameters(), strict=True):
        assert p16.dtype == torch.bfloat16
        assert torch.equal(p16, p32.to(torch.bfloat16))
        assert all(
            v.dtype == (torch.bfloat16 if k == "projection" else torch.float32)  # bf16 basis
            for k, v in o16.state[p16].items()
            if torch.is_tensor(v)
        )
    # fp32 state survives load_state_dict (torch would cast it to bf16)
    o16b = _make(opt_spec, m16)
    o16b.load_state_dict(o16.state_dict())
    _same_state(o16.state, o16b.state)


def test_maximize_is_minimizing_the_negation(opt_spec):
    m1, m2 = _model(), _model()
    o1, o2 = _make(opt_spec, m1, maximize=True), _make(opt_spec, m2)
    for i in range(4):
        for m, o, sign in ((m1, o1, -1.0), (m2, o2, 1.0)):
            o.zero_grad()
            (sign * _loss(m, i)).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))


def test_training_reduces_loss(opt_spec):
    # kappa must be long enough that beta1**kappa * sqrt(dim / rank) < 1: each transfer
    # inflates the momentum norm by about sqrt(dim / rank) (the paper's kappa=1 diverged).
    # At rank 4 of dims 24/40 Flora's clipped direction is mostly projection noise, so it
    # needs about twice the steps of full-size momentum to get there.
    model = _model()
    opt = _make(opt_spec, model, kappa=20)
    first = _loss(model, 0).item()
    for _ in range(80):
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


@pytest.mark.gpu
def test_resume_on_cuda_from_cpu_checkpoint(opt_spec):
    model = _model()
    opt = _make(opt_spec, model)
    _steps(model, opt, 0, 4)
    cuda_model = copy.deepcopy(model).cuda()
    opt_cuda = _make(opt_spec, cuda_model)
    opt_cuda.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), cuda_model.parameters(), strict=True):
        for v in opt_cuda.state[q].values():
            if torch.is_tensor(v):
                assert v.device.type == "cuda" and v.dtype == torch.float32
        if opt.projection(p) is not None:  # the same matrix on both devices
            torch.testing.assert_close(
                opt_cuda.projection(q).cpu(), opt.projection(p), rtol=0, atol=1e-6
            )
    x = _batch(4)
    for m, o in ((model, opt), (cuda_model, opt_cuda)):
        device = next(m.parameters()).device
        o.zero_grad()
        logits = m(x.to(device))
        target = x.roll(1, 1).reshape(-1).to(device)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 50), target).backward()
        o.step()
    for p, q in zip(model.parameters(), cuda_model.parameters(), strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-4, atol=1e-5)


def test_projection_cache_holds_one_matrix_per_parameter_with_bf16(opt_spec):
    """The cache is keyed by the parameter, not by the fp32 working copy of a bf16 one."""
    model = _model(torch.bfloat16)
    opt = _make(opt_spec, model, cache_projection=True, distribution="orthonormal")
    _steps(model, opt, 0, 5)
    assert opt.projection_cache_bytes() == opt.plan().projection_cache_bytes > 0


def test_a_state_from_before_generator_v2_decodes_with_v1(opt_spec):
    """Compressed states name their projection generator (2 now); a state without one was
    written with v1, and keeps its projections: a resumed run decodes its momentum as
    written."""
    model = _model()
    seeded = dict(distribution="orthonormal")
    opt = _make(opt_spec, model, **seeded)
    _steps(model, opt, 0, 2)
    w = model[1].weight
    assert opt.state[w]["generator"] == 2
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the state's dicts
    for st in sd["state"].values():
        st.pop("generator", None)
    old = _make(opt_spec, model, **seeded)
    old.load_state_dict(sd)
    expected = projection_matrix(4, 24, seed=0, key=parameter_key("1.weight"), window=0,
                                 distribution="orthonormal", generator=1)  # fmt: skip
    assert torch.equal(old.projection(w), expected)
    assert not torch.equal(opt.projection(w), expected)
    sd["state"][1]["generator"] = 3
    with pytest.raises(ValueError, match="generator"):
        _make(opt_spec, model, **seeded).load_state_dict(sd)
