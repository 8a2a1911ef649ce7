"""GradientAccumulator: limits, the float64 reference of Algorithm 1, unbiasedness, use with
real optimizers, step-in-backward, tied weights (tied_use), checkpoints, memory accounting and
bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch
from accumulation_models import TinyNet, loss_of, make_batches, make_model
from reference import compressed_accumulation, sketch_accumulation
from torch import nn

from flora import Flora, GradientAccumulator, parameter_key, projection_matrix
from flora.accumulation import tied_use
from flora.projection import sketch_sizes

TAU = 3


def plain_cycle(model, batches, steps=TAU):
    """Plain PyTorch accumulation: (loss / steps).backward() for each micro-batch."""
    for b in batches:
        (loss_of(model, b) / steps).backward()


def acc_cycle(model, acc, batches, steps=TAU, last_at=None):
    for i, b in enumerate(batches):
        with acc.micro_batch(last=last_at is not None and i == last_at):
            (loss_of(model, b) / steps).backward()


def grads_of(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- limits
@pytest.mark.parametrize("how", ["compress=False", "rank>=dims"])
@pytest.mark.parametrize("step_in_backward", [False, True])
def test_no_compression_equals_plain_accumulation_bitwise(how, step_in_backward):
    ref, model = make_model(), make_model()
    batches = make_batches(2 * TAU)
    kwargs = {"compress": False} if how == "compress=False" else {"rank": 64}
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    if step_in_backward:
        acc = GradientAccumulator(model, TAU, optimizer=opt, step_in_backward=True, **kwargs)
    else:
        acc = GradientAccumulator(model, TAU, **kwargs)
    assert acc.plan().compressed_count == 0
    for cycle in range(2):
        part = batches[cycle * TAU : (cycle + 1) * TAU]
        plain_cycle(ref, part)
        acc_cycle(model, acc, part)
        assert acc.sync_gradients
        if not step_in_backward:
            for (n, a), (_, b) in zip(
                ref.named_parameters(), model.named_parameters(), strict=True
            ):
                assert torch.equal(a.grad, b.grad), n
            opt.step()
            opt.zero_grad()
        opt_ref.step()
        opt_ref.zero_grad()
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mean_reduction_divides_by_the_cycle_length():
    ref, model = make_model(), make_model()
    batches = make_batches(TAU)
    plain_cycle(ref, batches)
    acc = GradientAccumulator(model, TAU, compress=False, reduction="mean")
    for b in batches:
        with acc.micro_batch():
            loss_of(model, b).backward()  # unscaled loss
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- reference (float64)
def hookless_copy(model):
    """The same weights in a model without the accumulator's hooks."""
    twin = make_model(dtype=next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    return twin


def micro_batch_grads(model, batches):
    """Per-micro-batch gradients of (loss / TAU), computed separately on a hook-free copy."""
    twin = hookless_copy(model)
    out = []
    for b in batches:
        twin.zero_grad()
        (loss_of(twin, b) / TAU).backward()
        out.append(grads_of(twin))
    return out


def reference_cycles(model, acc, cycles=2):
    """Run ``cycles`` accumulation cycles; after each yield ``(cycle, per-micro-batch
    gradients)`` with the accumulated ``.grad`` in place, then zero the gradients."""
    batches = make_batches(cycles * TAU)
    for cycle in range(cycles):
        part = batches[cycle * TAU : (cycle + 1) * TAU]
        per_batch = micro_batch_grads(model, part)
        acc_cycle(model, acc, part)
        yield cycle, per_batch
        model.zero_grad()


@pytest.mark.parametrize("side", ["auto", "left", "right"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_matches_float64_reference_of_algorithm_1(side, distribution):
    model = make_model(dtype=torch.float64)
    acc = GradientAccumulator(model, TAU, rank=4, seed=3, side=side, distribution=distribution)
    params = dict(model.named_parameters())
    for cycle, per_batch in reference_cycles(model, acc):
        for name, p in params.items():
            d = acc.decision(name)
            a = acc.projection(name, cycle)
            if d.compressed:  # the projection is the documented pure function of its keys
                independent = projection_matrix(
                    d.rank,
                    d.compressed_dim,
                    seed=3,
                    key=parameter_key(name),
                    window=cycle,
                    stream="accumulation",
                    distribution=distribution,
                    dtype=torch.float64,
                )
                assert torch.equal(a, independent), name
            expected = compressed_accumulation(
                [g[name] for g in per_batch], a, d.side if d.compressed else None
            )
            torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)
    # a fresh projection every cycle, and the head (dim 5 > rank 4) is compressed too
    assert not torch.equal(acc.projection("fc.weight", 0), acc.projection("fc.weight", 1))
    assert acc.decision("head.weight").compressed
    if side != "right":
        assert acc.decision("conv.weight").state_shape == (4, 36)


def test_reference_detects_a_wrong_projection():
    """The reference comparison is not vacuous: another cycle's projection fails it."""
    model = make_model(dtype=torch.float64)
    acc = GradientAccumulator(model, TAU, rank=4, distribution="gaussian")
    batches = make_batches(TAU)
    per_batch = micro_batch_grads(model, batches)
    acc_cycle(model, acc, batches)
    d = acc.decision("fc.weight")
    wrong = compressed_accumulation(
        [g["fc.weight"] for g in per_batch], acc.projection("fc.weight", 1), d.side
    )
    assert not torch.allclose(model.fc.weight.grad, wrong)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_unbiased_and_converges_at_the_theoretical_rate(distribution):
    """E[A^T A G] = G; the mean of N cycles has E||mean - G||^2 = c (dim) / (r N) ||G||^2
    with c(m) = m + 1 for Gaussian and m - 1 for Rademacher entries (left side, dim m)."""
    torch.manual_seed(5)
    m, n, rank, cycles = 24, 10, 4, 400
    target = torch.randn(m, n, dtype=torch.float64)
    weight = nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    acc = GradientAccumulator([("w", weight)], 1, rank=rank, side="left", distribution=distribution)
    running = torch.zeros_like(target)
    errors = {}
    for t in range(1, cycles + 1):
        with acc.micro_batch():
            (weight * target).sum().backward()  # gradient = target exactly
        running += weight.grad
        weight.grad = None
        if t in (25, 100, 400):
            errors[t] = float(((running / t - target) ** 2).sum() / (target**2).sum())
    c = m + 1 if distribution == "gaussian" else m - 1
    for t, err in errors.items():
        expected = c / (rank * t)
        assert 0.5 * expected < err < 2.0 * expected, (t, err, expected)
    assert errors[400] < errors[25] / 6  # ~ 1/N decay (16x in expectation)


# ---------------------------------------------------------------- with real optimizers
def expected_update(model, batches, acc_probe, make_opt, clip=None, cycles=2):
    """Apply ``make_opt`` to G-hat computed by the float64 reference, cycle by cycle."""
    ref = hookless_copy(model)
    opt = make_opt(ref)
    for cycle in range(cycles):
        part = batches[cycle * TAU : (cycle + 1) * TAU]
        per_batch = micro_batch_grads(ref, part)
        for name, p in ref.named_parameters():
            d = acc_probe.decision(name)
            a = acc_probe.projection(name, cycle)
            g = compressed_accumulation(
                [x[name] for x in per_batch], a, d.side if d.compressed else None
            )
            p.grad = g.to(p.dtype)
        if clip is not None:
            nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return ref


OPTIMIZERS = {
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False),
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "Adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2, foreach=False),
    "Flora": lambda m: Flora(m.named_parameters(), lr=1e-2, rank=4, kappa=2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 0.05])
def test_trains_with_any_optimizer_and_clipping(name, clip):
    model = make_model(dtype=torch.float64)
    batches = make_batches(2 * TAU)
    acc = GradientAccumulator(model, TAU, rank=4, distribution="gaussian", seed=1)
    expected = expected_update(model, batches, acc, OPTIMIZERS[name], clip)
    opt = OPTIMIZERS[name](model)
    norms = []
    for cycle in range(2):
        acc_cycle(model, acc, batches[cycle * TAU : (cycle + 1) * TAU])
        if clip is not None:
            norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
    for a, b in zip(expected.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if clip is not None:
        assert all(n > clip for n in norms)  # clipping was active


def test_gradscaler_equals_unscaled_and_skips_overflow():
    batches = make_batches(2 * TAU)
    plain, scaled = make_model(), make_model()
    acc_p = GradientAccumulator(plain, TAU, rank=4)
    acc_s = GradientAccumulator(scaled, TAU, rank=4)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-2, foreach=False)
    opt_s = torch.optim.AdamW(scaled.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for cycle in range(2):
        part = batches[cycle * TAU : (cycle + 1) * TAU]
        acc_cycle(plain, acc_p, part)
        opt_p.step()
        opt_p.zero_grad()
        for b in part:
            with acc_s.micro_batch():
                scaler.scale(loss_of(scaled, b) / TAU).backward()
        scaler.step(opt_s)
        scaler.update()
        opt_s.zero_grad()
    # power-of-two scaling commutes with compression: bitwise equal
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a, b)
    # an overflow in one micro-batch poisons G-hat: the step is skipped, the scale halves
    before = [p.clone() for p in scaled.parameters()]
    scale = scaler.get_scale()
    for i, b in enumerate(batches[:TAU]):
        with acc_s.micro_batch():
            loss = loss_of(scaled, b) / TAU
            scaler.scale(loss * (math.inf if i == 1 else 1.0)).backward()
    scaler.step(opt_s)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    for a, b in zip(before, scaled.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["last=True", "finish_cycle()"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_early_ended_cycle(how, reduction):
    model = make_model(dtype=torch.float64)
    acc = GradientAccumulator(model, 4, rank=4, distribution="gaussian", reduction=reduction)
    batches = make_batches(2)
    per_batch = micro_batch_grads(model, batches)
    for i, b in enumerate(batches):
        with acc.micro_batch(last=how == "last=True" and i == 1):
            (loss_of(model, b) / TAU).backward()
    if how == "finish_cycle()":
        assert not acc.sync_gradients and acc.position == 2
        acc.finish_cycle()
    assert acc.sync_gradients and acc.cycle == 1 and acc.position == 0
    scale = 0.5 if reduction == "mean" else 1.0
    for name, p in model.named_parameters():
        d = acc.decision(name)
        expected = compressed_accumulation(
            [g[name] for g in per_batch],
            acc.projection(name, 0),
            d.side if d.compressed else None,
            scale=scale,
        )
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)


def test_full_size_gradients_are_freed_during_the_cycle():
    model = make_model()
    acc = GradientAccumulator(model, TAU, rank=4)
    for i, b in enumerate(make_batches(TAU)):
        with acc.micro_batch():
            (loss_of(model, b) / TAU).backward()
        if i < TAU - 1:
            for name, p in model.named_parameters():
                assert (p.grad is None) == acc.decision(name).compressed, name
    assert all(p.grad is not None for p in model.parameters())


def test_unused_parameter_keeps_no_gradient():
    model = make_model()
    extra = nn.Linear(30, 30)
    model.extra = extra  # never used in forward
    acc = GradientAccumulator(model, TAU, rank=4)
    acc_cycle(model, acc, make_batches(TAU))
    assert extra.weight.grad is None and extra.bias.grad is None
    assert model.fc.weight.grad is not None


def test_bf16_parameters_keep_float32_buffers():
    model = make_model(dtype=torch.bfloat16)
    acc = GradientAccumulator(model, TAU, rank=4)
    batches = make_batches(TAU)
    with acc.micro_batch():
        (loss_of(model, batches[0]) / TAU).backward()
    plan = acc.plan()
    row = next(r for r in plan.rows if r.name == "fc.weight")
    assert row.state_bytes == 24 * 4 * 4  # (m, r) = (24, 4) in float32
    assert row.uncompressed_bytes == 24 * 16 * 2
    assert acc.buffer_bytes() == plan.state_bytes
    for b in batches[1:]:
        with acc.micro_batch():
            (loss_of(model, b) / TAU).backward()
    assert model.fc.weight.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- step in backward
def run_step_in_backward(model, opt, batches, cycles, *, sched=None, **kwargs):
    acc = GradientAccumulator(
        model, TAU, rank=4, seed=1, optimizer=opt, step_in_backward=True, **kwargs
    )
    norms = []
    for cycle in range(cycles):
        acc_cycle(model, acc, batches[cycle * TAU : (cycle + 1) * TAU])
        assert acc.sync_gradients
        assert all(p.grad is None for p in model.parameters())
        norms.append(float(acc.last_grad_norm))
        if sched is not None:
            sched.step()
    return acc, norms


def run_ordinary(model, opt, batches, cycles, *, sched=None, clip_each=None):
    acc = GradientAccumulator(model, TAU, rank=4, seed=1)
    norms = []
    for cycle in range(cycles):
        acc_cycle(model, acc, batches[cycle * TAU : (cycle + 1) * TAU])
        norms.append(float(nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        if clip_each is not None:
            for p in model.parameters():
                nn.utils.clip_grad_norm_([p], clip_each)
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return acc, norms


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Flora"])
def test_step_in_backward_equals_ordinary_path(name):
    batches = make_batches(3 * TAU)
    a, b = make_model(), make_model()
    opt_a, opt_b = OPTIMIZERS[name](a), OPTIMIZERS[name](b)
    decay = lambda step: 0.5**step  # noqa: E731
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, decay)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, decay)
    _, norms_a = run_ordinary(a, opt_a, batches, 3, sched=sched_a)
    _, norms_b = run_step_in_backward(b, opt_b, batches, 3, sched=sched_b)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)
    # last_grad_norm is the true global norm of the decompressed gradient
    for x, y in zip(norms_a, norms_b, strict=True):
        assert math.isclose(x, y, rel_tol=1e-5)


def test_step_in_backward_uses_scheduled_lr():
    model = make_model()
    before = [p.clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0 from the start
    run_step_in_backward(model, opt, make_batches(TAU), 1, sched=sched)
    for x, y in zip(before, model.parameters(), strict=True):
        assert torch.equal(x, y)


def test_step_in_backward_per_parameter_clipping():
    batches = make_batches(2 * TAU)
    a, b = make_model(), make_model()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    run_ordinary(a, opt_a, batches, 2, clip_each=0.01)
    run_step_in_backward(b, opt_b, batches, 2, max_param_grad_norm=0.01)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_step_in_backward_holds_one_gradient_at_a_time():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    live = []
    opt.register_step_post_hook(
        lambda *_: live.append(sum(p.grad is not None for p in model.parameters()))
    )
    run_step_in_backward(model, opt, make_batches(2 * TAU), 2)
    n = len(list(model.parameters()))
    assert live == [1] * (2 * n)  # one step per parameter per cycle, one gradient alive


class TiedNet(nn.Module):
    """An embedding whose weight is also the output head. ``route``: the second use goes
    through tied_use; ``reverse``: the routed use is the lookup (its gradient arrives after
    the head's, which then reaches the parameter's hook first)."""

    def __init__(self, route: bool, reverse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 12)
        self.mid = nn.Linear(12, 12)
        self.head = nn.Linear(12, 40, bias=False)
        self.head.weight = self.emb.weight
        self.route, self.reverse = route, reverse

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.emb.weight
        routed = tied_use(w) if self.route else w
        lookup, head = (routed, w) if self.reverse else (w, routed)
        h = torch.tanh(self.mid(nn.functional.embedding(idx, lookup)))
        return nn.functional.linear(h, head)


def tied_loss(model, batch):
    idx, _ = batch
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 40), idx[:, 1:].reshape(-1))


