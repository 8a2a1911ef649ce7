"""Flora's multi-tensor step (``foreach``): same-shaped matrices stepped as stacks.

The engine must agree with the per-parameter loop (``foreach=False``, the reference) to a few
ulp across windows, groups, kinds (compressed on either side, full-size momentum, none) and
dtypes; keep the per-parameter state the truth (``state_dict``, resume, loading into the
loop); rebuild its stacks when the state is replaced or the buckets change; read the host
once per step (the finiteness verdict), never per matrix; and use few ops per matrix.
"""

import copy
import io

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import flora
from flora.optim.base import BUCKET_NUMEL

pytestmark = pytest.mark.filterwarnings(r"ignore:Flora\w*. 1 matrix parameter:UserWarning")

SHAPES = [(24, 40)] * 3 + [(40, 24)] * 2 + [(16, 16)] * 2 + [(12,), (5, 3), (24, 40)]


def _params(dtype=torch.float32, shapes=SHAPES):
    g = torch.Generator().manual_seed(0)
    return [
        (f"p{i}", torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)))
        for i, s in enumerate(shapes)
    ]


def _grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    for _, p in params:
        p.grad = scale * torch.randn(p.shape, generator=g, dtype=p.dtype)


def _run(foreach, steps=14, dtype=torch.float32, groups=None, params=None, cls=None, **kw):
    params = params if params is not None else _params(dtype)
    spec = groups(params) if groups else params
    cls = cls or flora.Flora
    opt = cls(spec, **{"rank": 4, "kappa": 5, "lr": 0.05, **kw, "foreach": foreach})
    return _steps(opt, params, 0, steps)


def _steps(opt, params, start, stop):
    for t in range(start, stop):
        _grads(params, t)
        opt.step()
    return params, opt


def _assert_close(a, b, dtype):
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for (name, p), (_, q) in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, **tol, msg=lambda m, name=name: f"{name}: {m}")


ADAMW = dict(cls=flora.FloraAdamW, lr=1e-2)
OPTIONS = [
    {},
    dict(weight_decay=0.1),
    dict(side="left"),
    dict(side="right"),
    dict(maximize=True),
    dict(scale_parameter=False, relative_step=False, lr=1e-3),
    dict(basis_dtype=None),
    dict(exclude=r"p[01]$"),  # two of a bucket's matrices uncompressed: the loop's
    dict(distribution="orthonormal"),  # seeded projections, generated per bucket
    dict(distribution="gaussian"),
    dict(distribution="rademacher", side="left"),
    ADAMW,  # the subspace preconditioner, seeded orthonormal
    {**ADAMW, "distribution": "gradient"},
    {**ADAMW, "growth_limit": None, "weight_decay": 0.0},
    {**ADAMW, "side": "left", "distribution": "coordinates"},
    dict(cls=flora.FloraSGD, lr=0.1, weight_decay=0.01),
    dict(cls=flora.FloraSGD, lr=0.1, nesterov=True, distribution="orthonormal"),
    dict(cls=flora.FloraSGD, lr=0.1, dampening=0.5, side="left"),
    dict(cls=flora.FloraLion, lr=1e-3, weight_decay=0.1),
    dict(cls=flora.FloraLion, lr=1e-3, distribution="orthonormal", side="left"),
]


def _id(options):
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in options.items()) or "default"


@pytest.mark.parametrize("options", OPTIONS, ids=_id)
def test_engine_equals_loop(options):
    a, _ = _run(False, **options)
    b, opt = _run(None, **options)
    assert opt._stacked._stacks, "the engine did not run"
    if options.get("cls") is flora.FloraLion:  # sign(): an entry within an ulp of 0 may flip
        for (name, p), (_, q) in zip(a, b, strict=True):
            off = ~torch.isclose(p, q, rtol=2e-5, atol=2e-6)
            assert off.float().mean() <= 2e-3, f"{name}: {int(off.sum())} entries differ"
        return
    _assert_close(a, b, torch.float32)


LOOP_ONLY = [
    dict(compress=False),
    dict(beta1=0.0),
    dict(momentum_variant="history", distribution="gaussian"),
    dict(distribution="orthonormal", cache_projection=True),
    {**ADAMW, "compress": False},
    {**ADAMW, "preconditioner": "elementwise"},
    dict(cls=flora.FloraSGD, lr=0.1, compress=False),
    dict(cls=flora.FloraLion, lr=1e-3, compress=False),
]


