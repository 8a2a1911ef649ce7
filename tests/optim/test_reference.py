"""Flora and FloraAdamW agree with a float64 loop implementation written from the paper.

Properties checked (same projection matrices on both sides, >= 3 resampling windows):
- Algorithm 2 with the Adafactor base (``Flora``), every momentum variant (the subspace one
  with orthonormal and Gaussian projections), both sides;
- Algorithm 2 with the AdamW base (``FloraAdamW``), full and factored second moment;
- float64 parameters agree to ~1e-12, float32 parameters to float32 accuracy;
- vectors and uncompressed matrices follow the naive-momentum reference.
"""

import pytest
import torch
from reference import (
    CompressedMomentum,
    flora_adafactor,
    flora_adamw,
    range_basis,
    subspace_adam,
)

import flora

SHAPES = {"left": (12, 40), "right": (40, 12), "vector": (40,)}
STEPS, KAPPA, RANK = 14, 4, 5  # windows 0, 1, 2, 3


def _run(opt_cls, dtype, grads, **kw):
    params = {
        k: torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(dtype))
        for k, s in SHAPES.items()
    }
    init = {k: p.detach().clone() for k, p in params.items()}
    kw.setdefault("distribution", "orthonormal")  # seed-only: projections known in advance
    if opt_cls is flora.FloraAdamW:
        kw.setdefault("preconditioner", "elementwise")
    opt = opt_cls(list(params.items()), rank=RANK, kappa=KAPPA, **kw)
    projs = {k: {w: opt.projection(p, window=w) for w in range(4)} for k, p in params.items()}
    for t in range(STEPS):
        for k, p in params.items():
            p.grad = grads[k][t].to(dtype)
        opt.step()
    assert all(opt.state[params[k]]["window"] == 3 for k in ("left", "right"))
    return init, params, projs, opt


def _momentum(key, projs, beta, variant):
    return CompressedMomentum(
        SHAPES[key],
        beta=beta,
        kappa=KAPPA,
        side=key,
        projection=lambda w: projs[key][w].double(),
        variant=variant,
    )


def _grads():
    g = torch.Generator().manual_seed(1)
    return {
        k: [torch.randn(s, generator=g, dtype=torch.float64) for _ in range(STEPS)]
        for k, s in SHAPES.items()
    }


VARIANTS = [  # (momentum_variant, distribution)
    ("history", "gaussian"),
    ("paper", "gaussian"),
    ("subspace", "orthonormal"),
    ("subspace", "coordinates"),
    ("subspace", "gaussian"),
]