@pytest.mark.parametrize("distribution", ["gaussian", "sketch"])
@pytest.mark.parametrize("step_in_backward", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_tied_use_takes_each_use_into_the_buffer(distribution, step_in_backward, reverse):
    """The tied weight's uses, compressed one by one as they arrive, give the gradient (and
    the step) of compressing their sum, to rounding; the parameter's own hook saw one use."""
    batches = make_batches(2 * TAU)
    models = [TiedNet(route=True, reverse=reverse), TiedNet(route=False)]
    seen = {0: [], 1: []}
    for i, m in enumerate(models):  # registered first: runs before the accumulator's hook
        m.emb.weight.register_post_accumulate_grad_hook(lambda p, i=i: seen[i].append(p.grad))
    results = []
    for m in models:
        opt = torch.optim.SGD(m.parameters(), lr=0.5) if step_in_backward else None
        acc = GradientAccumulator(
            m, TAU, rank=4, seed=3, distribution=distribution, optimizer=opt,
            step_in_backward=step_in_backward,
        )  # fmt: skip
        assert acc.decision("emb.weight").compressed
        grads = []
        for cycle in range(2):
            for b in batches[cycle * TAU : (cycle + 1) * TAU]:
                with acc.micro_batch():
                    (tied_loss(m, b) / TAU).backward()
            if not step_in_backward:
                grads.append(m.emb.weight.grad.clone())
                m.zero_grad()
        results.append(grads if not step_in_backward else [m.emb.weight.detach().clone()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))
    assert len(seen[0]) == len(seen[1]) == 2 * TAU  # one hook per backward, either way
    for part, whole in zip(*seen.values(), strict=True):
        assert not torch.allclose(part, whole, atol=1e-4)  # the routed hook saw one use only


def test_a_hook_that_returns_a_value_is_named():
    model = make_model()
    model.fc.weight.register_post_accumulate_grad_hook(lambda p: p.grad)  # returns a tensor
    acc = GradientAccumulator(model, TAU, rank=4)
    with pytest.raises(RuntimeError, match="returned a value instead of None"):
        acc_cycle(model, acc, make_batches(1))


def test_tied_use_is_the_weight_itself_unless_routed():
    model = TiedNet(route=True)
    w = model.emb.weight
    assert tied_use(w) is w  # no accumulator
    plain = GradientAccumulator(model, TAU, rank=4, compress=False)
    assert tied_use(w) is w  # nothing to route: plain accumulation in p.grad
    plain.remove()
    acc = GradientAccumulator(model, TAU, rank=4)
    alias = tied_use(w)
    assert alias is not w and alias.is_leaf and alias.requires_grad
    assert alias.data_ptr() == w.data_ptr()  # the same storage, no copy
    with torch.no_grad():
        assert tied_use(w) is w
    acc.remove()
    assert tied_use(w) is w


def test_tied_use_after_the_parameter_was_stepped_is_refused():
    """Reverse order, parameters listed once: the accumulator cannot know the weight is
    shared, steps it in its hook, and then refuses the late gradient by name."""
    model = TiedNet(route=True, reverse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(
        list(model.named_parameters()), 1, rank=4, optimizer=opt, step_in_backward=True
    )
    refused = pytest.raises(RuntimeError, match=r"tied_use.*emb\.weight.*after it was stepped")
    with refused, acc.micro_batch():
        tied_loss(model, make_batches(1)[0]).backward()


@pytest.mark.parametrize("opt_cls", ["Flora", "FloraAdamW"])
def test_step_in_backward_is_linear_in_the_parameters(opt_cls):
    """Flora's optimizers are stepped per parameter through step_parameter: the parameter
    list is walked a constant number of times per cycle (once by the closing step()), not
    once per parameter; step hooks see one step per cycle."""
    import flora

    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(12)])  # 24 parameters
    opt = getattr(flora, opt_cls)(model.named_parameters(), rank=2)
    walked, hooks = [0], []
    original = opt._named_params

    def counting():
        for item in original():
            walked[0] += 1
            yield item

    opt._named_params = counting
    opt.register_step_post_hook(lambda *_: hooks.append(1))
    acc = GradientAccumulator(
        model, 2, rank=2, distribution="gaussian", optimizer=opt, step_in_backward=True
    )
    for _ in range(2):
        for _ in range(2):
            with acc.micro_batch():
                model(torch.randn(3, 6)).square().mean().backward()
    n = len(list(model.parameters()))
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())
    assert hooks == [1, 1]
    assert walked[0] <= 2 * 2 * n  # quadratic would be >= 2 * n * n = 1152