@pytest.mark.parametrize("options", LOOP_ONLY, ids=_id)
def test_what_the_engine_leaves_to_the_loop_is_the_loop_bit_for_bit(options):
    """Without compression the loop is torch's optimizer bit for bit: the engine keeps out."""
    a, _ = _run(False, **options)
    b, opt = _run(None, **options)
    assert not opt._stacked._stacks
    for (_, p), (_, q) in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_engine_equals_loop_float64_and_groups():
    def groups(params):
        return [
            {"params": params[:2], "lr": 0.05},
            {"params": params[2:], "lr": 0.02, "beta1": 0.5},
        ]

    a, _ = _run(False, dtype=torch.float64, groups=groups)
    b, opt = _run(None, dtype=torch.float64, groups=groups)
    _assert_close(a, b, torch.float64)
    # the (24, 40) matrices of the two groups are stacked apart
    sizes = sorted(len(sig) for sig in opt._stacked._stacks)
    assert sizes == [2, 2, 2, 2], sizes


def test_state_is_views_of_the_stacks_and_equals_the_loop():
    a, loop = _run(False, steps=7)
    b, engine = _run(None, steps=7)
    for (_, p), (_, q) in zip(a, b, strict=True):
        sa, sb = loop.state[p], engine.state[q]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if torch.is_tensor(value):
                assert sb[key].shape == value.shape and sb[key].dtype == value.dtype
                torch.testing.assert_close(sb[key], value, rtol=2e-5, atol=2e-6)
            else:
                assert sb[key] == value, key
    stacked = next(iter(engine._stacked._stacks.values()))[1]["exp_avg"]
    first = engine.state[b[0][1]]["exp_avg"]
    assert first.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    assert engine.state_bytes() == loop.state_bytes() == engine.plan().state_bytes


def test_resume_through_torch_save_is_bit_identical_and_loads_into_the_loop():
    full, _ = _run(None, steps=14)
    params, opt = _run(None, steps=6)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    for foreach, expected in ((None, full), (False, None)):
        resumed = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in params]
        other = flora.Flora(resumed, rank=4, kappa=5, lr=0.05, foreach=foreach)
        buffer.seek(0)
        other.load_state_dict(torch.load(buffer, weights_only=True))
        for t in range(6, 14):
            _grads(resumed, t)
            other.step()
        if expected is not None:  # engine -> engine: bit for bit
            for (_, p), (_, q) in zip(expected, resumed, strict=True):
                assert torch.equal(p, q)
        else:  # engine -> loop: the loop's few-ulp difference only
            _assert_close(full, resumed, torch.float32)


def test_load_state_dict_replaces_the_stacks():
    params, opt = _run(None, steps=3)
    before = {sig: s[1]["exp_avg"] for sig, s in opt._stacked._stacks.items()}
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        if "exp_avg" in st:
            st["exp_avg"].zero_()
    opt.load_state_dict(sd)
    assert not opt._stacked._stacks
    _grads(params, 3)
    opt.step()
    for sig, stacks in opt._stacked._stacks.items():
        assert stacks[1]["exp_avg"] is not before.get(sig)
        for i, (_, p) in enumerate(x for x in params if id(x[1]) in sig):
            assert opt.state[p]["exp_avg"] is stacks[2][i]["exp_avg"]


def test_buckets_follow_which_parameters_have_gradients():
    a, b = _params(), _params()
    opts = [
        flora.Flora(ps, rank=4, kappa=5, lr=0.05, foreach=f) for ps, f in ((a, False), (b, None))
    ]
    for t in range(12):
        for params, opt in zip((a, b), opts, strict=True):
            _grads(params, t)
            if t % 3 == 1:  # a member of the (24, 40) bucket sits a step out
                params[1][1].grad = None
            opt.step()
    _assert_close(a, b, torch.float32)


def test_skip_parameter_in_a_bucket_steps_its_members_alone():
    a, loop = _run(False, steps=4, nonfinite="skip_parameter")
    b, engine = _run(None, steps=4, nonfinite="skip_parameter")
    for params, opt in ((a, loop), (b, engine)):
        _grads(params, 4)
        params[0][1].grad[0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="skip_parameter"):
            opt.step()
        _grads(params, 5)
        opt.step()
    _assert_close(a, b, torch.float32)
    assert engine.state[b[0][1]]["nonfinite_skips"] == 1


def test_bf16_parameters_and_narrow_moments_use_the_loop():
    for kw, dtype in ((dict(), torch.bfloat16), (dict(moment_dtype=torch.bfloat16), torch.float32)):
        a, _ = _run(False, steps=4, dtype=dtype, **kw)
        b, opt = _run(None, steps=4, dtype=dtype, **kw)
        assert not opt._stacked._stacks
        for (_, p), (_, q) in zip(a, b, strict=True):
            assert torch.equal(p, q)


