r"""Compressed exponential moving average (the paper's Algorithm 2), as a pure tensor function.

State: a compressed momentum :math:`M` (``(r, n)`` on the left side, ``(m, r)`` on the right)
that lives in the basis of the projection :math:`P` of its window. At every step, with
:math:`u_t` the update the base optimizer applies momentum to, :math:`P'` the projection of
the current window (equal to :math:`P` unless the window just changed) and
:math:`\operatorname{down}, \operatorname{up}` from :mod:`flora.projection`:

``variant="paper"`` — Algorithm 2 as printed:

.. math::
    M &\leftarrow \operatorname{transfer}_{P \to P'}(M) \quad\text{(only if } P' \ne P)\\
    M &\leftarrow \beta M + (1 - \beta)\operatorname{down}_{P'}(u_t)\\
    d_t &= \operatorname{up}_{P'}(M)

``variant="history"`` (default; what flora-opt's PyTorch code does) — the newest term enters
exactly and only the history is compressed, which has the same expectation and less variance:

.. math::
    d_t &= (1 - \beta) u_t + \beta \operatorname{up}_{P}(M)\\
    M &\leftarrow \operatorname{transfer}_{P \to P'}(M) \quad\text{(only if } P' \ne P)\\
    M &\leftarrow \beta M + (1 - \beta)\operatorname{down}_{P'}(u_t)

:math:`d_t` is the direction the optimizer then scales and applies.
"""

from __future__ import annotations

from torch import Tensor

from flora.projection import down, transfer, up

__all__ = ["VARIANTS", "compressed_ema_"]

VARIANTS: tuple[str, ...] = ("history", "paper")


def compressed_ema_(
    update: Tensor,  # (m, n) matrix view of u_t, float32 or float64
    momentum: Tensor,  # (r, n) left / (m, r) right; modified in place
    *,
    beta: float,
    proj_old: Tensor,  # (r, m) left / (r, n) right: basis ``momentum`` is stored in
    proj_new: Tensor,  # same shape: basis of the current window (may be ``proj_old``)
    side: str,
    variant: str = "history",
) -> Tensor:
    """Advance the compressed momentum by one step and return the direction ``d_t`` (m, n)."""
    resampled = proj_new is not proj_old
    if variant == "history":
        direction = up(momentum, proj_old, side).mul_(beta).add_(update, alpha=1 - beta)
        if resampled:
            momentum.copy_(transfer(momentum, proj_old, proj_new, side))
        momentum.mul_(beta).add_(down(update, proj_new, side), alpha=1 - beta)
        return direction
    if variant == "paper":
        if resampled:
            momentum.copy_(transfer(momentum, proj_old, proj_new, side))
        momentum.mul_(beta).add_(down(update, proj_new, side), alpha=1 - beta)
        return up(momentum, proj_new, side)
    raise ValueError(f"momentum_variant must be one of {VARIANTS}, got {variant!r}")
