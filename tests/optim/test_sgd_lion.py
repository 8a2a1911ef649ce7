"""FloraSGD and FloraLion: the subspace momentum composed with two more update rules.

Properties (the shared contract — bad input, resume, state dicts, non-finite gradients,
bf16, FSDP2 — runs in test_contract.py, test_state_bytes.py and test_fsdp.py):
- compression off (``compress=False``, and every vector) is ``torch.optim.SGD`` bit for bit
  in float32, for every option (nesterov, dampening, weight decay, maximize, groups);
  ``momentum=0`` is plain SGD with no state; FloraLion uncompressed equals a float64 loop of
  Lion's published formula, and ``betas[0]=0`` is signSGD with no state;
- compressed, both equal a float64 loop of their formula written in the full space (the
  subspace part a full matrix projected at every window change), fed the same bases, over
  four windows, both sides, seed-only and gradient bases;
- the first step's compressed momentum is what the formula says.
"""

import copy

import pytest
import torch
from reference import subspace_lion, subspace_sgd

import flora
from flora.projection import down

SHAPES = {"left": (12, 40), "right": (40, 12), "vector": (40,)}
STEPS, KAPPA, RANK = 14, 4, 5  # windows 0, 1, 2, 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(30, 16),
        torch.nn.Linear(16, 24),
        torch.nn.Tanh(),
        torch.nn.Linear(24, 30),
    )


def _loss(model, i):
    x = torch.randint(0, 30, (8, 5), generator=torch.Generator().manual_seed(i))
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, 30), x.roll(1, 1).reshape(-1))


SGD_CASES = [  # (momentum, dampening, nesterov, weight_decay, maximize)
    (0.9, 0.0, False, 0.0, False),
    (0.9, 0.0, True, 1e-2, False),
    (0.8, 0.3, False, 1e-2, True),
    (0.0, 0.0, False, 1e-2, False),  # no momentum: plain SGD, no state
]


@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize", SGD_CASES)
def test_sgd_uncompressed_is_torch_sgd_bit_for_bit(
    momentum, dampening, nesterov, weight_decay, maximize
):
    ours_model, torch_model = _model(), _model()
    hp = dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
              weight_decay=weight_decay, maximize=maximize)  # fmt: skip
    groups = [  # two groups with their own step sizes
        {"params": list(ours_model[:2].named_parameters()), "lr": 0.05},
        {"params": list(ours_model[3].named_parameters("3")), "lr": 0.2},
    ]
    ours = flora.FloraSGD(groups, compress=False, **hp)
    ref = torch.optim.SGD(
        [{"params": list(torch_model[:2].parameters()), "lr": 0.05},
         {"params": list(torch_model[3].parameters()), "lr": 0.2}],
        foreach=False, **hp,
    )  # fmt: skip
    for i in range(6):
        for model, opt in ((ours_model, ours), (torch_model, ref)):
            opt.zero_grad()
            _loss(model, i).backward()
            opt.step()
    for p, q in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        assert torch.equal(p, q)
    if momentum == 0:
        assert all(set(s) == {"step"} for s in ours.state.values())


def test_lion_uncompressed_matches_lion_and_signsgd_keeps_no_state():
    torch.manual_seed(0)
    theta = torch.randn(12, 40, dtype=torch.float64)
    grads = [torch.randn(12, 40, dtype=torch.float64) for _ in range(STEPS)]
    hp = dict(lr=1e-2, weight_decay=0.1)
    for betas in ((0.9, 0.99), (0.0, 0.99)):
        p = torch.nn.Parameter(theta.clone())
        opt = flora.FloraLion([p], betas=betas, compress=False, **hp)
        for g in grads:
            p.grad = g
            opt.step()
        ref = subspace_lion(theta, grads, beta1=betas[0], beta2=betas[1], side=None,
                            kappa=KAPPA, projection=None, **hp)  # fmt: skip
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-14)
        if betas[0] == 0:
            assert set(opt.state[p]) == {"step"}


def _grads():
    g = torch.Generator().manual_seed(1)
    return {
        k: [torch.randn(s, generator=g, dtype=torch.float64) for _ in range(STEPS)]
        for k, s in SHAPES.items()
    }