def test_buckets_are_split_at_bucket_numel():
    rows = BUCKET_NUMEL // 64 // 2 + 1  # two of these exceed BUCKET_NUMEL: one per bucket
    shapes = [(rows, 64)] * 3 + [(8, 8)] * 3
    _, opt = _run(True, steps=2, params=_params(shapes=shapes), rank=2)
    assert sorted(len(sig) for sig in opt._stacked._stacks) == [3]  # only the small ones


def test_foreach_none_on_the_cpu_stacks_small_matrices_and_seeded_ones():
    from flora.optim.base import CPU_STACK_NUMEL

    shapes = [(CPU_STACK_NUMEL // 64 + 1, 64)] * 2 + [(8, 8)] * 2
    _, default = _run(None, steps=2, params=_params(shapes=shapes), rank=2)
    _, forced = _run(True, steps=2, params=_params(shapes=shapes), rank=2)
    _, seeded = _run(None, steps=2, params=_params(shapes=shapes), rank=2, cls=flora.FloraAdamW)
    assert sorted(len(sig) for sig in default._stacked._stacks) == [2]
    assert sorted(len(sig) for sig in forced._stacked._stacks) == [2, 2]
    assert sorted(len(sig) for sig in seeded._stacked._stacks) == [2, 2]  # generation pays


class _Syncs(TorchDispatchMode):
    """Host reads of tensor values: ``.item()`` and ``float()`` (``_local_scalar_dense``) and
    ``.tolist()``, which reads the data without dispatching an op."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.count += 1
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("nonfinite", ["skip", "unchecked"])
@pytest.mark.parametrize("foreach", [False, None])
def test_one_host_sync_per_step_in_the_engine(foreach, nonfinite):
    shapes = [(20, 30)] * 4
    params, opt = _run(
        foreach, steps=2, params=_params(shapes=shapes), kappa=100, nonfinite=nonfinite
    )
    _grads(params, 2)
    with _Syncs() as syncs:
        opt.step()
    # one per step: the finiteness verdict of every gradient at once (base._all_finite),
    # none with nonfinite="unchecked"; the loop also reads each matrix's parameter RMS and
    # clipping norm as Python floats
    verdict = 0 if nonfinite == "unchecked" else 1
    assert syncs.count == verdict + (0 if foreach is None else 2 * len(shapes))


def test_ops_per_matrix():
    """A bucket of 12 compressed matrices: at most 25 aten ops per matrix per steady step."""
    shapes = [(48, 64)] * 12
    params, opt = _run(None, steps=3, params=_params(shapes=shapes), rank=8, kappa=100)
    _grads(params, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    assert ops <= 25 * len(shapes), ops


def test_foreach_is_validated():
    with pytest.raises(TypeError, match="foreach"):
        flora.Flora(_params(), foreach="yes")
    with pytest.raises(TypeError, match="foreach"):
        flora.Flora([{"params": [p for _, p in _params()], "foreach": 1}])


def test_deepcopy_steps_alike():
    params, opt = _run(None, steps=3)
    clone = copy.deepcopy(opt)
    twins = clone.param_groups[0]["params"]
    for t in range(3, 8):
        _grads(params, t)
        for (_, p), q in zip(params, twins, strict=True):
            q.grad = p.grad.clone()
        opt.step()
        clone.step()
    for (_, p), q in zip(params, twins, strict=True):
        assert torch.equal(p, q)


COMPILED = [flora.Flora, flora.FloraAdamW, flora.FloraSGD, flora.FloraLion]
LRS = {flora.Flora: 0.05, flora.FloraAdamW: 1e-2, flora.FloraSGD: 0.1, flora.FloraLion: 1e-3}


@pytest.mark.parametrize("cls", COMPILED, ids=lambda c: c.__name__)
def test_compiled_bucket_step_is_one_graph_across_steps_and_windows(cls):
    """``compiled=True``: the bucket function is compiled with ``fullgraph=True`` once; the
    step count and lr are tensors, so 8 steps over three windows (kappa=3, the boundary
    steps in the loop) and a changed lr add no graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    shapes = [(24, 40)] * 3
    lr = LRS[cls]
    kw = dict(params=_params(shapes=shapes), cls=cls, kappa=3, lr=lr)
    a, compiled = _run(True, steps=6, compiled=True, **kw)
    kw["params"] = _params(shapes=shapes)
    b, eager = _run(True, steps=6, **kw)
    for opt, params in ((compiled, a), (eager, b)):
        for group in opt.param_groups:
            group["lr"] = lr / 2  # an LR scheduler's change
        _steps(opt, params, 6, 8)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    _assert_close(a, b, torch.float32)
    torch._dynamo.reset()
