r"""``FloraLion``: Lion whose momentum is compressed in a resampled subspace.

Math (one parameter, step :math:`t \ge 1`; Chen et al., 2023, "Symbolic Discovery of
Optimization Algorithms", Program 1: step size :math:`\gamma`, decoupled weight decay
:math:`\lambda`):

.. math::
    c_t &= \operatorname{sign}\bigl(\beta_1 m_{t-1} + (1 - \beta_1)\, g_t\bigr)\\
    \theta_t &= \theta_{t-1}(1 - \gamma\lambda) - \gamma\, c_t\\
    m_t &= \beta_2 m_{t-1} + (1 - \beta_2)\, g_t \qquad (m_0 = 0)

For a matrix the policy compresses, the momentum is kept inside the projection's subspace
(:mod:`flora.momentum`, the subspace form; :math:`c = r/d`, :math:`\Pi = c\,P^\top P`), and
outside it the momentum is the current gradient itself (no state), so the interpolation
there is :math:`g_t`:

.. math::
    M &\leftarrow c\,\operatorname{transfer}_{P \to P'}(M)
        \quad\text{(only when the window changes)}\\
    c_t &= \operatorname{sign}\Bigl((I - \Pi)\, g_t
        + c\operatorname{up}\bigl(\beta_1 M_{t-1}
        + (1 - \beta_1)\operatorname{down}(g_t)\bigr)\Bigr)\\
    M_t &= \beta_2 M_{t-1} + (1 - \beta_2)\operatorname{down}(g_t)

State per compressed matrix: ``exp_avg`` (:math:`M`, ``r * n`` numbers on the left side)
and, with the default ``distribution="gradient"``, the basis (``r * d``). Limits:
``compress=False`` (and every vector) is Lion as published (tested against a float64 loop of
the formula); ``betas[0] = 0`` is signSGD and keeps no state; an orthonormal basis of rank
``d`` gives the full momentum.

Not in the Flora paper; stated: the split into a state-full subspace and a state-free
remainder is FRUGAL's (Zmushko et al., 2024), and only the subspace form is offered
(``momentum_variant="subspace"``), the one the quality study chose. Lion's update has the
same magnitude in every coordinate, so the usual step size is 3-10x smaller than AdamW's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from flora.momentum import subspace_direction, subspace_transfer_
from flora.optim.base import FloraOptimizerBase, group_defaults
from flora.optim.buckets import Bucket, add_scaled_
from flora.options import check_real
from flora.policy import Decision
from flora.projection import down
from flora.reductions import ShardSums

__all__ = ["FloraLion", "flora_lion_bucket_update_", "flora_lion_update_"]


def flora_lion_update_(
    param: Tensor,  # updated in place; float32/float64 (callers upcast fp16/bf16)
    grad: Tensor,  # same shape and dtype as param
    state: dict[str, Any],  # step:int, exp_avg (full or compressed) when beta1 > 0
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    projections: tuple[Tensor, Tensor | None, str] | None,  # (P, P_next, side) if compressed
) -> None:
    """One FloraLion step for one parameter."""
    state["step"] += 1
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    if beta1 == 0:  # signSGD: the momentum is never read
        param.add_(grad.sign(), alpha=-lr)
        return
    exp_avg = state["exp_avg"]
    if projections is None:
        direction = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
        param.add_(direction, alpha=-lr)
        exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return
    proj, proj_next, side = projections
    if proj_next is not None:
        subspace_transfer_(exp_avg, proj, proj_next, side)
        proj = proj_next
    g = grad.reshape(param.shape[0], math.prod(param.shape[1:]))
    direction = _subspace_sign(g, exp_avg, proj, side, beta1=beta1, beta2=beta2)
    param.add_(direction.view_as(param), alpha=-lr)


def flora_lion_bucket_update_(
    params: list[Tensor],  # B matrices (m, n), updated in place; float32/float64
    grads: Tensor,  # (B, m, n): their gradients, stacked; overwritten
    stacks: dict[str, Tensor],  # exp_avg (B, compressed shape)
    proj: Tensor,  # (B, r, d): each matrix's basis of this step
    *,
    side: str,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """:func:`flora_lion_update_` for a bucket of compressed same-shaped matrices in a step
    that starts no window (``foreach``): the same formulas batched."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    direction = _subspace_sign(grads, stacks["exp_avg"], proj, side, beta1=beta1, beta2=beta2)
    add_scaled_(params, direction, lr)