def test_step_parameter_equals_a_step_with_one_gradient():
    import flora

    a, b = make_model(), make_model()
    opt_a = flora.Flora(a.named_parameters(), rank=4)
    opt_b = flora.Flora(b.named_parameters(), rank=4)
    loss_of(a, make_batches(1)[0]).backward()
    loss_of(b, make_batches(1)[0]).backward()
    for p in list(a.parameters())[1:]:
        p.grad = None
    opt_a.step()
    first = next(iter(b.parameters()))
    opt_b.step_parameter(first)
    assert torch.equal(next(iter(a.parameters())), first)
    assert all(len(opt_b.state[p]) == 0 for p in list(b.parameters())[1:])
    with pytest.raises(ValueError, match="not optimized"):
        opt_b.step_parameter(nn.Parameter(torch.zeros(2)))


def test_step_in_backward_steps_parameters_unused_in_the_last_micro_batch():
    class Gated(TinyNet):
        use_head = True

        def forward(self, idx):
            out = super().forward(idx)
            return out if self.use_head else out.detach() * 0 + self.norm.bias.sum()

    torch.manual_seed(0)
    model = Gated()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(model, 2, rank=4, optimizer=opt, step_in_backward=True)
    head = model.head.weight.clone()
    batches = make_batches(2)
    with acc.micro_batch():
        loss_of(model, batches[0]).backward()
    model.use_head = False  # the head gets no gradient in the last micro-batch
    with acc.micro_batch():
        loss_of(model, batches[1]).backward()
    assert acc.sync_gradients
    assert not torch.equal(head, model.head.weight)  # stepped at the end of the cycle


