r"""``FloraSGD``: SGD whose momentum buffer is compressed in a resampled subspace.

Math (one parameter, step :math:`t \ge 1`, the symbols of :class:`torch.optim.SGD`: step size
:math:`\gamma`, momentum :math:`\mu`, dampening :math:`\tau`, L2 weight decay :math:`\lambda`):

.. math::
    g_t &\leftarrow g_t + \lambda\,\theta_{t-1}\\
    b_t &= g_1 \ (t = 1), \qquad b_t = \mu\, b_{t-1} + (1 - \tau)\, g_t\\
    d_t &= g_t + \mu\, b_t \ \text{(nesterov)}, \qquad d_t = b_t \ \text{(otherwise)}\\
    \theta_t &= \theta_{t-1} - \gamma\, d_t

For a matrix the policy compresses, the buffer is kept inside the projection's subspace
(:mod:`flora.momentum`, the subspace form; :math:`c = r/d`, :math:`\Pi = c\,P^\top P`), and
outside it the buffer is the current gradient itself (no state):

.. math::
    M &\leftarrow c\,\operatorname{transfer}_{P \to P'}(M)
        \quad\text{(only when the window changes)}\\
    M_1 &= \operatorname{down}(g_1),\qquad
    M_t = \mu M_{t-1} + (1 - \tau)\operatorname{down}(g_t)\\
    b_t &= (I - \Pi)\, g_t + c\operatorname{up}(M_t)

and :math:`d_t` as above. State per compressed matrix: ``exp_avg`` (:math:`M`, the
compressed shape, ``r * n`` numbers on the left side) and, with the default
``distribution="gradient"``, the basis (``r * d``). Limits: ``compress=False`` (and every
vector) is ``torch.optim.SGD`` bit for bit in float32 on CPU (the buffer is ``exp_avg``,
torch's ``momentum_buffer``); ``momentum=0`` keeps no state and is plain SGD; an orthonormal
basis of rank ``d`` gives the full buffer.

Not in the Flora paper; stated: the split is FRUGAL's (Zmushko et al., 2024) — a state-full
subspace and a state-free remainder — so with ``dampening=0`` the subspace's directions are
stepped by up to :math:`\gamma/(1-\mu)` and the remainder by :math:`\gamma`; only the subspace
form is offered (``momentum_variant="subspace"``), the one the quality study chose.
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
from flora.options import check_bool, check_real
from flora.policy import Decision
from flora.projection import down
from flora.reductions import ShardSums

__all__ = ["FloraSGD", "flora_sgd_bucket_update_", "flora_sgd_update_"]


def flora_sgd_update_(
    param: Tensor,  # updated in place; float32/float64 (callers upcast fp16/bf16)
    grad: Tensor,  # same shape and dtype as param
    state: dict[str, Any],  # step:int, exp_avg (full or compressed) when momentum > 0
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    projections: tuple[Tensor, Tensor | None, str] | None,  # (P, P_next, side) if compressed
) -> None:
    """One FloraSGD step for one parameter; ``torch.optim.SGD``'s op order when uncompressed."""
    state["step"] += 1
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum == 0:
        param.add_(grad, alpha=-lr)
        return
    buf = state["exp_avg"]
    if projections is None:
        if state["step"] == 1:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        direction = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(direction, alpha=-lr)
        return
    proj, proj_next, side = projections
    if proj_next is not None:
        subspace_transfer_(buf, proj, proj_next, side)
        proj = proj_next
    g = grad.reshape(param.shape[0], math.prod(param.shape[1:]))
    direction = _subspace_direction(
        g, buf, proj, side, first=state["step"] == 1, momentum=momentum, dampening=dampening,
        nesterov=nesterov,
    )  # fmt: skip
    param.add_(direction.view_as(param), alpha=-lr)