def _run(opt_cls, grads, **kw):
    """float64 parameters; the bases each window used, read after each step."""
    params = {k: torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for k, s in SHAPES.items()}
    init = {k: p.detach().clone() for k, p in params.items()}
    opt = opt_cls(list(params.items()), rank=RANK, kappa=KAPPA, **kw)
    bases: dict[str, dict[int, torch.Tensor]] = {"left": {}, "right": {}}
    for t in range(STEPS):
        for k, p in params.items():
            p.grad = grads[k][t]
        opt.step()
        for k in bases:
            bases[k].setdefault(opt.state[params[k]]["window"], opt.projection(params[k]).double())
    assert sorted(bases["left"]) == [0, 1, 2, 3]
    return init, params, bases


DISTRIBUTIONS = ["orthonormal", "gradient", "coordinates"]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize", SGD_CASES[:3])
def test_sgd_compressed_matches_reference(
    distribution, momentum, dampening, nesterov, weight_decay, maximize
):
    grads = _grads()
    hp = dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov,
              weight_decay=weight_decay)  # fmt: skip
    init, params, bases = _run(flora.FloraSGD, grads, distribution=distribution, **hp)
    for key, p in params.items():
        side = None if key == "vector" else key
        ref = subspace_sgd(
            init[key], grads[key], side=side, kappa=KAPPA,
            projection=None if side is None else (lambda w, key=key: bases[key][w]), **hp,
        )  # fmt: skip
        err = (p.detach() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-12, (key, err)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.5, 0.9)])
def test_lion_compressed_matches_reference(distribution, betas):
    grads = _grads()
    hp = dict(lr=1e-2, weight_decay=0.1)
    init, params, bases = _run(flora.FloraLion, grads, betas=betas, distribution=distribution, **hp)
    for key, p in params.items():
        side = None if key == "vector" else key
        ref = subspace_lion(
            init[key], grads[key], beta1=betas[0], beta2=betas[1], side=side, kappa=KAPPA,
            projection=None if side is None else (lambda w, key=key: bases[key][w]), **hp,
        )  # fmt: skip
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-12)


def test_reference_detects_a_missing_transfer():
    """Dropping the window change's projection moves the result well past the tolerance."""
    grads = _grads()
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
    init, params, bases = _run(flora.FloraSGD, grads, distribution="orthonormal", **hp)
    # a buffer re-expressed in the new basis without projection is a different optimizer
    wrong = copy.deepcopy(bases["left"])
    wrong[1] = bases["left"][2]
    ref = subspace_sgd(init["left"], grads["left"], side="left", kappa=KAPPA,
                       projection=lambda w: wrong[w], **hp)  # fmt: skip
    assert (params["left"].detach() - ref).abs().max() > 1e-3


@pytest.mark.parametrize("opt_cls", [flora.FloraSGD, flora.FloraLion])
def test_first_compressed_momentum(opt_cls):
    """SGD: M_1 = down(g_1) (torch's buffer starts at g_1); Lion: M_1 = (1 - beta2) down(g_1)."""
    model = _model()
    opt = opt_cls(model.named_parameters(), rank=4, distribution="orthonormal")
    _loss(model, 0).backward()
    w = model[1].weight  # (24, 16): right side
    grad = w.grad.clone()
    opt.step()
    scale = 1.0 if opt_cls is flora.FloraSGD else 1 - 0.99
    expected = scale * down(grad, opt.projection(w), "right")
    torch.testing.assert_close(opt.state[w]["exp_avg"], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opt_cls,lr", [(flora.FloraSGD, 0.3), (flora.FloraLion, 3e-3)])
def test_compressed_and_uncompressed_both_train(opt_cls, lr):
    """On a small model both compressed optimizers halve the loss, as the uncompressed do."""
    losses = {}
    for compress in (True, False):
        model = _model()
        opt = opt_cls(model.named_parameters(), lr=lr, rank=8, kappa=20, compress=compress)
        for _ in range(60):
            opt.zero_grad()
            loss = _loss(model, 0)
            loss.backward()
            opt.step()
        losses[compress] = loss.item()
    first = _loss(_model(), 0).item()
    assert losses[True] < 0.5 * first and losses[False] < 0.5 * first
