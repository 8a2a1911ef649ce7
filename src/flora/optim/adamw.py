r"""``FloraAdamW``: AdamW whose first moment is compressed with resampled random projections.

Math (one parameter, step :math:`t \ge 1`, the symbols of :class:`torch.optim.AdamW`):

.. math::
    \theta &\leftarrow \theta\,(1 - \gamma\lambda) \qquad\text{(decoupled weight decay)}\\
    \hat m_t &= \text{EMA}_{\beta_1}(g_t)
        \quad\text{(compressed by Algorithm 2 for matrices, see } \texttt{flora.momentum})\\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2
        \quad\text{(or Adafactor's factored } R_t C_t / \operatorname{mean}(R_t)
        \text{ with } \texttt{factor\_second\_moment=True})\\
    \theta_t &= \theta - \frac{\gamma}{1 - \beta_1^t}\,
        \frac{\hat m_t}{\sqrt{v_t}/\sqrt{1 - \beta_2^t} + \epsilon}

With compression off (``compress=False``, or for vectors) the first moment is the full
``exp_avg`` updated exactly like ``torch.optim.AdamW`` (``lerp_``), and the whole update is
``torch.optim.AdamW``'s, bit for bit in float32 on CPU. ``beta1 = 0`` keeps no first moment.

Deviations, stated: the bias correction :math:`1/(1-\beta_1^t)` is applied to the decompressed
momentum, which is unbiased for the uncompressed one (:math:`\mathbb{E}[P^\top P] = I`);
with ``momentum_variant="subspace"`` it is applied to the momentum term only,
:math:`\hat m_t = (I - \Pi) g_t + c\,\operatorname{up}(M_t)/(1 - \beta_1^t)`, since the
remainder is the exact gradient (:mod:`flora.momentum`); the second moment always sees the
exact gradient; ``amsgrad`` is not offered.

``preconditioner="subspace"`` (not in the Flora paper) keeps *both* moments of a compressed
matrix in the projection's subspace, as GaLore (Zhao et al., 2024) does, and adds the
gradient's remainder outside the subspace scaled by the subspace's normalisation, as Fira
(Chen et al., 2024) does. With an orthonormal projection :math:`P \in \mathbb{R}^{r\times d}`
(:math:`P P^\top = (d/r) I`, so :math:`\sqrt{c}\,P^\top` with :math:`c = r/d` has orthonormal
columns), on the left side (the right side is the transpose):

.. math::
    R_t &= \sqrt c\,P G_t \in \mathbb{R}^{r \times n}
        \quad\text{(the gradient's coordinates in the subspace)}\\
    M &\leftarrow T M,\quad V \leftarrow (T \odot T)\,V,\quad T = c\,P' P^\top
        \quad\text{(only when the window changes)}\\
    M_t &= \beta_1 M_{t-1} + (1 - \beta_1) R_t,\qquad
    V_t = \beta_2 V_{t-1} + (1 - \beta_2) R_t^2\\
    N_t &= \frac{M_t / (1 - \beta_1^t)}{\sqrt{V_t / (1 - \beta_2^t)} + \epsilon}\\
    \phi_j &= \lVert N_{t,:j} \rVert / (\lVert R_{t,:j} \rVert + \epsilon),\qquad
    E_t = (G_t - \sqrt c\,P^\top R_t)\operatorname{diag}(\phi)\\
    E_t &\leftarrow E_t / f_t,\quad f_t = \max(\lVert E_t\rVert / e_{t-1}, \gamma) / \gamma,
        \quad e_t = \lVert E_t \rVert \quad\text{(norm-growth limiter; } f_t = 1
        \text{ while } e_{t-1} = 0)\\
    \theta_t &= \theta\,(1 - \gamma_{lr}\lambda) - \gamma_{lr}\,
        \bigl(\sqrt c\,P^\top N_t + E_t\bigr)

:math:`V`'s transfer keeps the diagonal of :math:`T \operatorname{diag}(v) T^\top` (exact
for uncorrelated coordinates). State per compressed matrix: ``exp_avg`` and ``exp_avg_sq``
of the compressed shape, the scalar ``residual_norm`` (:math:`e_t`), and the basis with
``distribution="gradient"`` — :math:`2 r n + 1` numbers (+ :math:`r d`) instead of
:math:`r n + m n`. Deviations from GaLore/Fira: no scale :math:`\alpha` on the subspace term
(the step size absorbs it), the exact remainder :math:`(I - \Pi) G` (Fira subtracts the
:math:`\alpha`-scaled projection), the moments transferred to a new basis instead of kept
in the old coordinates, and a seeded basis by default (GaLore's is an SVD of the gradient,
ours with ``distribution="gradient"`` a randomized range finder).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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
from flora.optim.buckets import Bucket, add_scaled_
from flora.options import check_bool, check_choice, check_real
from flora.policy import Decision
from flora.projection import ORTHONORMAL, down
from flora.reductions import ShardSums, run_sums, sum_of_squares

__all__ = [
    "PRECONDITIONERS",
    "FloraAdamW",
    "flora_adamw_update_",
    "subspace_adam_bucket_update_",
    "subspace_adam_update_",
]

#: how FloraAdamW divides by the second moment: per coordinate of the exact gradient, or
#: inside the projection's subspace (GaLore + Fira, see the module docstring)
PRECONDITIONERS: tuple[str, ...] = ("elementwise", "subspace")


def flora_adamw_update_(
    param: Tensor,  # updated in place; float32/float64 (callers upcast fp16/bf16)
    grad: Tensor,  # same shape and dtype as param
    state: dict[str, Any],  # step:int, exp_avg?, exp_avg_sq or row_var/col_var
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    projections: tuple[Tensor, Tensor | None, str] | None,  # (P, P_next, side) if compressed
    momentum_variant: str,
    shards: ShardReduce | None = None,  # FSDP2: param/grad/state are this rank's rows
) -> None:
    """One FloraAdamW step for one parameter; mirrors ``torch.optim.adam`` (single tensor).

    With ``shards`` the tensors are a row shard of a parameter of global shape
    ``shards.shape``; only the factored second moment of a matrix needs global statistics
    (column means of :math:`g^2`, mean of :math:`R`): one all-reduce.
    """
    body = _adamw_step(
        param, grad, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        projections=projections, momentum_variant=momentum_variant, shards=shards,
    )  # fmt: skip
    run_sums(body, None if shards is None else shards.sum_)


def _adamw_step(
    param: Tensor,  # updated in place; float32/float64 (callers upcast fp16/bf16)
    grad: Tensor,  # same shape and dtype as param
    state: dict[str, Any],  # step:int, exp_avg?, exp_avg_sq or row_var/col_var
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    projections: tuple[Tensor, Tensor | None, str] | None,  # (P, P_next, side) if compressed
    momentum_variant: str,
    shards: ShardReduce | None = None,  # FSDP2: param/grad/state are this rank's rows
) -> ShardSums:
    """:func:`flora_adamw_update_` as a :data:`flora.reductions.ShardSums` body: on a row
    shard a factored matrix asks for one sum (its column sums of :math:`g^2` and the sum of
    :math:`R`, one tensor); otherwise it asks for nothing."""
    state["step"] += 1
    step = float(state["step"])

    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)

    if beta1 == 0:
        exp_avg = grad
    elif projections is None:
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(grad, 1 - beta1)
    else:
        proj, proj_next, side = projections
        subspace = momentum_variant == "subspace"
        exp_avg = compressed_ema_(
            grad.reshape(param.shape[0], math.prod(param.shape[1:])),
            state["exp_avg"],
            beta=beta1,
            proj=proj,
            proj_next=proj_next,
            side=side,
            variant=momentum_variant,
            # the subspace variant's remainder is the exact gradient: bias-correct only the
            # momentum term (below, the step then skips 1 / (1 - beta1^t))
            momentum_scale=1 / (1 - beta1**step) if subspace else 1.0,
        ).view_as(param)

    if "exp_avg_sq" in state:
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        row_var, col_var = state["row_var"], state["col_var"]  # (..., m, 1), (..., 1, n)
        row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
        row_var.lerp_(row_mean, 1 - beta2)
        if shards is not None and grad.dim() == 2:  # rows split across ranks
            sums = torch.cat([grad.square().sum(dim=0), row_var.sum().reshape(1)])
            yield sums
            rows = shards.shape[0]
            col_var.lerp_(sums[:-1].div(rows).view_as(col_var), 1 - beta2)
            row_var_mean = sums[-1:].div(rows)
        else:
            col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
            col_var.lerp_(col_mean, 1 - beta2)
            row_var_mean = row_var.mean(dim=-2, keepdim=True)
        exp_avg_sq = row_var @ col_var
        exp_avg_sq.div_(row_var_mean.clamp_(min=torch.finfo(grad.dtype).tiny))

    corrected = projections is not None and beta1 != 0 and momentum_variant == "subspace"
    bias_correction1 = 1.0 if corrected else 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def subspace_adam_update_(
    param: Tensor,  # updated in place; float32/float64 (callers upcast fp16/bf16)
    grad: Tensor,  # same shape and dtype as param
    state: dict[str, Any],  # step:int, exp_avg, exp_avg_sq (compressed shape), residual_norm
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    projections: tuple[Tensor, Tensor | None, str],  # (P, P_next, side); P orthonormal
    growth_limit: float | None,
    shards: ShardReduce | None = None,  # FSDP2: a row shard (compressed on the right)
) -> None:
    """One step of ``preconditioner="subspace"`` for one compressed matrix (module docstring).

    Under FSDP2 everything is row-local except the remainder's norm for the limiter (one
    all-reduce of one number)."""
    body = _subspace_adam_step(
        param, grad, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        projections=projections, growth_limit=growth_limit, sharded=shards is not None,
    )  # fmt: skip
    run_sums(body, None if shards is None else shards.sum_)


def _subspace_adam_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    projections: tuple[Tensor, Tensor | None, str],
    growth_limit: float | None,
    sharded: bool,
) -> ShardSums:
    r""":func:`subspace_adam_update_` as a :data:`flora.reductions.ShardSums` body: on a row
    shard the limiter asks for one sum (the local part of :math:`\lVert E_t\rVert^2`)."""
    state["step"] += 1
    step = float(state["step"])
    proj, proj_next, side = projections
    left = side == "left"
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    c = proj.shape[0] / proj.shape[1]
    if proj_next is not None:  # the moments move to the new basis: T = c P' P^T (left)
        t = (proj_next @ proj.T).mul_(c) if left else (proj @ proj_next.T).mul_(c)
        t2 = t * t
        exp_avg.copy_(t @ exp_avg if left else exp_avg @ t)
        exp_avg_sq.copy_(t2 @ exp_avg_sq if left else exp_avg_sq @ t2)
        proj = proj_next
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    g = grad.reshape(param.shape[0], math.prod(param.shape[1:]))
    target = param.reshape(g.shape)  # a view, or a copy for a layout that has none
    parts = _subspace_moments(
        g, exp_avg, exp_avg_sq, proj, side, step, beta1=beta1, beta2=beta2, eps=eps,
        limited=growth_limit is not None,
    )  # fmt: skip
    energy = None if parts[3] is None else parts[3].sum()
    if energy is not None and sharded:  # the sum over every rank's rows
        energy = energy.reshape(1)
        yield energy
        energy = energy[0]
    _subspace_finish(
        g, parts, state.get("residual_norm"), energy, proj, side, growth_limit=growth_limit,
        overwrite=False, apply_to=target, lr=lr,
    )  # fmt: skip
    if target.data_ptr() != param.data_ptr():
        param.copy_(target.view_as(param))


def subspace_adam_bucket_update_(
    params: list[Tensor],  # B matrices (m, n), updated in place; float32/float64
    grads: Tensor,  # (B, m, n): their gradients, stacked
    stacks: dict[str, Tensor],  # exp_avg, exp_avg_sq (B, compressed shape), residual_norm (B,)
    proj: Tensor,  # (B, r, d): each matrix's orthonormal projection of this step
    *,
    step: int | Tensor,  # the members' step count after this step (they all share it)
    side: str,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    growth_limit: float | None,
) -> None:
    """:func:`subspace_adam_update_` for a bucket of same-shaped matrices at the same step,
    in a step that does not start a window (``foreach``): the same formulas on the stacks,
    batched, with no host sync; within a few ulp of the loop (batched products)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    direction = _subspace_adam_direction(
        grads, stacks["exp_avg"], stacks["exp_avg_sq"], stacks.get("residual_norm"), proj,
        side, step if isinstance(step, Tensor) else float(step), beta1=beta1, beta2=beta2,
        eps=eps, growth_limit=growth_limit,
        total=lambda per_channel: per_channel.sum(dim=(-2, -1)), overwrite=True,
    )  # fmt: skip
    assert direction is not None  # overwrite=True: the direction, in the stack's memory
    add_scaled_(params, direction, lr)