# ---------------------------------------------------------------- checkpoints
def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("distribution", ["gaussian", "gradient", "sketch"])
@pytest.mark.parametrize("step_in_backward", [False, True])
@pytest.mark.parametrize("stop_at", [1, 2, 3, 5])
def test_mid_cycle_checkpoint_resumes_bit_identically(step_in_backward, stop_at, distribution):
    batches = make_batches(3 * TAU)
    rank = 6  # head.weight (dim 5) stays uncompressed: its partial p.grad is saved too

    def build(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        kw = {"optimizer": opt, "step_in_backward": True} if step_in_backward else {}
        return opt, GradientAccumulator(model, TAU, rank=rank, distribution=distribution, **kw)

    def run(model, opt, acc, part):
        for b in part:
            with acc.micro_batch():
                (loss_of(model, b) / TAU).backward()
            if acc.sync_gradients and not step_in_backward:
                opt.step()
                opt.zero_grad()

    ref = make_model()
    opt_ref, acc_ref = build(ref)
    run(ref, opt_ref, acc_ref, batches)

    first = make_model()
    opt1, acc1 = build(first)
    run(first, opt1, acc1, batches[:stop_at])
    assert acc1.position == stop_at % TAU
    checkpoint = save_load(
        {"model": first.state_dict(), "opt": opt1.state_dict(), "acc": acc1.state_dict()}
    )
    resumed = make_model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    opt2, acc2 = build(resumed)
    opt2.load_state_dict(checkpoint["opt"])
    acc2.load_state_dict(checkpoint["acc"])
    assert (acc2.cycle, acc2.position) == (acc1.cycle, acc1.position)
    run(resumed, opt2, acc2, batches[stop_at:])
    for x, y in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(x, y)


def test_load_state_dict_rejects_other_settings():
    model = make_model()
    acc = GradientAccumulator(model, TAU, rank=4)
    with acc.micro_batch():
        loss_of(model, make_batches(1)[0]).backward()
    state = acc.state_dict()
    with pytest.raises(ValueError, match="rank=4"):
        GradientAccumulator(make_model(), TAU, rank=8).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        GradientAccumulator(make_model(), TAU, rank=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        acc.load_state_dict({"cycle": 0})


def test_a_refused_state_leaves_the_accumulator_unchanged():
    """A (1, 2) buffer used to be broadcast into every row, and a failed load left the
    accumulator half-loaded (cycle and position changed, buffers zeroed)."""
    model = make_model()
    acc = GradientAccumulator(model, TAU, rank=4)
    batches = make_batches(2)
    with acc.micro_batch():
        loss_of(model, batches[0]).backward()
    good = acc.state_dict()
    name = next(iter(good["buffers"]))
    for bad_value in (torch.ones(1, 2), torch.ones(1, good["buffers"][name].shape[1])):
        bad = {**good, "cycle": 5, "buffers": {**good["buffers"], name: bad_value}}
        with pytest.raises(ValueError, match=rf"buffer of '{name}' has shape"):
            acc.load_state_dict(bad)
    for bad, match in [
        ({**good, "position": -1}, "position"),
        ({**good, "seen": ["nope"]}, "lacks: \\['nope'\\]"),
        ({**good, "buffers": {}}, "missing or not a float tensor"),
        ({**good, "grads": {"norm.weight": torch.ones(3)}}, "norm.weight' has shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            acc.load_state_dict(bad)
    assert (acc.cycle, acc.position) == (0, 1)
    after = acc.state_dict()
    for key, value in good["buffers"].items():
        assert torch.equal(after["buffers"][key], value)
    with acc.micro_batch():  # and the cycle goes on
        loss_of(model, batches[1]).backward()


def test_micro_batch_after_remove_raises():
    model = make_model()
    acc = GradientAccumulator(model, TAU, rank=4, reduction="mean")
    acc.remove()
    with pytest.raises(RuntimeError, match=r"micro_batch\(\) after remove\(\)"), acc.micro_batch():
        pass
    with pytest.raises(RuntimeError, match="after remove"):
        acc.finish_cycle()


def test_duplicate_names_and_unmatched_patterns():
    enc, dec = nn.Linear(16, 12), nn.Linear(16, 12)
    with pytest.raises(ValueError, match="'bias', 'weight' occur more than once"):
        GradientAccumulator(list(enc.named_parameters()) + list(dec.named_parameters()), TAU)
    tied = [*enc.named_parameters(), ("again", enc.weight)]  # one tensor twice: fine
    GradientAccumulator(tied, TAU, rank=4)
    with pytest.warns(UserWarning, match=r"\['lm_head'\] match no parameter"):
        GradientAccumulator(make_model(), TAU, rank=4, exclude=["lm_head"])


# ---------------------------------------------------------------- memory
def test_buffer_bytes_are_exact_and_sublinear():
    model = make_model()
    acc = GradientAccumulator(model, TAU, rank=4)
    plan = acc.plan()
    expected = {
        "emb.weight": 40 * 4,  # right: (m, r)
        "conv.weight": 4 * 36,  # left: (r, n)
        "fc.weight": 24 * 4,
        "head.weight": 4 * 24,
    }
    vectors = 0
    for row in plan.rows:
        if row.name in expected:
            assert row.compressed and row.state_bytes == expected[row.name] * 4, row.name
            m = row.shape[0]
            n = math.prod(row.shape[1:])
            assert row.state_bytes * min(m, n) == 4 * row.uncompressed_bytes  # r / min(m, n)
        else:
            assert not row.compressed and row.state_bytes == row.uncompressed_bytes
            vectors += row.state_bytes
    assert plan.state_bytes == sum(expected.values()) * 4 + vectors
    assert acc.buffer_bytes() == 0  # nothing held between cycles
    for i, b in enumerate(make_batches(TAU)):
        with acc.micro_batch():
            (loss_of(model, b) / TAU).backward()
        if i < TAU - 1:
            assert acc.buffer_bytes() == plan.state_bytes
    assert acc.buffer_bytes() == 0
    mem = acc.memory()
    assert mem.buffer_bytes == plan.state_bytes
    assert mem.naive_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert mem.cuda_peak_bytes is None
    assert "total accumulation" in str(plan)


def test_projection_cache_is_reported_and_changes_nothing():
    a, b = make_model(), make_model()
    batches = make_batches(2 * TAU)
    acc_a = GradientAccumulator(a, TAU, rank=4, distribution="gaussian")
    acc_b = GradientAccumulator(b, TAU, rank=4, distribution="gaussian", cache_projection=True)
    for cycle in range(2):
        part = batches[cycle * TAU : (cycle + 1) * TAU]
        acc_cycle(a, acc_a, part)
        acc_cycle(b, acc_b, part)
        for x, y in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(x.grad, y.grad)
    assert acc_b.plan().projection_cache_bytes == 4 * (12 + 16 + 16 + 5) * 4
    assert acc_a.plan().projection_cache_bytes == 0


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 2.0}, TypeError, "steps"),
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": "8"}, TypeError, "rank"),
        ({"seed": -1}, ValueError, "seed"),
        ({"compress": 1}, TypeError, "compress"),
        ({"side": "top"}, ValueError, "side"),
        ({"distribution": "uniform"}, ValueError, "distribution"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"exclude": "("}, ValueError, "exclude"),
        ({"step_in_backward": True}, ValueError, "optimizer"),
        ({"max_param_grad_norm": 1.0}, ValueError, "max_param_grad_norm"),
        ({"optimizer": "adam"}, TypeError, "optimizer"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"steps": TAU, **kwargs}
    with pytest.raises(error, match=match):
        GradientAccumulator(make_model(), **kwargs)


def test_bad_params_and_usage():
    model = make_model()
    with pytest.raises(ValueError, match="exclude"):
        GradientAccumulator(list(model.parameters()), TAU, exclude="emb")
    with pytest.raises(TypeError, match="params"):
        GradientAccumulator(model.fc.weight, TAU)
    with pytest.raises(ValueError, match="empty"):
        GradientAccumulator([], TAU)
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="never be stepped"):
        GradientAccumulator(model, TAU, optimizer=opt, step_in_backward=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer is only used"):
        GradientAccumulator(model, TAU, optimizer=opt)
    with pytest.raises(ValueError, match="max_param_grad_norm"):
        GradientAccumulator(
            model, TAU, optimizer=opt, step_in_backward=True, max_param_grad_norm=-1.0
        )

    acc = GradientAccumulator(model, TAU, rank=4)
    b = make_batches(1)[0]
    with pytest.raises(RuntimeError, match="outside"):
        loss_of(model, b).backward()
    model.zero_grad()
    with pytest.raises(RuntimeError, match="no micro-batch"):
        acc.finish_cycle()
    with acc.micro_batch(), pytest.raises(RuntimeError, match="nested"):  # noqa: SIM117
        with acc.micro_batch():
            pass
    with pytest.raises(TypeError, match="last"), acc.micro_batch(last=1):
        pass
    acc.remove()
    loss_of(model, b).backward()  # plain PyTorch again
    assert model.fc.weight.grad is not None


def test_repr_and_exclude():
    model = make_model()
    acc = GradientAccumulator(model, TAU, rank=4, exclude=r"^emb\.")
    assert not acc.decision("emb.weight").compressed
    assert "excluded" in acc.decision("emb.weight").reason
    assert "GradientAccumulator(steps=3, rank=4, compressed=3/9" in repr(acc)


# ---------------------------------------------------------------- the true-norm estimate
@pytest.mark.parametrize("distribution", ["gaussian", "orthonormal", "sketch"])
def test_grad_norm_estimates_the_true_norm_where_the_decompressed_one_is_inflated(distribution):
    """Over many cycles (a fresh projection each) the mean of grad_norm**2 is the true
    accumulated gradient's squared norm; the decompressed gradient's is ~(1 + (d+1)/r) x."""
    model = make_model()
    batches = make_batches(TAU)
    plain_cycle(model, batches)
    true_sq = sum(float(p.grad.double().square().sum()) for p in model.parameters())
    model.zero_grad()
    rank = 4 if distribution == "sketch" else 2  # (the sketch needs rank >= 4 here)
    acc = GradientAccumulator(model, TAU, rank=rank, distribution=distribution)
    est_sq, dec_sq = [], []
    for _ in range(300):  # the same micro-batches every cycle: only the projection changes
        acc_cycle(model, acc, batches)
        est_sq.append(float(acc.grad_norm) ** 2)
        dec_sq.append(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
        model.zero_grad()
    mean_est = sum(est_sq) / len(est_sq)
    assert abs(mean_est / true_sq - 1) < 0.1  # unbiased (seeded: the same draws every run)
    if distribution == "sketch":  # a low-rank approximation: about the true norm (1.03 x)
        assert sum(dec_sq) / len(dec_sq) / true_sq < 1.5
    else:
        assert sum(dec_sq) / len(dec_sq) / true_sq > 2.0  # rank 2 of dims 12-16: inflated


def test_max_grad_norm_clips_with_the_estimate():
    model, ref = make_model(), make_model()
    batches = make_batches(TAU)
    acc = GradientAccumulator(model, TAU, rank=2, distribution="gaussian", max_grad_norm=0.01)
    free = GradientAccumulator(
        ref, TAU, rank=2, distribution="gaussian"
    )  # the same projections, no clipping
    acc_cycle(model, acc, batches)
    acc_cycle(ref, free, batches)
    coef = 0.01 / (float(free.grad_norm) + 1e-6)
    assert coef < 1 and float(acc.grad_norm) == float(free.grad_norm)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad * coef, rtol=1e-5, atol=1e-9)
    big = GradientAccumulator(
        make_model(), TAU, rank=2, distribution="gaussian", max_grad_norm=1e9
    )  # no-op when above
    assert big.max_grad_norm == 1e9


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0"),
        (dict(max_grad_norm="1"), TypeError, "max_grad_norm must be a number"),
        (dict(max_grad_norm=True), TypeError, "max_grad_norm must be a number"),
    ],
)
def test_max_grad_norm_bad_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        GradientAccumulator(make_model(), TAU, rank=2, **kwargs)


