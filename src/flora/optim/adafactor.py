r"""``Flora``: Adafactor with compressed momentum — the paper's optimizer.

Math (one parameter :math:`\theta \in \mathbb{R}^{m \times n}`, step :math:`t \ge 1`), with the
symbols and defaults of :class:`torch.optim.Adafactor`:

.. math::
    \hat\beta_{2,t} &= 1 - t^{\tau} \qquad (\tau = \texttt{beta2\_decay})\\
    \rho_t &= \min(\texttt{lr}, 1/\sqrt t),\qquad
    \alpha_t = \max(\epsilon_2, \operatorname{RMS}(\theta_{t-1}))\,\rho_t\\
    \theta &\leftarrow \theta\,(1 - \texttt{lr}\cdot\lambda) \qquad\text{(decoupled weight decay)}\\
    R_t &= \hat\beta_{2,t} R_{t-1}
        + (1 - \hat\beta_{2,t})\,\operatorname{mean}_{\text{cols}}(G_t^2)\\
    C_t &= \hat\beta_{2,t} C_{t-1}
        + (1 - \hat\beta_{2,t})\,\operatorname{mean}_{\text{rows}}(G_t^2)\\
    \hat V_t &= R_t C_t / \max(\operatorname{mean}(R_t), \epsilon_1)
    \qquad\text{(vectors, or } \texttt{factor\_second\_moment=False}\text{: a full EMA of } G_t^2)\\
    U_t &= G_t / \max(\sqrt{\hat V_t}, \epsilon_1)\\
    D_t &= \text{momentum of } U_t \text{ with } \beta_1
    \quad\text{(compressed by Algorithm 2, see } \texttt{flora.momentum})\\
    \theta_t &= \theta - \alpha_t\, D_t / \max(1, \operatorname{RMS}(D_t)/d)

With ``scale_parameter=False`` the step is not scaled by the parameter's RMS,
:math:`\alpha_t = \rho_t`; with ``relative_step=False`` the step size is ``lr`` itself,
:math:`\rho_t = \texttt{lr}` (both named and meant as in ``transformers.Adafactor``; with both
off, ``lr`` is the constant step of flora-opt's and ``transformers``' Adafactor with
``scale_parameter=False, relative_step=False``).

With ``beta1=0`` there is no momentum (:math:`D_t = U_t`) and the update is exactly
``torch.optim.Adafactor`` (bit for bit in float32 on CPU). Parameters the policy does not
compress keep a full-size momentum ``exp_avg`` (``exp_avg.lerp_(U, 1 - beta1)``); that
"naive momentum" equals the official ``flora_opt.Flora(rank=None)`` (tested to 1e-5).

Deviations from the paper, stated:

* The base is ``torch.optim.Adafactor`` (relative step size :math:`\rho_t`, parameter-RMS
  scaling, clipping threshold ``d``), not optax's ``adafactor`` used in the paper.
* Order of the steps: momentum of the preconditioned update :math:`U_t`, then update
  clipping of the momentum direction, then the step size and parameter scale — the order of
  both of the paper's implementations (flora-opt's optax chain and its PyTorch ``Flora``).
  The clipping bounds the extra variance that decompression adds to :math:`D_t`;
  clipping :math:`U_t` before the momentum lets it through
  (``benchmarks/results/momentum_order.md`` compares the two orders).
* flora-opt uses ``lr`` as a constant relative step; ours is capped, :math:`\rho_t =
  \min(\texttt{lr}, 1/\sqrt t)` (``torch.optim.Adafactor``'s definition).
* ``momentum_variant="subspace"`` (the default) keeps the momentum inside the projection's
  subspace and the exact update outside it (not in the paper; :mod:`flora.momentum`), and
  the default ``distribution="gradient"`` makes that subspace the gradient's dominant one at
  each window's first step, kept in the state in bf16 (not seed-only, unlike the paper's
  projection; :func:`flora.projection.range_basis`); ``"history"`` compresses only the
  history (newest term exact, as flora-opt's PyTorch code) and ``"paper"`` is Algorithm 2 as
  printed, both with the paper's Gaussian projection by ``distribution="gaussian"``.
* The projection is resampled (the gradient basis refreshed) every ``kappa`` steps (at
  steps ``kappa, 2 kappa, ...``) and the momentum transferred to the new basis; the paper's
  default ``kappa = 1000`` is ours.
* ``eps[0] = None`` means ``torch.finfo(float32).eps`` for fp16/bf16 parameters, because their
  state math runs in float32 (torch uses the parameter dtype's eps).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from flora.momentum import compressed_ema_
from flora.optim.base import (
    FloraOptimizerBase,
    ShardReduce,
    factored_zeros,
    group_defaults,
)
from flora.optim.buckets import Bucket
from flora.options import check_bool, check_real
from flora.policy import Decision
from flora.reductions import ShardSums, column_sum_of_squares, run_sums

__all__ = [
    "Flora",
    "flora_adafactor_bucket_update_",
    "flora_adafactor_shard_step",
    "flora_adafactor_update_",
]

#: entries of the factored second moment formed at a time when the update is formed in the
#: gradient's memory (``overwrite_grad``): 1 MiB of float32
VARIANCE_BLOCK = 2**18


def flora_adafactor_update_(
    param: Tensor,  # updated in place; float32/float64 (callers upcast fp16/bf16)
    grad: Tensor,  # same shape and dtype as param
    state: dict[str, Any],  # step:int, row_var/col_var (factored) or variance, opt. exp_avg
    *,
    lr: float,
    beta1: float,
    beta2_decay: float,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    projections: tuple[Tensor, Tensor | None, str] | None,  # (P, P_next, side) if compressed
    momentum_variant: str,
    shards: ShardReduce | None = None,  # FSDP2: param/grad/state are this rank's rows
    scale_parameter: bool = True,
    relative_step: bool = True,
    overwrite_grad: bool = False,  # grad is scratch: the update is formed in its memory
) -> None:
    r"""One Flora step for one parameter; mirrors ``torch.optim._adafactor`` op for op, but
    for the column means of :math:`G^2`, which with momentum (``beta1 > 0``) are summed as
    blocked products (:func:`flora.reductions.column_sum_of_squares`: the same sums up to
    rounding, several times faster on the CPU).

    With ``overwrite_grad`` the preconditioned update :math:`U_t` is formed in ``grad``'s
    memory, the factored :math:`\hat V_t` a block of :data:`VARIANCE_BLOCK` entries at a
    time, instead of in a temporary of the parameter's size (the same products, bit for
    bit: the lean preset's step then needs one float32 copy of the matrix fewer).

    With ``shards`` the tensors are a row shard of a parameter of global shape
    ``shards.shape``; the parameter's RMS, a matrix's column means of :math:`G^2` and mean of
    :math:`R`, and the update's RMS are global, made of local sums and two all-reduces.
    """
    if shards is not None:
        run_sums(
            flora_adafactor_shard_step(
                param, grad, state, lr=lr, beta1=beta1, beta2_decay=beta2_decay, eps1=eps1,
                eps2=eps2, d=d, weight_decay=weight_decay, projections=projections,
                momentum_variant=momentum_variant, shards=shards,
                scale_parameter=scale_parameter, relative_step=relative_step,
            ),
            shards.sum_,
        )  # fmt: skip
        return
    one_minus_beta2_t, rho_t = _advance_schedule(state, lr, beta2_decay, relative_step)
    if param.numel() == 0:  # nothing to update (and no RMS to take)
        return
    if scale_parameter:
        alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho_t
    else:
        alpha = rho_t

    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)

    if "row_var" in state:  # factored second moment
        row_var, col_var = state["row_var"], state["col_var"]  # (..., m, 1), (..., 1, n)
        row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
        row_var.lerp_(row_mean, one_minus_beta2_t)
        if beta1 == 0:  # torch.optim.Adafactor's update: its ops, for the same bits
            col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
        else:  # the column reduction as blocked products (flora.reductions)
            col_mean = column_sum_of_squares(grad).div_(grad.size(-2))
        col_var.lerp_(col_mean, one_minus_beta2_t)
        if overwrite_grad:
            _precondition_in_place_(grad, row_var, col_var, eps1, beta1)
            _apply_direction(param, grad, state, alpha, d, beta1, projections, momentum_variant)
            return
        var_estimate = _factored_product(row_var, col_var, beta1)  # (..., m, n)
        var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        variance = state["variance"]
        variance.lerp_(grad * grad, one_minus_beta2_t)
        var_estimate = variance.clone()

    update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
    update.mul_(grad)
    _apply_direction(param, update, state, alpha, d, beta1, projections, momentum_variant)


def _advance_schedule(
    state: dict[str, Any], lr: float, beta2_decay: float, relative_step: bool
) -> tuple[float, float]:
    r"""Count the step; return :math:`1 - \hat\beta_{2,t} = t^{\text{beta2\_decay}}` and
    :math:`\rho_t` (``min(lr, 1/sqrt(t))``, or ``lr`` without ``relative_step``)."""
    state["step"] += 1
    step = float(state["step"])
    return step**beta2_decay, min(lr, 1 / (step**0.5)) if relative_step else lr


def flora_adafactor_shard_step(
    param: Tensor,  # this rank's rows of the parameter; float32/float64
    grad: Tensor,
    state: dict[str, Any],  # this rank's rows of the state (the column factor whole)
    *,
    lr: float,
    beta1: float,
    beta2_decay: float,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    projections: tuple[Tensor, Tensor | None, str] | None,
    momentum_variant: str,
    shards: ShardReduce,
    scale_parameter: bool = True,
    relative_step: bool = True,
) -> ShardSums:
    r""":func:`flora_adafactor_update_` on an FSDP2 row shard, as a
    :data:`flora.reductions.ShardSums` body with two requests: the local sums of
    :math:`\lVert\theta\rVert^2`, a matrix's column sums of :math:`G^2` and the sum of
    :math:`R` (one tensor), then :math:`\lVert D_t\rVert^2` for the clipping. Only a
    matrix's factors span the sharded dimension (rows): for >2-d tensors the factors are per
    leading index and stay local."""
    one_minus_beta2_t, rho_t = _advance_schedule(state, lr, beta2_decay, relative_step)
    numel = math.prod(shards.shape)
    factored = "row_var" in state
    matrix = factored and grad.dim() == 2
    if factored:
        row_var, col_var = state["row_var"], state["col_var"]
        row_var.lerp_(grad.square().mean(dim=-1, keepdim=True), one_minus_beta2_t)
    # first request: ||theta||^2 and, for a matrix, the column sums of G^2 and the sum of R
    parts = [param.square().sum().reshape(1)]
    if matrix:
        parts += [grad.square().sum(dim=0), row_var.sum().reshape(1)]
    sums = torch.cat(parts)
    yield sums
    alpha = max(eps2, sums[0].sqrt().item() / numel**0.5) * rho_t if scale_parameter else rho_t

    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)

    if matrix:
        rows = shards.shape[0]
        col_var.lerp_(sums[1:-1].div(rows).view_as(col_var), one_minus_beta2_t)
        var_estimate = row_var @ col_var
        var_estimate.div_(sums[-1:].div(rows).clamp_(min=eps1))
    elif factored:
        col_var.lerp_(grad.square().mean(dim=-2, keepdim=True), one_minus_beta2_t)
        var_estimate = row_var @ col_var
        var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        variance = state["variance"]
        variance.lerp_(grad * grad, one_minus_beta2_t)
        var_estimate = variance.clone()

    update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
    update.mul_(grad)
    direction = _momentum_direction(param, update, state, beta1, projections, momentum_variant)
    sq = direction.square().sum().reshape(1)  # second request: ||D||^2 of the whole parameter
    yield sq
    denom = max(1.0, sq.sqrt().item() / ((numel**0.5) * d))
    param.add_(direction, alpha=-alpha / denom)


def _factored_product(row_var: Tensor, col_var: Tensor, beta1: float) -> Tensor:
    """:math:`R C` of the factored second moment: torch's ``(m, 1) @ (1, n)`` where the step
    is ``torch.optim.Adafactor``'s (``beta1 = 0``), otherwise the broadcast product (the same
    products on the CPU, without a matrix-multiply call)."""
    return row_var @ col_var if beta1 == 0 else row_var * col_var


def _precondition_in_place_(
    grad: Tensor, row_var: Tensor, col_var: Tensor, eps1: float, beta1: float
) -> None:
    """``grad *= rsqrt(max(R C / max(mean(R), eps1), eps1^2))`` in place, in blocks of rows
    of at most :data:`VARIANCE_BLOCK` entries (each entry the same ops as the whole)."""
    mean = row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1)
    rows = max(1, VARIANCE_BLOCK // grad.size(-1))
    for start in range(0, grad.size(-2), rows):
        block = _factored_product(row_var[..., start : start + rows, :], col_var, beta1)
        grad[..., start : start + rows, :].mul_(block.div_(mean).clamp_(min=eps1 * eps1).rsqrt_())


def flora_adafactor_bucket_update_(
    params: list[Tensor],  # B matrices (m, n), updated in place; float32/float64
    grads: Tensor,  # (B, m, n): their gradients, stacked; overwritten
    stacks: dict[str, Tensor],  # row_var (B, m, 1), col_var (B, 1, n), exp_avg (compressed)
    proj: Tensor,  # (B, r, d): each matrix's projection of this step, in the state dtype
    *,
    step: int | Tensor,  # the members' step count after this step (they all share it)
    side: str,
    lr: float | Tensor,
    beta1: float,
    beta2_decay: float,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    scale_parameter: bool = True,
    relative_step: bool = True,
) -> None:
    r""":func:`flora_adafactor_update_` for a bucket of same-shaped matrices at the same step,
    with batched ops on the stacks (``foreach=True``): one op per formula for the bucket,
    and no host sync (the step sizes and clipping denominators stay tensors).

    The momentum is the compressed subspace form, in a step that does not start a window;
    the optimizer leaves other steps to the loop.
    The same math as the loop, op for op, except that the scalars (:math:`\alpha_t`, the
    clipping denominator) are float32 tensors instead of Python floats and the products are
    batched: the results agree to a few ulp, not bit for bit.
    """
    count, m, n = grads.shape
    if isinstance(step, Tensor):  # 0-D tensors (compiled: one graph for every step)
        one_minus_beta2_t: float | Tensor = step.pow(beta2_decay)
        rho_t: float | Tensor = torch.clamp(step.rsqrt(), max=lr) if relative_step else lr
    else:
        one_minus_beta2_t = float(step) ** beta2_decay
        rho_t = min(lr, 1 / (float(step) ** 0.5)) if relative_step else lr  # type: ignore[type-var]
    root_numel = (m * n) ** 0.5
    if scale_parameter:  # alpha_t = max(eps2, RMS(theta)) rho_t, one per matrix
        alpha = torch.stack(torch._foreach_norm(params)).div_(root_numel)
        alpha = alpha.clamp_(min=eps2).mul_(rho_t)
    else:
        alpha = grads.new_ones(count).mul_(rho_t)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)

    row_var, col_var = stacks["row_var"], stacks["col_var"]
    row_mean = torch.norm(grads, dim=-1, keepdim=True).square_().div_(n)
    row_var.lerp_(row_mean, one_minus_beta2_t)
    col_mean = column_sum_of_squares(grads).div_(m)
    col_var.lerp_(col_mean, one_minus_beta2_t)
    var_estimate = row_var * col_var  # the loop's (m, 1) @ (1, n): the same products
    var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    update = grads.mul_(var_estimate.clamp_(min=eps1 * eps1).rsqrt_())  # U, in place of G
    del var_estimate

    direction = compressed_ema_(
        update,
        stacks["exp_avg"],
        beta=beta1,
        proj=proj,
        side=side,
        variant="subspace",
        overwrite=True,
    )
    denom = torch.linalg.vector_norm(direction, dim=(-2, -1)).div_(root_numel * d).clamp_(min=1)
    scale = alpha.div_(denom).neg_().view(count, 1, 1)
    torch._foreach_add_(params, direction.mul_(scale).unbind(0))


def _apply_direction(
    param: Tensor,
    update: Tensor,
    state: dict[str, Any],
    alpha: float,
    d: float,
    beta1: float,
    projections: tuple[Tensor, Tensor | None, str] | None,
    momentum_variant: str,
) -> None:
    """theta -= alpha * D_t / max(1, RMS(D_t) / d), D_t the (compressed) momentum of U_t."""
    direction = _momentum_direction(param, update, state, beta1, projections, momentum_variant)
    denom = max(1.0, direction.norm(2).item() / ((direction.numel() ** 0.5) * d))
    param.add_(direction, alpha=-alpha / denom)


def _momentum_direction(
    param: Tensor,
    update: Tensor,
    state: dict[str, Any],
    beta1: float,
    projections: tuple[Tensor, Tensor | None, str] | None,
    momentum_variant: str,
) -> Tensor:
    """D_t: U_t itself (``beta1 = 0``), its EMA, or its compressed EMA (decompressed)."""
    if beta1 == 0:
        return update  # exactly torch.optim.Adafactor
    if projections is None:
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(update, 1 - beta1)
        return exp_avg
    proj, proj_next, side = projections  # ``update`` is overwritten with D_t: no temporary
    return compressed_ema_(
        update.reshape(param.shape[0], math.prod(param.shape[1:])),
        state["exp_avg"],
        beta=beta1,
        proj=proj,
        proj_next=proj_next,
        side=side,
        variant=momentum_variant,
        overwrite=True,
    ).view_as(param)


class Flora(FloraOptimizerBase):
    r"""Adafactor with momentum compressed by resampled random projections (Flora).

    See the module docstring for the math and every deviation from the paper.

    Args:
        params: parameters, ``model.named_parameters()`` (preferred: projections are then
            keyed by name, and ``exclude`` patterns work) or parameter groups. Groups may
            override every option below.
        lr: Adafactor's relative step size cap :math:`\rho_t = \min(lr, 1/\sqrt t)`
            (``torch.optim.Adafactor`` semantics). Default ``1e-2``.
        beta1: momentum coefficient in ``[0, 1)``; ``0`` disables momentum (then exactly
            ``torch.optim.Adafactor``). Default ``0.9``.
        beta2_decay: :math:`\tau` in :math:`\hat\beta_{2,t} = 1 - t^\tau`. Default ``-0.8``.
        eps: ``(eps1, eps2)``: ``eps1`` floors the second moment (``None``: machine eps of
            the state dtype), ``eps2`` floors the parameter RMS. Default ``(None, 1e-3)``.
        d: update clipping threshold (>= 1). Default ``1.0``.
        weight_decay: decoupled weight decay coefficient. Default ``0``.
        factor_second_moment: Adafactor's row/column factors for tensors with >= 2 dims
            (sublinear memory, default ``True``); ``False`` keeps a full-size second moment
            (the paper's "linear-memory" variant of Table 4).
        scale_parameter: scale the step by the parameter's RMS, as ``torch.optim.Adafactor``
            does (default ``True``); ``False`` as in ``transformers.Adafactor``.
        relative_step: cap the step size by :math:`1/\sqrt t` (default ``True``, torch's
            convention); ``False`` uses ``lr`` as the step size. With both ``False``, step
            sizes from flora-opt or ``transformers.Adafactor(scale_parameter=False,
            relative_step=False)`` carry over.
        rank: rank ``r`` of the compressed momentum. Default ``32``.
        kappa: resample the projection every ``kappa`` steps. Default ``1000`` (paper).
        seed: user seed of all projections. Default ``0``.
        compress: ``False`` keeps full-size momentum (naive momentum). Default ``True``.
        exclude: regex or list of regexes; matching parameter names are not compressed.
        side: ``"auto"`` (compress the smaller dimension), ``"left"`` or ``"right"``.
        momentum_variant: ``"subspace"`` (default: momentum inside the projection's
            subspace, the exact update outside it, chosen by the quality study in
            ``benchmarks/results/quality``), ``"history"`` (flora-opt's form) or ``"paper"``
            (Algorithm 2 as printed); see :mod:`flora.momentum`.
        distribution: the momentum's basis. ``"gradient"`` (default, chosen by the quality
            study; subspace variant only) takes each window's basis from the gradient at its
            first step (:func:`flora.projection.range_basis`) and keeps it as
            ``state["projection"]``: ``r * d`` more state per compressed matrix, and no
            projection is regenerated between windows. The seed-only families, which store
            nothing: ``"orthonormal"``, ``"gaussian"`` (the paper's), ``"rademacher"``,
            ``"coordinates"`` (:mod:`flora.projection`). flora-opt's Flora is
            ``momentum_variant="history", distribution="gaussian"``.
        basis_dtype: the dtype ``distribution="gradient"`` keeps its basis in:
            ``torch.bfloat16`` (default, chosen by the quality study: the same loss as a
            float32 basis at half its ``r * d`` bytes), or ``None`` for the state dtype. The
            basis is rounded once when a window starts and used in the state dtype.
            Seed-only distributions store no basis, so it does not apply to them.
        moment_dtype: the dtype the moments are stored in (momentum, compressed or not, and
            the second-moment factors), or ``None`` (default) for the state dtype.
            ``torch.bfloat16`` halves their bytes: the step's math runs in float32 on a
            copy, and the results are rounded stochastically into bf16 (Philox keyed by
            seed, parameter, step and entry: reproducible and resumable). ``torch.int8``
            keeps the compressed momentum 8-bit, in blocks of 256 per row with a float32
            scale each (:mod:`flora.quantization`), and the other moments in bf16.
        nonfinite: what a NaN/Inf gradient does, decided for the whole step before any
            update: ``"skip"`` (default, GradScaler's convention: the whole step is skipped,
            a ``RuntimeWarning`` is issued and ``optimizer.skipped_steps`` counts it),
            ``"skip_parameter"`` (only the offending parameters are not updated;
            ``state["nonfinite_skips"]`` counts it; their step counters then fall behind),
            ``"raise"`` (``FloatingPointError``, no parameter updated) or ``"unchecked"``
            (no check and so no host sync in ``step()``; a NaN reaches the weights, as in
            torch's optimizers).
        rounding: how the float32 step is written into bf16 parameters (there are no
            float32 master weights): ``"nearest"`` (default), ``"stochastic"`` (unbiased,
            keyed by seed, parameter and step: reproducible and resumable) or
            ``"compensated"`` (Kahan, a bf16 buffer ``state["compensation"]``, 2 bytes per
            parameter); see :mod:`flora.rounding`. float32 parameters are not rounded.
        cache_projection: keep each parameter's current projection in memory instead of
            regenerating it every step (faster; memory in ``plan().projection_cache_bytes``).
        foreach: the multi-tensor step for same-shaped compressed matrices: a
            transformer's matrices of one shape are stepped as a stack, with one batched op
            per formula for the bucket, seeded projections generated together, and no host
            sync (:func:`flora_adafactor_bucket_update_`; results within a few ulp of the
            loop's, not bit for bit). ``None`` (default): on accelerators every such
            matrix; on the CPU those with a seeded projection and, with a stored basis (the
            default's), those of at most ``CPU_STACK_NUMEL`` (2**16) entries, where stacking
            pays (``benchmarks/results/stack_crossover_cpu.md``); ``True``: every size;
            ``False``: the per-parameter loop for every parameter, the reference. The loop
            always takes uncompressed parameters (so that ``beta1=0`` stays torch's
            Adafactor bit for bit), vectors, bf16/fp16 parameters, ``moment_dtype``, FSDP2
            shards, the ``"history"``/``"paper"`` variants, ``cache_projection`` and each
            window's first step.
        maximize: maximize the objective instead of minimizing.
        compiled: run the multi-tensor step's bucket function ``torch.compile``-d with
            ``fullgraph=True`` (step count and ``lr`` passed as 0-D tensors, so one graph
            serves every step: the first step of each bucket layout compiles, later steps
            and window boundaries do not recompile). Default ``False``. What the loop steps
            is not compiled.
        check_replicas: under ``torch.distributed`` with several processes, check at the
            first ``step()`` that every process uses the same settings (a collective: every
            process must call ``step()``). Default ``True``.

    Example:
        >>> import torch, flora
        >>> model = torch.nn.Linear(64, 48)
        >>> opt = flora.Flora(model.named_parameters(), rank=8)
        >>> model(torch.randn(4, 64)).square().mean().backward()
        >>> opt.step()
        >>> tuple(opt.state[model.weight]["exp_avg"].shape)  # 48 <= 64: left side, r x n
        (8, 64)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        beta1: float = 0.9,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        factor_second_moment: bool = True,
        scale_parameter: bool = True,
        relative_step: bool = True,
        rank: int = 32,
        kappa: int = 1000,
        seed: int = 0,
        compress: bool = True,
        exclude: str | Iterable[str] | None = None,
        side: str = "auto",
        momentum_variant: str = "subspace",
        distribution: str = "gradient",
        basis_dtype: torch.dtype | None = torch.bfloat16,
        moment_dtype: torch.dtype | None = None,
        nonfinite: str = "skip",
        rounding: str = "nearest",
        cache_projection: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        check_replicas: bool = True,
        compiled: bool = False,
    ) -> None:
        super().__init__(
            params, group_defaults(locals()), check_replicas=check_replicas, compiled=compiled
        )

    def _validate_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        check_real(f"{where}beta1", group["beta1"], 0.0, 1.0, high_open=True)
        check_real(f"{where}beta2_decay", group["beta2_decay"], -float("inf"), 0.0, high_open=False)
        check_real(f"{where}d", group["d"], 1.0, float("inf"), high_open=False)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"{where}eps must be a tuple (eps1, eps2), got {eps!r}")
        if eps[0] is not None:
            check_real(f"{where}eps[0]", eps[0], 0.0, float("inf"), high_open=False)
        check_real(f"{where}eps[1]", eps[1], 0.0, float("inf"), high_open=False)
        check_bool(f"{where}factor_second_moment", group["factor_second_moment"])
        check_bool(f"{where}scale_parameter", group["scale_parameter"])
        check_bool(f"{where}relative_step", group["relative_step"])

    def _uses_momentum(self, group: dict[str, Any]) -> bool:
        return group["beta1"] > 0

    def _beta1(self, group: dict[str, Any]) -> float:
        return float(group["beta1"])

    def _second_moment_shapes(
        self, group: dict[str, Any], d: Decision
    ) -> dict[str, tuple[int, ...]]:
        shape = d.shape
        if group["factor_second_moment"] and len(shape) >= 2:
            return {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, shape[-1])}
        return {"variance": shape}

    _bucket_moments = ("row_var", "col_var", "exp_avg")

    def _bucket_eligible(self, group: dict[str, Any], state: dict[str, Any]) -> bool:
        # compressed matrices only (the base checks): without compression the loop is
        # torch's Adafactor bit for bit, which a batched step is not
        return (
            group["factor_second_moment"]
            and "row_var" in state
            and group["beta1"] != 0
            and group["momentum_variant"] == "subspace"
        )

    def _update_bucket(self, group: dict[str, Any], b: Bucket) -> None:
        eps1, eps2 = group["eps"]
        self._bucket_function(flora_adafactor_bucket_update_)(
            b.params,
            b.grads,
            b.stacks,
            b.proj,
            step=b.step,
            side=b.side,
            lr=self._bucket_lr(group, b),
            beta1=float(group["beta1"]),
            beta2_decay=float(group["beta2_decay"]),
            eps1=torch.finfo(b.grads.dtype).eps if eps1 is None else float(eps1),
            eps2=float(eps2),
            d=float(group["d"]),
            weight_decay=float(group["weight_decay"]),
            scale_parameter=bool(group["scale_parameter"]),
            relative_step=bool(group["relative_step"]),
        )

    def _update(
        self,
        p: Tensor,
        grad: Tensor,
        group: dict[str, Any],
        name: str,
        state: dict[str, Any],
        *,
        scratch: bool = False,
    ) -> ShardSums:
        if "step" not in state:
            state["step"] = 0
            if grad.dim() > 1 and group["factor_second_moment"]:
                state["row_var"], state["col_var"] = factored_zeros(grad)
            else:
                state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        beta1 = float(group["beta1"])
        projections = yield from self._momentum_inputs(p, group, name, state, beta1, grad)
        eps1, eps2 = group["eps"]
        common = dict(
            lr=float(group["lr"]),
            beta1=beta1,
            beta2_decay=float(group["beta2_decay"]),
            eps1=torch.finfo(p.dtype).eps if eps1 is None else float(eps1),
            eps2=float(eps2),
            d=float(group["d"]),
            weight_decay=float(group["weight_decay"]),
            projections=projections,
            momentum_variant=group["momentum_variant"],
            scale_parameter=bool(group["scale_parameter"]),
            relative_step=bool(group["relative_step"]),
        )
        if self._shards is not None:  # FSDP2: sums over the shards, with the other matrices'
            yield from flora_adafactor_shard_step(p, grad, state, shards=self._shards, **common)  # type: ignore[arg-type]
        else:
            flora_adafactor_update_(p, grad, state, overwrite_grad=scratch, **common)  # type: ignore[arg-type]
