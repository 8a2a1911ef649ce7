"""The lean preset (flora.lean): what it turns on, that it trains without optimizer.step()
in the loop, that it refuses what it sets itself, and that its accumulation plan is exact."""

import pytest
import torch

import flora
from flora.lean import lean_setup


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 8))


def _batch(i):
    g = torch.Generator().manual_seed(i % 4)
    return torch.randn(8, 32, generator=g).bfloat16(), torch.randn(8, 8, generator=g).bfloat16()


@pytest.mark.parametrize("optimizer,lr", [("flora", 0.02), ("flora-adamw", 3e-3)])
@pytest.mark.parametrize("accumulate", [1, 4])
def test_lean_turns_everything_on_and_trains(optimizer, lr, accumulate):
    model = _model()
    setup = lean_setup(model, optimizer, accumulate=accumulate, rank=4, lr=lr)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    group = setup.optimizer.param_groups[0]
    assert group["rounding"] == "stochastic" and group["moment_dtype"] is torch.bfloat16
    assert setup.accumulator.step_in_backward and setup.accumulator.compress == (accumulate > 1)
    assert "stochastic rounding" in str(setup) and "step-in-backward" in str(setup)
    losses = []
    for step in range(40):
        total = 0.0
        for micro in range(accumulate):
            x, y = _batch(step * accumulate + micro)
            with setup.accumulator.micro_batch():
                loss = (model(x).float() - y.float()).square().mean()
                (loss / accumulate).backward()
            total += loss.item() / accumulate
        assert all(p.grad is None for p in model.parameters())  # stepped inside backward
        losses.append(total)
    assert losses[-1] < 0.8 * losses[0]
    assert all(s["step"] == 40 for s in setup.optimizer.state.values())
    state = [v for s in setup.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(v.dtype == torch.bfloat16 for v in state if v.dim() > 0)
    assert setup.optimizer.state_bytes() == setup.optimizer.plan().state_bytes
    setup.accumulator.remove()


def test_lean_refuses_what_it_sets_and_bad_names():
    with pytest.raises(ValueError, match="rounding"):
        lean_setup(_model(), rounding="nearest")
    with pytest.raises(ValueError, match="optimizer"):
        lean_setup(_model(), "adamw")
    with pytest.raises(TypeError, match="optimizer"):
        lean_setup(_model(), torch.optim.AdamW)
    with pytest.raises(ValueError, match="accumulate"):
        lean_setup(_model(), accumulate=0)
    setup = lean_setup(_model(), flora.FloraLion, accumulate=2, rank=4)
    assert isinstance(setup.optimizer, flora.FloraLion)
    setup.accumulator.remove()


def test_step_in_backward_buffers_of_bf16_parameters_are_planned_in_float32():
    model = _model()
    setup = lean_setup(model, accumulate=3, rank=4)
    acc = setup.accumulator
    x, y = _batch(0)
    with acc.micro_batch():
        (model(x).float() - y.float()).square().mean().backward()
    assert acc.buffer_bytes() == acc.plan().state_bytes  # biases' sums are float32
    acc.remove()


def test_step_parameter_takes_a_float32_gradient_for_a_bf16_parameter():
    """step_parameter(p, grad=g32) on a bf16 weight is the float32 step rounded to bf16:
    a float32 copy stepped with g32 (state kept in float32 either way), rounded each step."""
    torch.manual_seed(0)
    w16 = torch.nn.Parameter(torch.randn(12, 10).bfloat16())
    w32 = torch.nn.Parameter(w16.detach().float())
    kw = {"lr": 0.05, "rank": 3, "kappa": 2, "rounding": "nearest"}
    opt16, opt32 = flora.Flora([("w", w16)], **kw), flora.Flora([("w", w32)], **kw)
    for step in range(5):
        g = torch.randn(12, 10, generator=torch.Generator().manual_seed(step))
        opt16.step_parameter(w16, grad=g)
        w32.grad = g
        opt32.step()
        with torch.no_grad():
            w32.copy_(w32.bfloat16().float())
        assert torch.equal(w16.float(), w32), step
    assert w16.grad is None
    for bad, err, match in [
        (torch.zeros(10, 12), ValueError, "shape"),
        (torch.zeros(12, 10, dtype=torch.float16), ValueError, "float32"),
        ([0.0], TypeError, "Tensor"),
    ]:
        with pytest.raises(err, match=match):
            opt16.step_parameter(w16, grad=bad)


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_a_consumed_gradient_gives_the_same_bits(monkeypatch, beta1):
    """step_parameter(p, grad=g, consume=True) forms Flora's update in g's memory, its
    factored second moment a block of rows at a time (here 2 rows: several blocks), and
    steps the bf16 weights, their state and the windows' bases bit for bit as without
    consume, which leaves g untouched; a 3-D weight is factored over its last two dims."""
    monkeypatch.setattr("flora.optim.adafactor.VARIANCE_BLOCK", 20)
    shapes = {"w": (12, 10), "conv": (3, 8, 10), "v": (7,)}
    init = {k: torch.randn(s, generator=torch.Generator().manual_seed(i)).bfloat16()
            for i, (k, s) in enumerate(shapes.items())}  # fmt: skip

    def run(consume):
        params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        kw = {"lr": 0.05, "rank": 2, "kappa": 2, "beta1": beta1}
        opt = flora.Flora(list(params.items()), rounding="stochastic", **kw)
        for step in range(5):
            for i, p in enumerate(params.values()):
                gen = torch.Generator().manual_seed(100 * step + i)
                g = torch.randn(p.shape, generator=gen)
                kept = g.clone()
                opt.step_parameter(p, grad=g, consume=consume)
                if not consume:
                    assert torch.equal(g, kept)
        return params, opt.state_dict()

    (ours, ours_sd), (theirs, theirs_sd) = run(True), run(False)
    for k in shapes:
        assert torch.equal(ours[k], theirs[k]), k
    for i, st in theirs_sd["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(ours_sd["state"][i][key]), torch.as_tensor(value))


def test_step_in_backward_hands_bf16_parameters_their_float32_estimate():
    seen = []

    class Recording(flora.Flora):
        def step_parameter(self, param, grad=None):
            seen.append(None if grad is None else grad.dtype)
            super().step_parameter(param, grad)

    model = _model()
    setup = lean_setup(model, Recording, accumulate=2, rank=4)
    for micro in range(2):
        x, y = _batch(micro)
        with setup.accumulator.micro_batch():
            (model(x).float() - y.float()).square().mean().backward()
    assert seen == [torch.float32] * 4  # two weights, two biases: no bf16 rounding between
    assert all(p.grad is None for p in model.parameters())
    setup.accumulator.remove()


# ---------------------------------------------------------------- tied weights (HF)
def _hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def test_route_shared_uses_reroutes_a_hugging_face_tied_head():
    """GPT-2's lm_head is the token embedding's weight: after route_shared_uses the logits are
    the same, and under an accumulator the embedding's own hook sees only the lookup's
    gradient while the buffer holds both uses' (to rounding)."""
    from flora.accumulation import route_shared_uses

    plain, routed = _hf_gpt2(), _hf_gpt2()
    assert routed.lm_head.weight is routed.transformer.wte.weight
    assert route_shared_uses(routed) == ["lm_head"]
    assert routed.routes_shared_gradients and route_shared_uses(routed) == []  # once
    idx = torch.randint(97, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(routed(idx).logits, plain(idx).logits)
    seen = {}
    grads = []

    def first_grad(name):
        def look(p):  # runs before the accumulator's hook; returns None
            seen.setdefault(name, p.grad)

        return look

    for name, model in (("plain", plain), ("routed", routed)):
        wte = model.transformer.wte.weight
        wte.register_post_accumulate_grad_hook(first_grad(name))
        acc = flora.GradientAccumulator(model, 2, rank=4, seed=3)
        for _ in range(2):
            with acc.micro_batch():
                (model(idx, labels=idx).loss / 2).backward()
        grads.append(wte.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen["plain"], seen["routed"], atol=1e-4)  # one use, not both


def test_route_shared_uses_refuses_holders_it_cannot_reroute():
    from flora.accumulation import route_shared_uses

    class Scale(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x * self.weight

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model.append(Scale(model[0].weight))
    with pytest.raises(TypeError, match=r"'2' \(Scale\)"):
        route_shared_uses(model)
    assert "forward" not in vars(model[1]) and not hasattr(model, "routes_shared_gradients")
    setup = flora.lean_setup(model, accumulate=2, rank=2, accumulate_rank=4)
    assert "tied weights held in backward" in str(setup)
    shared = torch.nn.Linear(4, 4)
    twice = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)  # a module used twice
    assert route_shared_uses(twice) == [] and not hasattr(twice, "routes_shared_gradients")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        route_shared_uses(shared.weight)


def test_lean_setup_routes_a_tied_head_and_says_so():
    model = _hf_gpt2()
    setup = flora.lean_setup(model, accumulate=2, rank=4)
    assert "tied weights' later uses routed apart (lm_head)" in str(setup)
    assert model.routes_shared_gradients