def test_max_grad_norm_is_refused_with_step_in_backward():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm needs every gradient"):
        GradientAccumulator(model, TAU, rank=2, optimizer=opt, step_in_backward=True,
                            max_grad_norm=1.0)  # fmt: skip


def test_a_state_from_before_generator_v2_decodes_with_v1():
    """A state_dict without 'generator' was written with the first projection generator:
    the accumulator keeps using it, so a resumed cycle decodes its buffers as written."""
    from flora.projection import projection_matrix

    model = make_model()
    acc = GradientAccumulator(model, TAU, rank=4, distribution="gaussian")
    with acc.micro_batch():
        loss_of(model, make_batches(1)[0]).backward()
    state = acc.state_dict()
    assert state["generator"] == 2
    old = {k: v for k, v in state.items() if k != "generator"}
    other = make_model()
    resumed = GradientAccumulator(other, TAU, rank=4, distribution="gaussian")
    resumed.load_state_dict(old)
    assert resumed.generator == 1
    p = next(p for p in other.parameters() if resumed.projection(p) is not None)
    rows, dim = resumed.projection(p).shape
    slot = resumed._slot(p)
    expected = projection_matrix(rows, dim, seed=0, key=slot.key, window=0,
                                 stream="accumulation", generator=1)  # fmt: skip
    assert torch.equal(resumed.projection(p), expected)
    with pytest.raises(ValueError, match="generator"):
        GradientAccumulator(make_model(), TAU, rank=4, distribution="gaussian").load_state_dict(
            {**state, "generator": 3}
        )