def _subspace_adam_direction(
    g: Tensor,  # (m, n), or a stack (B, m, n)
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    previous: Tensor | None,  # e_{t-1}: 0-D, or (B,) for a stack
    proj: Tensor,
    side: str,
    step: float | Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    growth_limit: float | None,
    total: Callable[[Tensor], Tensor],  # per-channel values -> their sum per matrix
    overwrite: bool = False,  # return the direction, written into ``g`` (a stack's copy)
    apply_to: Tensor | None = None,  # or subtract lr * direction from this matrix (m, n)
    lr: float = 0.0,
) -> Tensor | None:
    r"""The update direction :math:`\sqrt c\,P^\top N_t + E_t` of the module docstring
    (the moments and the limiter's norm advanced in place), with one product of the
    parameter's size instead of two: since :math:`E_t` scales each channel of the exact
    remainder, :math:`E_t / f_t = G_t \operatorname{diag}(s) - \sqrt c\,P^\top R_t
    \operatorname{diag}(s)` with :math:`s = \phi / f_t`, so the direction is
    :math:`G_t \operatorname{diag}(s) + \sqrt c\,P^\top (N_t - R_t \operatorname{diag}(s))`
    (left side; the right side is the transpose). The limiter's
    :math:`\lVert E_t \rVert^2 = \sum_j \phi_j^2 (\lVert G_{:j} \rVert^2
    - 2 \lVert R_{:j} \rVert^2 + R_{:j}^\top K R_{:j})`, :math:`K = c\,P P^\top`
    (exactly :math:`I` for an orthonormal basis; a bf16 basis is only nearly one), is formed
    from per-channel sums without :math:`E_t` itself. With ``apply_to`` the two terms are
    subtracted from that matrix in place, scaled by ``lr``, and nothing is returned: no
    temporary of the parameter's size at all. (A row shard's step runs the two halves,
    :func:`_subspace_moments` and :func:`_subspace_finish`, with its sum over the shards
    between them.)"""
    parts = _subspace_moments(
        g, exp_avg, exp_avg_sq, proj, side, step, beta1=beta1, beta2=beta2, eps=eps,
        limited=growth_limit is not None,
    )  # fmt: skip
    energy = None if growth_limit is None else total(parts[3])
    return _subspace_finish(
        g, parts, previous, energy, proj, side, growth_limit=growth_limit, overwrite=overwrite,
        apply_to=apply_to, lr=lr,
    )  # fmt: skip