def flora_sgd_bucket_update_(
    params: list[Tensor],  # B matrices (m, n), updated in place; float32/float64
    grads: Tensor,  # (B, m, n): their gradients, stacked; overwritten
    stacks: dict[str, Tensor],  # exp_avg (B, compressed shape)
    proj: Tensor,  # (B, r, d): each matrix's basis of this step
    *,
    side: str,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> None:
    """:func:`flora_sgd_update_` for a bucket of compressed same-shaped matrices past their
    first step, in a step that starts no window (``foreach``): the same formulas batched."""
    if weight_decay != 0:
        grads.add_(torch.stack(params), alpha=weight_decay)
    direction = _subspace_direction(
        grads, stacks["exp_avg"], proj, side, first=False, momentum=momentum,
        dampening=dampening, nesterov=nesterov,
    )  # fmt: skip
    add_scaled_(params, direction, lr)


def _subspace_direction(
    g: Tensor,  # (m, n), or a stack (B, m, n)
    buf: Tensor,
    proj: Tensor,
    side: str,
    *,
    first: bool,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> Tensor:
    fresh = down(g, proj, side)
    if first:
        buf.copy_(fresh)
    else:
        buf.mul_(momentum).add_(fresh, alpha=1 - dampening)
    if nesterov:  # g + mu * b = (1 + mu)(I - Pi) g + c up(down(g) + mu M)
        inside = fresh.add(buf, alpha=momentum)
        return subspace_direction(g, inside, fresh, proj, side, outside=1 + momentum)
    return subspace_direction(g, buf, fresh, proj, side)


class FloraSGD(FloraOptimizerBase):
    r"""SGD with the momentum buffer compressed in a resampled subspace.

    See the module docstring for the math. The options ``rank``, ``kappa``, ``seed``,
    ``compress``, ``exclude``, ``side``, ``momentum_variant``, ``distribution``,
    ``basis_dtype``, ``moment_dtype``, ``nonfinite``, ``rounding``,
    ``cache_projection``, ``foreach``, ``maximize``, ``check_replicas`` and ``compiled``
    are those of
    :class:`flora.Flora` (``foreach``: :func:`flora_sgd_bucket_update_`);
    ``momentum_variant`` takes ``"subspace"`` only (the split this optimizer is defined by;
    the other forms raise ValueError).

    Args:
        params: parameters, ``model.named_parameters()`` or parameter groups; groups may
            override every option below.
        lr: step size :math:`\gamma`. Default ``1e-3`` (torch's).
        momentum: :math:`\mu` in ``[0, 1)``. Default ``0.9`` (torch's is 0, which keeps no
            state and compresses nothing).
        dampening: :math:`\tau` in ``[0, 1]``. Default ``0``.
        weight_decay: L2 penalty :math:`\lambda` added to the gradient. Default ``0``.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening = 0``).

    Example:
        >>> import torch, flora
        >>> model = torch.nn.Linear(64, 48)
        >>> opt = flora.FloraSGD(model.named_parameters(), lr=0.1, rank=8)
        >>> model(torch.randn(4, 64)).square().mean().backward()
        >>> opt.step()
        >>> tuple(opt.state[model.weight]["exp_avg"].shape)
        (8, 64)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
        check_real(f"{where}momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_real(f"{where}dampening", group["dampening"], 0.0, 1.0, high_open=False)
        check_bool(f"{where}nesterov", group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}nesterov needs momentum > 0 and dampening = 0")
        if group["momentum_variant"] != "subspace":
            raise ValueError(
                f"{where}momentum_variant must be 'subspace' for FloraSGD, "
                f"got {group['momentum_variant']!r}"
            )

    def _uses_momentum(self, group: dict[str, Any]) -> bool:
        return group["momentum"] > 0

    def _beta1(self, group: dict[str, Any]) -> float:
        return float(group["momentum"])

    def _second_moment_shapes(
        self, group: dict[str, Any], d: Decision
    ) -> dict[str, tuple[int, ...]]:
        return {}

    _bucket_moments = ("exp_avg",)

    def _bucket_eligible(self, group: dict[str, Any], state: dict[str, Any]) -> bool:
        return group["momentum"] > 0  # the base takes compressed momenta only

    def _update_bucket(self, group: dict[str, Any], b: Bucket) -> None:
        self._bucket_function(flora_sgd_bucket_update_)(
            b.params,
            b.grads,
            b.stacks,
            b.proj,
            side=b.side,
            lr=self._bucket_lr(group, b),
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            nesterov=bool(group["nesterov"]),
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
        momentum = float(group["momentum"])
        projections = yield from self._momentum_inputs(p, group, name, state, momentum, grad)
        flora_sgd_update_(
            p,
            grad,
            state,
            lr=float(group["lr"]),
            momentum=momentum,
            dampening=float(group["dampening"]),
            nesterov=bool(group["nesterov"]),
            weight_decay=float(group["weight_decay"]),
            projections=projections,
        )