def test_gradient_basis_projects_the_sum_onto_the_first_gradients_subspace():
    """distribution="gradient": G-hat = Pi sum(G_i), Pi the projector onto the range finder's
    basis of the cycle's first gradient (float64, to 1e-12); the norm estimate is G-hat's."""
    from flora.projection import range_basis

    model = make_model(dtype=torch.float64)
    acc = GradientAccumulator(model, TAU, rank=4, seed=3, distribution="gradient")
    batches = make_batches(2 * TAU)
    params = dict(model.named_parameters())
    for cycle in range(2):
        part = batches[cycle * TAU : (cycle + 1) * TAU]
        per_batch = micro_batch_grads(model, part)
        bases = {}
        for i, b in enumerate(part):
            with acc.micro_batch():
                (loss_of(model, b) / TAU).backward()
            if i == 0:
                bases = {n: acc.projection(n) for n in params if acc.decision(n).compressed}
        with pytest.raises(ValueError, match="current cycle"):
            acc.projection("fc.weight")
        sq = 0.0
        for name, p in params.items():
            d = acc.decision(name)
            total = sum(g[name] for g in per_batch)
            if not d.compressed:
                expected = total
            else:
                first = per_batch[0][name].reshape(d.matrix_shape)
                basis = range_basis(first, d.rank, d.side, seed=3, key=parameter_key(name),
                                    window=cycle, stream="accumulation")  # fmt: skip
                assert torch.equal(bases[name], basis), name
                pi = (d.rank / d.compressed_dim) * basis.T @ basis
                flat = total.reshape(d.matrix_shape)
                expected = (pi @ flat if d.side == "left" else flat @ pi).reshape(p.shape)
            torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)
            sq += float(p.grad.square().sum())
        torch.testing.assert_close(acc.grad_norm.double(), torch.tensor(sq).sqrt().double())
        model.zero_grad()


def test_gradient_basis_bytes_and_refusals():
    model = make_model()
    acc = GradientAccumulator(model, TAU, rank=4, distribution="gradient")
    with acc.micro_batch():
        loss_of(model, make_batches(1)[0]).backward()
    plan = acc.plan()
    assert acc.buffer_bytes() == plan.state_bytes
    seeded = GradientAccumulator(make_model(), TAU, rank=4)
    basis = sum(
        4 * d.rank * d.compressed_dim
        for d in (acc.decision(n) for n, _ in model.named_parameters())
        if d.compressed
    )
    assert plan.state_bytes == seeded.plan().state_bytes + basis
    with pytest.raises(ValueError, match="cache_projection"):
        GradientAccumulator(make_model(), TAU, distribution="gradient", cache_projection=True)
    state = acc.state_dict()
    del state["bases"]["fc.weight"]
    with pytest.raises(ValueError, match="bases"):
        GradientAccumulator(make_model(), TAU, rank=4, distribution="gradient").load_state_dict(
            state
        )