def _subspace_sign(
    g: Tensor, exp_avg: Tensor, proj: Tensor, side: str, *, beta1: float, beta2: float
) -> Tensor:
    fresh = down(g, proj, side)
    inside = exp_avg.mul(beta1).add_(fresh, alpha=1 - beta1)
    exp_avg.mul_(beta2).add_(fresh, alpha=1 - beta2)
    return subspace_direction(g, inside, fresh, proj, side).sign_()


class FloraLion(FloraOptimizerBase):
    r"""Lion with the momentum compressed in a resampled subspace.

    See the module docstring for the math. The options ``rank``, ``kappa``, ``seed``,
    ``compress``, ``exclude``, ``side``, ``momentum_variant``, ``distribution``,
    ``basis_dtype``, ``moment_dtype``, ``nonfinite``, ``rounding``,
    ``cache_projection``, ``foreach``, ``maximize``, ``check_replicas`` and ``compiled``
    are those of
    :class:`flora.Flora` (``foreach``: :func:`flora_lion_bucket_update_`);
    ``momentum_variant`` takes ``"subspace"`` only (the split this optimizer is defined by;
    the other forms raise ValueError).

    Args:
        params: parameters, ``model.named_parameters()`` or parameter groups; groups may
            override every option below.
        lr: step size :math:`\gamma`. Default ``1e-4``.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``: the interpolation of the
            update and the momentum's decay. Default ``(0.9, 0.99)`` (the paper's).
        weight_decay: decoupled weight decay :math:`\lambda`. Default ``0``.

    Example:
        >>> import torch, flora
        >>> model = torch.nn.Linear(64, 48)
        >>> opt = flora.FloraLion(model.named_parameters(), lr=1e-4, rank=8)
        >>> model(torch.randn(4, 64)).square().mean().backward()
        >>> opt.step()
        >>> tuple(opt.state[model.weight]["exp_avg"].shape)
        (8, 64)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
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
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{where}betas must be a tuple (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            check_real(f"{where}betas[{i}]", beta, 0.0, 1.0, high_open=True)
        if group["momentum_variant"] != "subspace":
            raise ValueError(
                f"{where}momentum_variant must be 'subspace' for FloraLion, "
                f"got {group['momentum_variant']!r}"
            )

    def _uses_momentum(self, group: dict[str, Any]) -> bool:
        return group["betas"][0] > 0

    def _beta1(self, group: dict[str, Any]) -> float:
        return float(group["betas"][1])  # the momentum's decay: what the policy's growth needs

    def _second_moment_shapes(
        self, group: dict[str, Any], d: Decision
    ) -> dict[str, tuple[int, ...]]:
        return {}

    _bucket_moments = ("exp_avg",)

    def _bucket_eligible(self, group: dict[str, Any], state: dict[str, Any]) -> bool:
        return group["betas"][0] > 0  # the base takes compressed momenta only

    def _update_bucket(self, group: dict[str, Any], b: Bucket) -> None:
        beta1, beta2 = (float(x) for x in group["betas"])
        self._bucket_function(flora_lion_bucket_update_)(
            b.params,
            b.grads,
            b.stacks,
            b.proj,
            side=b.side,
            lr=self._bucket_lr(group, b),
            beta1=beta1,
            beta2=beta2,
            weight_decay=float(group["weight_decay"]),
        )

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
        if "step" not in state:
            state["step"] = 0
        beta1, beta2 = (float(b) for b in group["betas"])
        projections = yield from self._momentum_inputs(p, group, name, state, beta1, grad)
        flora_lion_update_(
            p,
            grad,
            state,
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            weight_decay=float(group["weight_decay"]),
            projections=projections,
        )
