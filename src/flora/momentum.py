r"""Compressed exponential moving average (the paper's Algorithm 2), as a pure tensor function.

State: a compressed momentum :math:`M` (``(r, n)`` on the left side, ``(m, r)`` on the right)
that lives in the basis of the projection :math:`P` of its window. At every step, with
:math:`u_t` the update the base optimizer applies momentum to, :math:`P'` the projection of
the current window (``proj_next`` when the window changes at this step — the caller says so
by passing it —, otherwise :math:`P` itself) and
:math:`\operatorname{down}, \operatorname{up}` from :mod:`flora.projection`:

``variant="paper"`` — Algorithm 2 as printed:

.. math::
    M &\leftarrow \operatorname{transfer}_{P \to P'}(M)
        \quad\text{(only when the window changes)}\\
    M &\leftarrow \beta M + (1 - \beta)\operatorname{down}_{P'}(u_t)\\
    d_t &= \operatorname{up}_{P'}(M)

``variant="history"`` (what flora-opt's PyTorch code does) — the newest term enters
exactly and only the history is compressed, which has the same expectation and less variance:

.. math::
    d_t &= (1 - \beta) u_t + \beta \operatorname{up}_{P}(M)\\
    M &\leftarrow \operatorname{transfer}_{P \to P'}(M)
        \quad\text{(only when the window changes)}\\
    M &\leftarrow \beta M + (1 - \beta)\operatorname{down}_{P'}(u_t)

``variant="subspace"`` (the optimizers' default) — momentum only inside the projection's row
space, the exact update outside it. With :math:`c = r/d` (``d`` the compressed dimension),
:math:`c\,P^\top P` is the orthogonal projector :math:`\Pi` onto the row space when the
projection is orthonormal (:mod:`flora.projection`), and the transfer is the projection of the
old subspace's momentum onto the new one, which cannot inflate it:

.. math::
    M &\leftarrow c\,\operatorname{transfer}_{P \to P'}(M)
        \quad\text{(only when the window changes)}\\
    M &\leftarrow \beta M + (1 - \beta)\operatorname{down}_{P'}(u_t)\\
    d_t &= u_t + c\operatorname{up}_{P'}\bigl(M - \operatorname{down}_{P'}(u_t)\bigr)
        = (I - \Pi)\,u_t + c\operatorname{up}_{P'}(M)

This is not in the Flora paper: it is the split of FRUGAL (Zmushko et al., 2024) and of
LoRA-Pre-style mixing, a state-full subspace and a state-free remainder. Limits:
``beta=0`` gives :math:`d_t = u_t`; an orthonormal projection of rank ``d`` gives the full
momentum. With a Gaussian or Rademacher projection :math:`c\,P^\top P` is only
approximately a projector (its eigenvalues spread as Marchenko–Pastur), so the split is
approximate. With the optimizers' ``distribution="gradient"`` the basis is the dominant
subspace of the gradient at the window's first step (:func:`flora.projection.range_basis`,
GaLore's choice of subspace found by a randomized range finder instead of an SVD), so the
momentum covers the directions the gradients share; the transfer and the split are the same.

:math:`d_t` is the direction the optimizer then scales and applies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flora.projection import down, transfer

__all__ = ["VARIANTS", "compressed_ema_", "subspace_direction", "subspace_transfer_"]

VARIANTS: tuple[str, ...] = ("history", "paper", "subspace")


def subspace_transfer_(momentum: Tensor, proj_old: Tensor, proj_new: Tensor, side: str) -> Tensor:
    r"""Move a subspace state to a new window's basis in place: :math:`M \leftarrow
    c\,\operatorname{transfer}_{P \to P'}(M)`, the projection of the old subspace's vector
    onto the new subspace (orthonormal bases: it never inflates the state)."""
    shrink = proj_new.shape[-2] / proj_new.shape[-1]
    return momentum.copy_(transfer(momentum, proj_old, proj_new, side)).mul_(shrink)


def subspace_direction(
    update: Tensor,  # (m, n) u
    inside: Tensor,  # compressed shape: the direction's coordinates inside the subspace
    fresh: Tensor,  # down(u), same shape as ``inside``
    proj: Tensor,
    side: str,
    *,
    outside: float = 1.0,
    inside_scale: float = 1.0,
    overwrite: bool = False,
) -> Tensor:
    r""":math:`o\,(I - \Pi)\,u + c\operatorname{up}(k\,\text{inside})` with :math:`o` =
    ``outside`` and :math:`k` = ``inside_scale``, computed as :math:`o\,u +
    c\operatorname{up}(k\,\text{inside} - o\operatorname{down}(u))` without forming
    :math:`\Pi`. ``fresh`` is overwritten; with ``overwrite=True`` so is ``update``, with the
    result (no temporary of the parameter's size). Stacks ``(B, m, n)`` with stacked states
    and projections work matrix by matrix (batched products)."""
    shrink = proj.shape[-2] / proj.shape[-1]
    residual = fresh.mul_(-outside).add_(inside, alpha=inside_scale)
    a, b = (proj.mT, residual) if side == "left" else (residual, proj)
    if overwrite:
        return _mm_into(update, a, b, beta=outside, alpha=shrink)
    if update.dim() == 3:
        return torch.baddbmm(update, a, b, beta=outside, alpha=shrink)
    return torch.addmm(update, a, b, beta=outside, alpha=shrink)


def _mm_into(out: Tensor, a: Tensor, b: Tensor, *, beta: float, alpha: float) -> Tensor:
    # out <- beta * out + alpha * (a @ b), without a temporary of out's size (stacks: batched)
    if out.dim() == 3:
        return out.baddbmm_(a, b, beta=beta, alpha=alpha)
    return out.addmm_(a, b, beta=beta, alpha=alpha)


def compressed_ema_(
    update: Tensor,  # (m, n) matrix view of the raw update U; u_t = scale * U
    momentum: Tensor,  # (r, n) left / (m, r) right; modified in place
    *,
    beta: float,
    proj: Tensor,  # (r, m) left / (r, n) right: basis ``momentum`` is stored in
    proj_next: Tensor | None = None,  # same shape: the new window's basis, if it changes now
    side: str,
    variant: str = "subspace",
    scale: float = 1.0,
    overwrite: bool = False,
    momentum_scale: float = 1.0,
) -> Tensor:
    r"""Advance the compressed momentum by one step and return the direction ``d_t`` (m, n).

    ``u_t = scale * update`` (the scale lets a caller fold a clipping factor into the
    products). With ``overwrite=True`` the direction is written into ``update`` and no
    temporary of the parameter's size is allocated; otherwise ``update`` is left untouched.

    ``momentum_scale`` (subspace variant only) weighs the momentum term of the direction,
    :math:`d_t = (I - \Pi) u_t + k\,c\operatorname{up}(M)`; ``FloraAdamW`` passes its bias
    correction :math:`k = 1/(1 - \beta_1^t)` there, so that it applies to the momentum only.

    The momentum is transferred to a new basis exactly when ``proj_next`` is given; passing
    the current projection again (even an equal copy) would transfer it to itself, which is
    not the identity (:math:`P P^\top \ne I`), so the caller states the window change.
    """
    if variant not in VARIANTS:
        raise ValueError(f"momentum_variant must be one of {VARIANTS}, got {variant!r}")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if momentum_scale != 1.0 and variant != "subspace":
        raise ValueError("momentum_scale applies to variant='subspace' only")
    resampled = proj_next is not None
    proj_old = proj
    proj_new = proj_next if proj_next is not None else proj
    left = side == "left"
    w_new = (1 - beta) * scale  # weight of the newest update
    if variant == "history":
        fresh = down(update, proj_new, side)  # small: (r, n) or (m, r)
        a, b = (proj_old.T, momentum) if left else (momentum, proj_old)  # up(M, P_old) = a @ b
        if overwrite:
            direction = _mm_into(update, a, b, beta=w_new, alpha=beta)
        else:
            direction = torch.addmm(update, a, b, beta=w_new, alpha=beta)
        if resampled:
            momentum.copy_(transfer(momentum, proj_old, proj_new, side))
        momentum.mul_(beta).add_(fresh, alpha=w_new)
        return direction
    if variant == "subspace":
        if resampled:
            subspace_transfer_(momentum, proj_old, proj_new, side)
        fresh = down(update, proj_new, side)  # P' U
        momentum.mul_(beta).add_(fresh, alpha=w_new)
        return subspace_direction(
            update, momentum, fresh, proj_new, side,
            outside=scale, inside_scale=momentum_scale, overwrite=overwrite,
        )  # fmt: skip
    # variant == "paper"
    if resampled:
        momentum.copy_(transfer(momentum, proj_old, proj_new, side))
    if left:
        _mm_into(momentum, proj_new, update, beta=beta, alpha=w_new)
    else:
        _mm_into(momentum, update, proj_new.T, beta=beta, alpha=w_new)
    a, b = (proj_new.T, momentum) if left else (momentum, proj_new)
    return torch.mm(a, b, out=update) if overwrite else torch.mm(a, b)