# ---------------------------------------------------------------- the low-rank sketch
def sketch_test_matrices(acc, name, cycle, seed, dtype=torch.float64):
    """Omega (k, d) and Psi (l, o): the documented pure functions of the keys."""
    d = acc.decision(name)
    kept = d.kept_dim
    assert kept * d.rank == math.prod(d.state_shape)
    k, l_ = sketch_sizes(d.rank, kept, d.compressed_dim)
    common = {"seed": seed, "key": parameter_key(name), "window": cycle, "dtype": dtype}
    omega = projection_matrix(k, d.compressed_dim, stream="accumulation/range", **common)
    psi = projection_matrix(l_, kept, stream="accumulation/co-range", **common)
    return omega, psi


@pytest.mark.parametrize(("side", "rank"), [("auto", 8), ("left", 12)])
def test_sketch_matches_float64_reference(side, rank):
    """distribution="sketch": G-hat is the rank-k matrix the two sketches of the cycle's sum
    determine, computed by the reference in another form (Y (Psi Y)^+ W), to 1e-10."""
    model = make_model(dtype=torch.float64)
    acc = GradientAccumulator(model, TAU, rank=rank, seed=3, side=side, distribution="sketch")
    params = dict(model.named_parameters())
    for cycle, per_batch in reference_cycles(model, acc):
        for name, p in params.items():
            d = acc.decision(name)
            if d.compressed:
                omega, psi = sketch_test_matrices(acc, name, cycle, seed=3)
                expected = sketch_accumulation([g[name] for g in per_batch], omega, psi, d.side)
            else:
                expected = sum(g[name] for g in per_batch)
            torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-12)
    assert acc.decision("fc.weight").compressed and acc.decision("emb.weight").compressed
    with pytest.raises(ValueError, match="two test matrices"):
        acc.projection("fc.weight")


def test_sketch_is_exact_on_low_rank_gradients_and_beats_a_projection_on_decaying_ones():
    torch.manual_seed(0)
    m, n, rank = 60, 40, 16  # k = 6 (right side: kept 60, dim 40)
    weight = nn.Parameter(torch.zeros(m, n, dtype=torch.float64))

    def decompressed(grads, distribution, cycle=0):
        acc = GradientAccumulator([("w", weight)], len(grads), rank=rank, distribution=distribution)
        acc.cycle = cycle
        for g in grads:
            with acc.micro_batch():
                (weight * g).sum().backward()  # a real backward pass whose gradient is g
        acc.remove()  # the next call's accumulator alone hooks the weight
        out = weight.grad
        weight.grad = None
        return out

    u, v = torch.randn(m, 5, dtype=torch.float64), torch.randn(5, n, dtype=torch.float64)
    low = [u @ torch.diag(torch.randn(5, dtype=torch.float64)) @ v for _ in range(4)]
    torch.testing.assert_close(decompressed(low, "sketch"), sum(low), rtol=1e-9, atol=1e-9)
    # a decaying spectrum (singular values 0.7^j): the sketch's error is a fraction of the
    # Gaussian projection's, on average over cycles (200 draws: mean 0.36, 95th percentile
    # 0.53 with these sizes; the projection's mean 1.4)
    q1 = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    decaying = [q1 @ torch.diag(0.7 ** torch.arange(n, dtype=torch.float64)) @ q2.T]
    target = decaying[0]
    err = {
        dist: [
            float((decompressed(decaying, dist, cycle) - target).norm() / target.norm())
            for cycle in range(16)
        ]
        for dist in ("sketch", "gaussian")
    }
    first = {dist: e[:4] for dist, e in err.items()}  # these draws, cycle by cycle
    assert max(first["sketch"]) < 0.5 < 1.0 < min(first["gaussian"]), err  # best rank 6: 0.12
    assert sum(first["sketch"]) < 0.35 * sum(first["gaussian"]), err
    mean = {dist: sum(e) / len(e) for dist, e in err.items()}
    assert mean["sketch"] < 0.5 < 1.0 < mean["gaussian"], err
    assert mean["sketch"] < 0.35 * mean["gaussian"], err


def test_sketch_bytes_cache_and_refusals(monkeypatch):
    model = make_model()
    sketch = GradientAccumulator(model, TAU, rank=8, distribution="sketch")
    seeded = GradientAccumulator(make_model(), TAU, rank=8)
    assert sketch.plan().state_bytes == seeded.plan().state_bytes  # the same buffers
    for i, b in enumerate(make_batches(TAU)):
        with sketch.micro_batch():
            (loss_of(model, b) / TAU).backward()
        if i < TAU - 1:
            assert sketch.buffer_bytes() == sketch.plan().state_bytes
    # cached test matrices: identical gradients, their bytes in the plan
    a, b = make_model(), make_model()
    acc_a = GradientAccumulator(a, TAU, rank=8, distribution="sketch")
    acc_b = GradientAccumulator(b, TAU, rank=8, distribution="sketch", cache_projection=True)
    batches = make_batches(2 * TAU)
    for cycle in range(2):
        part = batches[cycle * TAU : (cycle + 1) * TAU]
        acc_cycle(a, acc_a, part)
        acc_cycle(b, acc_b, part)
        for x, y in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(x.grad, y.grad)
        a.zero_grad()
        b.zero_grad()
    # uncached, the reconstruction draws Psi alone: the range's Omega only while compressing
    import flora.accumulation as accumulation

    drawn = []

    def record(*args, stream, **kwargs):
        drawn.append(stream.rsplit("/", 1)[1])
        return projection_matrix(*args, stream=stream, **kwargs)

    monkeypatch.setattr(accumulation, "projection_matrix", record)
    for i, batch in enumerate(batches[:TAU]):
        with acc_a.micro_batch():
            (loss_of(a, batch) / TAU).backward()
        if i == TAU - 2:
            drawn.clear()
    per_param = {"range": 3, "co-range": 3 * 2}  # 3 matrices: the last compression + decompression
    assert {x: drawn.count(x) for x in set(drawn)} == per_param
    # (k, l) = emb (4, 9) kept 40 dim 12; conv (4, 9) kept 36 dim 16; fc (3, 7) kept 24 dim 16
    cached = (4 * 12 + 9 * 40) + (4 * 16 + 9 * 36) + (3 * 16 + 7 * 24)
    assert acc_b.plan().projection_cache_bytes == 4 * cached
    with pytest.raises(ValueError, match=r"sketch.*head\.weight.*rank must be >="):
        GradientAccumulator(make_model(), TAU, rank=8, side="right", distribution="sketch")