def _subspace_moments(
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    proj: Tensor,
    side: str,
    step: float | Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    limited: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """First half of :func:`_subspace_adam_direction`: the moments advanced; ``(R, N, phi,
    per-channel parts of ||E||^2 / f^2`` (with ``limited``, else None)``)``."""
    c = proj.shape[-2] / proj.shape[-1]
    left = side == "left"
    low = down(g, proj, side).mul_(math.sqrt(c))  # R
    exp_avg.lerp_(low, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    normed = (exp_avg / (1 - beta1**step)).div_(denom)  # N
    reduce = -2 if left else -1  # over the subspace coordinates: one value per channel
    low_norm = torch.linalg.vector_norm(low, dim=reduce, keepdim=True)
    scale = torch.linalg.vector_norm(normed, dim=reduce, keepdim=True).div_(low_norm + eps)  # phi
    if not limited:
        return low, normed, scale, None
    gram = (proj @ proj.mT).mul_(c)  # K (r, r)
    projected = (gram @ low if left else low @ gram).mul_(low).sum(dim=reduce, keepdim=True)
    remainder = sum_of_squares(g, reduce)
    remainder.sub_(low_norm.square_(), alpha=2).add_(projected).clamp_(min=0)
    return low, normed, scale, remainder.mul_(scale).mul_(scale)


def _subspace_finish(
    g: Tensor,
    parts: tuple[Tensor, Tensor, Tensor, Tensor | None],
    previous: Tensor | None,
    energy: Tensor | None,  # ||E||^2 before the limiter: the per-channel parts' sum
    proj: Tensor,
    side: str,
    *,
    growth_limit: float | None,
    overwrite: bool,
    apply_to: Tensor | None,
    lr: float,
) -> Tensor | None:
    """Second half of :func:`_subspace_adam_direction`: the limiter, then the direction."""
    low, normed, scale, _ = parts
    root = math.sqrt(proj.shape[-2] / proj.shape[-1])
    if growth_limit is not None:
        assert previous is not None and energy is not None
        e = energy.sqrt_()  # ||E||
        ratio = e / previous.clamp(min=torch.finfo(e.dtype).tiny)
        factor = torch.where(previous > 0, ratio.clamp(min=growth_limit) / growth_limit, 1.0)
        scale.div_(factor.view(*factor.shape, 1, 1))  # s = phi / f
        previous.copy_(e / factor)
    inside = normed.sub_(low.mul_(scale)).mul_(root)  # sqrt(c) (N - R diag(s))
    a, b = (proj.mT, inside) if side == "left" else (inside, proj)
    if apply_to is not None:
        apply_to.addcmul_(g, scale, value=-lr).addmm_(a, b, alpha=-lr)
        return None
    if not overwrite:
        raise ValueError("_subspace_adam_direction needs overwrite=True or apply_to")
    return g.mul_(scale).baddbmm_(a, b) if g.dim() == 3 else g.mul_(scale).addmm_(a, b)


class FloraAdamW(FloraOptimizerBase):
    r"""AdamW with the first moment compressed by resampled random projections.

    See the module docstring for the math and deviations. The options ``rank``, ``kappa``,
    ``seed``, ``compress``, ``exclude``, ``side``, ``momentum_variant``, ``distribution``,
    ``basis_dtype``, ``moment_dtype``, ``nonfinite``, ``rounding``, ``cache_projection``,
    ``foreach``, ``maximize``, ``check_replicas`` and ``compiled`` are those of
    :class:`flora.Flora`
    (``foreach`` stacks the subspace preconditioner's compressed matrices of one shape,
    :func:`subspace_adam_bucket_update_`, their seeded projections generated together).

    Args:
        params: parameters, ``model.named_parameters()`` or parameter groups; groups may
            override every option below.
        lr: learning rate :math:`\gamma`. Default ``1e-3``.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``. Default ``(0.9, 0.999)``.
        eps: added to the denominator. Default ``1e-8``.
        weight_decay: decoupled weight decay :math:`\lambda`. Default ``1e-2``.
        factor_second_moment: keep :math:`v` as Adafactor's row/column factors for tensors
            with >= 2 dims (sublinear memory) instead of full size. Default ``False``.
        preconditioner: ``"subspace"`` (default, chosen by the quality study: both moments
            of a compressed matrix kept in the projection's subspace and the remainder
            scaled, GaLore + Fira; module docstring) or ``"elementwise"`` (Adam's division by
            the second moment of the exact gradient, per coordinate, the only form before).
            ``"subspace"`` needs
            ``momentum_variant="subspace"``, an orthonormal ``distribution``
            (``"orthonormal"``, ``"coordinates"`` or ``"gradient"``); parameters left
            uncompressed, and all of them with ``betas[0] = 0`` (no first moment, nothing
            compressed), keep the elementwise form, so the limits of ``torch.optim.AdamW``
            hold with it too.
        growth_limit: the norm-growth limiter :math:`\gamma` of ``"subspace"``'s remainder
            (Fira's 1.01, default), or ``None`` for no limit.

    Example:
        >>> import torch, flora
        >>> model = torch.nn.Linear(64, 48)
        >>> opt = flora.FloraAdamW(model.named_parameters(), lr=1e-3, rank=8)
        >>> model(torch.randn(4, 64)).square().mean().backward()
        >>> opt.step()
        >>> print(opt.plan())  # doctest: +ELLIPSIS
        FloraAdamW plan: 1/2 compressed
        ...
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        factor_second_moment: bool = False,
        preconditioner: str = "subspace",
        growth_limit: float | None = 1.01,
        rank: int = 32,
        kappa: int = 1000,
        seed: int = 0,
        compress: bool = True,
        exclude: str | Iterable[str] | None = None,
        side: str = "auto",
        momentum_variant: str = "subspace",
        distribution: str = "orthonormal",
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
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{where}betas must be a tuple (beta1, beta2), got {betas!r}")
        check_real(f"{where}betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_real(f"{where}betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_real(f"{where}eps", group["eps"], 0.0, float("inf"), high_open=False)
        check_bool(f"{where}factor_second_moment", group["factor_second_moment"])
        preconditioner = group["preconditioner"]
        check_choice(f"{where}preconditioner", preconditioner, PRECONDITIONERS)
        if group["growth_limit"] is not None:
            check_real(f"{where}growth_limit", group["growth_limit"], 1.0, math.inf,
                       high_open=False)  # fmt: skip
        if preconditioner == "subspace":
            needs = [
                (group["momentum_variant"] == "subspace", "momentum_variant='subspace'"),
                (group["distribution"] in ORTHONORMAL, f"a distribution in {ORTHONORMAL}"),
            ]
            for ok, what in needs:
                if not ok:
                    raise ValueError(
                        f"{where}preconditioner='subspace' (FloraAdamW's default) needs {what}; "
                        "pass preconditioner='elementwise' for the other forms"
                    )

    _bucket_moments = ("exp_avg", "exp_avg_sq", "residual_norm")

    def _bucket_eligible(self, group: dict[str, Any], state: dict[str, Any]) -> bool:
        # the subspace preconditioner's compressed matrices only: the elementwise form and
        # uncompressed parameters stay in the loop (torch's AdamW bit for bit there)
        return (
            group["preconditioner"] == "subspace"
            and "exp_avg_sq" in state
            and group["betas"][0] != 0
        )

    def _update_bucket(self, group: dict[str, Any], b: Bucket) -> None:
        beta1, beta2 = (float(x) for x in group["betas"])
        self._bucket_function(subspace_adam_bucket_update_)(
            b.params,
            b.grads,
            b.stacks,
            b.proj,
            step=b.step,
            side=b.side,
            lr=self._bucket_lr(group, b),
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            growth_limit=group["growth_limit"],
        )

    def _subspace(self, group: dict[str, Any], d: Decision) -> bool:
        """Whether ``preconditioner="subspace"`` applies to a parameter with policy ``d``: a
        compressed matrix with a first moment (``betas[0] = 0`` compresses nothing)."""
        return group["preconditioner"] == "subspace" and d.compressed and group["betas"][0] > 0

    def _uses_momentum(self, group: dict[str, Any]) -> bool:
        return group["betas"][0] > 0

    def _beta1(self, group: dict[str, Any]) -> float:
        return float(group["betas"][0])

    def _second_moment_shapes(
        self, group: dict[str, Any], d: Decision
    ) -> dict[str, tuple[int, ...]]:
        shape = d.shape
        if self._subspace(group, d):
            return {"exp_avg_sq": d.state_shape, "residual_norm": ()}  # type: ignore[dict-item]
        if group["factor_second_moment"] and len(shape) >= 2:
            return {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, shape[-1])}
        return {"exp_avg_sq": shape}

    def _update(
        self,
        p: Tensor,
        grad: Tensor,
        group: dict[str, Any],
        name: str,
        state: dict[str, Any],
        *,
        scratch: bool = False,  # whether grad may be overwritten (used by Flora only)
    ) -> ShardSums:
        beta1, beta2 = (float(b) for b in group["betas"])
        first = "step" not in state
        if first:
            state["step"] = 0
        projections = yield from self._momentum_inputs(p, group, name, state, beta1, grad)
        common = dict(
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
        )
        if projections is not None and group["preconditioner"] == "subspace":
            if first:
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                state["residual_norm"] = torch.zeros((), dtype=p.dtype, device=p.device)
            body = _subspace_adam_step(
                p, grad, state, projections=projections, growth_limit=group["growth_limit"],
                sharded=self._shards is not None, **common,  # type: ignore[arg-type]
            )  # fmt: skip
        else:
            if first:
                if group["factor_second_moment"] and grad.dim() > 1:
                    state["row_var"], state["col_var"] = factored_zeros(grad)
                else:
                    state["exp_avg_sq"] = torch.zeros_like(
                        grad, memory_format=torch.preserve_format
                    )
            body = _adamw_step(
                p, grad, state, projections=projections,
                momentum_variant=group["momentum_variant"], shards=self._shards,
                **common,  # type: ignore[arg-type]
            )  # fmt: skip
        yield from body  # asks for sums only on an FSDP2 shard