@pytest.mark.parametrize("variant,distribution", VARIANTS)
@pytest.mark.parametrize("factored", [True, False])  # False: Table 4's linear-memory base
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_flora_matches_reference(variant, distribution, factored, dtype, tol):
    grads = _grads()
    hp = dict(lr=0.05, beta1=0.9, beta2_decay=-0.8, d=1.0, weight_decay=0.01)
    init, params, projs, _opt = _run(
        flora.Flora, dtype, grads, momentum_variant=variant, eps=(None, 1e-3),
        factor_second_moment=factored, distribution=distribution, **hp,
    )  # fmt: skip
    for key, p in params.items():
        m = _vector_momentum(0.9) if key == "vector" else _momentum(key, projs, 0.9, variant)
        ref = flora_adafactor(
            init[key].double(), grads[key], eps1=torch.finfo(dtype).eps, eps2=1e-3, momentum=m,
            factored=factored, **hp,
        )  # fmt: skip
        err = (p.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < tol, (key, err)


@pytest.mark.parametrize(
    "scale_parameter,relative_step", [(False, True), (True, False), (False, False)]
)
def test_flora_step_size_conventions_match_reference(scale_parameter, relative_step):
    grads = _grads()
    hp = dict(lr=0.05, beta1=0.9, beta2_decay=-0.8, d=1.0, weight_decay=0.01)
    init, params, projs, _ = _run(
        flora.Flora,
        torch.float64,
        grads,
        eps=(None, 1e-3),
        scale_parameter=scale_parameter,
        relative_step=relative_step,
        **hp,
    )  # fmt: skip  (the default momentum form, subspace, with a seed-only basis)
    for key, p in params.items():
        m = _vector_momentum(0.9) if key == "vector" else _momentum(key, projs, 0.9, "subspace")
        ref = flora_adafactor(
            init[key].double(), grads[key], eps1=torch.finfo(torch.float64).eps, eps2=1e-3,
            momentum=m, scale_parameter=scale_parameter, relative_step=relative_step, **hp,
        )  # fmt: skip
        err = (p.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-12, (key, err)


def _vector_momentum(beta):
    return CompressedMomentum(
        (40,), beta=beta, kappa=KAPPA, side=None, projection=None, variant="history"
    )


@pytest.mark.parametrize("variant,distribution", VARIANTS)
@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_flora_adamw_matches_reference(variant, distribution, factored, dtype, tol):
    grads = _grads()
    hp = dict(lr=1e-2, eps=1e-8, weight_decay=0.05)
    init, params, projs, _ = _run(
        flora.FloraAdamW,
        dtype,
        grads,
        betas=(0.9, 0.99),
        distribution=distribution,
        momentum_variant=variant,
        factor_second_moment=factored,
        **hp,
    )
    for key, p in params.items():
        m = _vector_momentum(0.9) if key == "vector" else _momentum(key, projs, 0.9, variant)
        ref = flora_adamw(
            init[key].double(),
            grads[key],
            beta1=0.9,
            beta2=0.99,
            factored=factored and key != "vector",
            momentum=m,
            **hp,
        )
        err = (p.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < tol, (key, err)


def _run_gradient_basis(opt_cls, grads, **kw):
    """Run with distribution="gradient"; return the bases each window used, as stored (in
    ``basis_dtype`` if given, checked), converted to float64."""
    stored = kw.get("basis_dtype", torch.bfloat16) or torch.float64  # bf16: the default
    params = {k: torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for k, s in SHAPES.items()}
    init = {k: p.detach().clone() for k, p in params.items()}
    opt = opt_cls(list(params.items()), rank=RANK, kappa=KAPPA, distribution="gradient", **kw)
    bases: dict[str, dict[int, torch.Tensor]] = {"left": {}, "right": {}}
    for t in range(STEPS):
        for k, p in params.items():
            p.grad = grads[k][t]
        opt.step()
        for k in bases:
            st = opt.state[params[k]]
            assert st["projection"].dtype == stored
            bases[k].setdefault(st["window"], st["projection"].double())
    return init, params, bases, opt


@pytest.mark.parametrize("side", ["left", "right"])
def test_gradient_basis_is_the_range_finder_of_the_window_first_gradient(side):
    """Window w's basis is Halko's range finder of the gradient at step max(1, w * kappa)."""
    from flora.projection import parameter_key, sign_matrix

    grads = _grads()
    hp = dict(lr=0.05, beta1=0.9, beta2_decay=-0.8, d=1.0, weight_decay=0.0, eps=(None, 1e-3))
    _, _, bases, _ = _run_gradient_basis(flora.Flora, grads, basis_dtype=None, **hp)
    m, n = SHAPES[side]
    dim, other = (m, n) if side == "left" else (n, m)
    for window, basis in bases[side].items():
        sketch = sign_matrix(
            min(2 * RANK, dim), other, seed=0, key=parameter_key(side), window=window,
            stream="momentum/sketch", dtype=torch.float64,
        )  # fmt: skip
        g = grads[side][max(1, window * KAPPA) - 1]
        ref = range_basis(g, RANK, side, sketch, power_iterations=1)
        c = RANK / dim
        projector, ref_projector = c * basis.T @ basis, c * ref.T @ ref
        assert (projector - ref_projector).abs().max() < 1e-10, window
        assert torch.allclose(basis @ basis.T, torch.eye(RANK, dtype=torch.float64) / c)


@pytest.mark.parametrize("basis_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("opt_name", ["Flora", "FloraAdamW"])
def test_gradient_basis_matches_reference(opt_name, basis_dtype):
    """The subspace momentum fed the stored bases: equal to the float64 loop to 1e-12 (a
    bf16 basis is rounded once when stored and used exactly as stored)."""
    grads = _grads()
    if opt_name == "Flora":
        hp = dict(lr=0.05, beta1=0.9, beta2_decay=-0.8, d=1.0, weight_decay=0.01)
        init, params, bases, _ = _run_gradient_basis(
            flora.Flora, grads, eps=(None, 1e-3), basis_dtype=basis_dtype, **hp
        )
    else:
        hp = dict(lr=1e-2, eps=1e-8, weight_decay=0.05)
        init, params, bases, _ = _run_gradient_basis(
            flora.FloraAdamW, grads, betas=(0.9, 0.99), factor_second_moment=False,
            preconditioner="elementwise", basis_dtype=basis_dtype, **hp,
        )  # fmt: skip
    assert sorted(bases["left"]) == [0, 1, 2, 3]
    for key, p in params.items():
        if key == "vector":
            m = _vector_momentum(0.9)
        else:
            m = _momentum(key, bases, 0.9, "subspace")
        if opt_name == "Flora":
            eps1 = torch.finfo(torch.float64).eps
            ref = flora_adafactor(init[key], grads[key], eps1=eps1, eps2=1e-3, momentum=m, **hp)
        else:
            ref = flora_adamw(
                init[key], grads[key], beta1=0.9, beta2=0.99, factored=False, momentum=m, **hp
            )
        err = (p.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-12, (key, err)


SUBSPACE_CASES = [  # (distribution, dtype, tol); the gradient basis in float64 only: its
    # float32 range finder differs from the float64 one by rounding, not by formula
    ("orthonormal", torch.float64, 1e-12),
    ("coordinates", torch.float64, 1e-12),
    ("gradient", torch.float64, 1e-12),
    ("gradient-bf16", torch.float64, 1e-12),  # basis_dtype=torch.bfloat16
    ("orthonormal", torch.float32, 5e-5),
]


@pytest.mark.parametrize("distribution,dtype,tol", SUBSPACE_CASES)
@pytest.mark.parametrize("growth_limit", [1.01, None])
def test_subspace_preconditioner_matches_reference(distribution, dtype, tol, growth_limit):
    """FloraAdamW(preconditioner="subspace"): GaLore + Fira with transferred moments."""
    grads = _grads()
    hp = dict(lr=1e-2, eps=1e-8, weight_decay=0.05)
    kw = dict(betas=(0.9, 0.99), preconditioner="subspace", growth_limit=growth_limit, **hp)
    if distribution == "gradient-bf16":
        init, params, projs, _ = _run_gradient_basis(
            flora.FloraAdamW, grads, basis_dtype=torch.bfloat16, **kw
        )
    elif distribution == "gradient":
        init, params, projs, _ = _run_gradient_basis(
            flora.FloraAdamW, grads, basis_dtype=None, **kw
        )
    else:
        init, params, projs, _ = _run(
            flora.FloraAdamW, dtype, grads, distribution=distribution, **kw
        )
    for key, p in params.items():
        if key == "vector":  # not compressed: elementwise AdamW
            ref = flora_adamw(
                init[key].double(), grads[key], beta1=0.9, beta2=0.99, factored=False,
                momentum=_vector_momentum(0.9), **hp,
            )  # fmt: skip
        else:
            ref = subspace_adam(
                init[key].double(), grads[key], beta1=0.9, beta2=0.99, side=key, kappa=KAPPA,
                projection=lambda w, key=key: projs[key][w], growth_limit=growth_limit, **hp,
            )  # fmt: skip
        err = (p.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < tol, (key, err)


def test_subspace_preconditioner_limiter_and_transfer_matter():
    """The comparison is sensitive to the limiter and to the moments' transfer."""
    grads = _grads()
    hp = dict(lr=1e-2, eps=1e-8, weight_decay=0.0)
    init, params, projs, _ = _run(
        flora.FloraAdamW, torch.float64, grads, betas=(0.9, 0.99), preconditioner="subspace", **hp
    )
    common = dict(beta1=0.9, beta2=0.99, side="left", kappa=KAPPA, **hp)
    ref = subspace_adam(init["left"], grads["left"], projection=lambda w: projs["left"][w],
                        growth_limit=1.01, **common)  # fmt: skip
    no_limit = subspace_adam(init["left"], grads["left"], projection=lambda w: projs["left"][w],
                             growth_limit=None, **common)  # fmt: skip
    one_basis = subspace_adam(init["left"], grads["left"], projection=lambda w: projs["left"][0],
                              growth_limit=1.01, **common)  # fmt: skip
    assert torch.allclose(params["left"], ref, rtol=0, atol=1e-12)
    assert not torch.allclose(params["left"], no_limit, rtol=0, atol=1e-6)
    assert not torch.allclose(params["left"], one_basis, rtol=0, atol=1e-6)


def test_reference_detects_a_wrong_transfer():
    """The comparison is sensitive: dropping the transfer at a window change is caught."""
    grads = _grads()
    hp = dict(lr=0.05, beta1=0.9, beta2_decay=-0.8, d=1.0, weight_decay=0.0)
    init, params, projs, _ = _run(flora.Flora, torch.float64, grads, **hp)  # seeded subspace
    m = _momentum("left", projs, 0.9, "subspace")
    m_no_transfer = _momentum("left", projs, 0.9, "subspace")
    original = m_no_transfer.__call__

    def no_transfer(t, u):
        if t // KAPPA != m_no_transfer.window:
            m_no_transfer.m = m_no_transfer.m * 0  # history thrown away instead of transferred
        return original(t, u)

    eps1 = torch.finfo(torch.float64).eps
    ref = flora_adafactor(init["left"], grads["left"], eps1=eps1, eps2=1e-3, momentum=m, **hp)
    bad = flora_adafactor(
        init["left"], grads["left"], eps1=eps1, eps2=1e-3, momentum=no_transfer, **hp
    )
    assert torch.allclose(params["left"], ref, rtol=0, atol=1e-12)
    assert not torch.allclose(params["left"], bad, rtol=0, atol=1e-6)