# ---------------------------------------------------------------- exact_rows
class Lookup(nn.Module):
    """An embedding (row-sparse gradients) and a dense matrix after it."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(200, 12).to(dtype)  # right side: kept 200 rows, d = 12
        self.fc = nn.Linear(12, 16).to(dtype)

    def forward(self, idx):
        return self.fc(self.emb(idx)).square().mean()


def lookup_batches(tokens_per_batch, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (1, t), generator=g) for t in tokens_per_batch]


def lookup_cycle(model, acc, batches):
    for b in batches:
        with acc.micro_batch():
            model(b).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_rows_accumulate_a_lookup_exactly(dtype):
    """Rows that fit: the embedding's .grad is plain accumulation's bit for bit (the same
    additions in the same order); the dense matrix is compressed as without the option."""
    batches = lookup_batches([5, 7, 4])
    plain, exact, compressed = Lookup(dtype), Lookup(dtype), Lookup(dtype)
    for b in batches:
        plain(b).backward()
    acc = GradientAccumulator(exact, TAU, rank=8, exact_rows=True)
    ref = GradientAccumulator(compressed, TAU, rank=8)
    assert acc.decision("emb.weight").compressed and acc.decision("fc.weight").compressed
    assert acc._slot("emb.weight").capacity == 8 * 200 // 13  # n d + n <= r o
    lookup_cycle(exact, acc, batches[:2])
    slot = acc._slot("emb.weight")
    assert 0 < slot.rows <= 12 and acc._slot("fc.weight").rows is None  # dense: switched
    assert acc._slot("fc.weight").dense and not slot.dense  # fc starts compressed from now on
    lookup_cycle(exact, acc, batches[2:])
    lookup_cycle(compressed, ref, batches)
    assert torch.equal(exact.emb.weight.grad, plain.emb.weight.grad)
    assert torch.equal(exact.fc.weight.grad, compressed.fc.weight.grad)
    assert not torch.equal(compressed.emb.weight.grad, plain.emb.weight.grad)
    assert acc.buffer_bytes() == 0 and acc.plan().state_bytes == ref.plan().state_bytes


def test_exact_rows_switch_to_the_compressed_form_when_they_do_not_fit():
    """The third micro-batch brings more rows than fit: the held rows join it and the cycle
    ends compressed, equal (to rounding) to compressing every micro-batch."""
    batches = lookup_batches([3, 4, 400])  # 400 tokens: more distinct rows than fit
    exact, compressed = Lookup(torch.float64), Lookup(torch.float64)
    acc = GradientAccumulator(exact, TAU, rank=8, exact_rows=True, distribution="gaussian")
    ref = GradientAccumulator(compressed, TAU, rank=8, distribution="gaussian")
    lookup_cycle(exact, acc, batches[:2])
    assert acc._slot("emb.weight").rows > 0
    assert batches[2].unique().numel() > acc._slot("emb.weight").capacity
    lookup_cycle(exact, acc, batches[2:])
    lookup_cycle(compressed, ref, batches)
    torch.testing.assert_close(exact.emb.weight.grad, compressed.emb.weight.grad)
    # the next cycle starts exact again
    exact.zero_grad()
    with acc.micro_batch():
        exact(batches[0]).backward()
    assert acc._slot("emb.weight").rows == batches[0].unique().numel()
    assert acc._slot("fc.weight").rows is None  # dense in its first cycle: not checked again


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_exact_rows_resume_mid_cycle_bit_identically(step_in_backward):
    batches = lookup_batches([5, 6, 4] * 2)

    def build():
        model = Lookup()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        kw = {"optimizer": opt, "step_in_backward": True} if step_in_backward else {}
        return model, opt, GradientAccumulator(model, TAU, rank=8, exact_rows=True, **kw)

    def finish(model, opt, acc, todo):
        for b in todo:
            with acc.micro_batch():
                model(b).backward()
            if acc.sync_gradients and not step_in_backward:
                opt.step()
                opt.zero_grad()

    a, opt_a, acc_a = build()
    finish(a, opt_a, acc_a, batches)
    b, opt_b, acc_b = build()
    finish(b, opt_b, acc_b, batches[:2])
    saved = io.BytesIO()
    torch.save(
        {"acc": acc_b.state_dict(), "model": b.state_dict(), "opt": opt_b.state_dict()}, saved
    )
    state = acc_b.state_dict()
    assert state["rows"] == {"emb.weight": acc_b._slot("emb.weight").rows}
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    c, opt_c, acc_c = build()
    c.load_state_dict(loaded["model"])
    opt_c.load_state_dict(loaded["opt"])
    if not step_in_backward:  # mid-cycle .grad of the uncompressed vectors
        for p, q in zip(b.parameters(), c.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
    acc_c.load_state_dict(loaded["acc"])
    finish(c, opt_c, acc_c, batches[2:])
    for x, y in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(x, y)


def test_exact_rows_states_are_validated():
    model = Lookup()
    acc = GradientAccumulator(model, TAU, rank=8, exact_rows=True)
    lookup_cycle(model, acc, lookup_batches([5]))
    state = acc.state_dict()
    for rows, match in (
        ({"emb.weight": 10**6}, "exact rows"),
        ({"emb.weight": True}, "exact rows"),
        ({"fc.bias": 1}, "has none here"),
        ([], "rows must be a dict"),
    ):
        with pytest.raises(ValueError, match=match):
            acc.load_state_dict({**state, "rows": rows})
    plain_model = Lookup()
    plain = GradientAccumulator(plain_model, TAU, rank=8)
    with pytest.raises(ValueError, match=r"holds exact rows for 'emb\.weight'"):
        plain.load_state_dict(state)  # rows need the option
    lookup_cycle(plain_model, plain, lookup_batches([5]))
    compressed = plain.state_dict()
    acc.load_state_dict(compressed)  # no rows held: it continues compressed
    assert acc._slot("emb.weight").rows is None
    del compressed["rows"]  # a state from before the option
    acc.load_state_dict(compressed)
    with pytest.raises(TypeError, match="exact_rows"):
        GradientAccumulator(Lookup(), TAU, rank=8, exact_rows=1)


def test_exact_rows_grad_norm_is_the_true_norm():
    batches = lookup_batches([5, 6, 4])
    plain, exact = Lookup(), Lookup()
    for b in batches:
        plain(b).backward()
    acc = GradientAccumulator(exact, TAU, rank=8, exact_rows=True, exclude="fc")
    lookup_cycle(exact, acc, batches)
    true = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in plain.parameters()]))
    torch.testing.assert_close(acc.grad_norm, true)
