"""Float64 loop implementations of the paper's algorithms, written from the formulas.

Deliberately naive: explicit per-step formulas on float64 matrices, no in-place tricks, the
transfer computed as ``A' (A^T M)`` (two products, as printed) rather than through the r x r
product the library uses. Projections are passed in, so the reference shares only the
random matrices with the code under test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor


def _down(x: Tensor, a: Tensor, side: str) -> Tensor:
    return a @ x if side == "left" else x @ a.T


def _up(c: Tensor, a: Tensor, side: str) -> Tensor:
    return a.T @ c if side == "left" else c @ a


def _rms(x: Tensor) -> float:
    return float(torch.sqrt((x * x).mean()))


class CompressedMomentum:
    """Algorithm 2 for one matrix: M lives in the basis A_w of window w = floor(t / kappa)."""

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        beta: float,
        kappa: int,
        side: str | None,
        projection: Callable[[int], Tensor] | None,
        variant: str,
    ) -> None:
        self.beta, self.kappa, self.side, self.variant = beta, kappa, side, variant
        self.projection = projection
        self.window = 0
        if side is None:  # uncompressed (naive) momentum
            self.m = torch.zeros(shape, dtype=torch.float64)
        else:
            a = projection(0)
            rank = a.shape[0]
            self.m = torch.zeros(
                (rank, shape[1]) if side == "left" else (shape[0], rank), dtype=torch.float64
            )

    def __call__(self, t: int, u: Tensor) -> Tensor:
        b = self.beta
        if self.side is None:
            self.m = b * self.m + (1 - b) * u
            return self.m
        a_old = self.projection(self.window)
        window = t // self.kappa
        a_new = self.projection(window) if window != self.window else a_old
        if self.variant == "subspace":  # momentum inside the row space, u exact outside
            c = a_new.shape[0] / a_new.shape[1]  # r / d: c A^T A is the projector (orthonormal A)
            if window != self.window:
                self.m = c * _down(_up(self.m, a_old, self.side), a_new, self.side)
                self.window = window
            self.m = b * self.m + (1 - b) * _down(u, a_new, self.side)
            in_subspace = c * _up(_down(u, a_new, self.side), a_new, self.side)
            self.parts = (u - in_subspace, c * _up(self.m, a_new, self.side))
            return self.parts[0] + self.parts[1]
        if self.variant == "history":
            direction = (1 - b) * u + b * _up(self.m, a_old, self.side)
        if window != self.window:  # "if t is a multiple of kappa": transfer M <- A'(A^T M)
            self.m = _down(_up(self.m, a_old, self.side), a_new, self.side)
            self.window = window
        self.m = b * self.m + (1 - b) * _down(u, a_new, self.side)
        if self.variant == "paper":
            direction = _up(self.m, a_new, self.side)
        return direction


def range_basis(x: Tensor, rank: int, side: str, sketch: Tensor, power_iterations: int) -> Tensor:
    """Halko, Martinsson & Tropp (2011), Algorithms 4.4 + 5.1, float64, as printed: the
    projector's rows (scaled by sqrt(d / r)) onto the dominant rank-r range of x (left: its
    columns; right: its rows); ``sketch`` is the (k, other) Gaussian test matrix."""
    a = x.double() if side == "left" else x.double().T
    omega = sketch.double().T  # (other, k)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iterations):
        q_hat = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q_hat).Q
    b = q.T @ a
    u_b = torch.linalg.svd(b, full_matrices=False).U
    basis = q @ u_b[:, :rank]  # (d, r), orthonormal columns
    return (basis * (a.shape[0] / rank) ** 0.5).T


def flora_adafactor(
    theta: Tensor,
    grads: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2_decay: float,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    momentum: CompressedMomentum | None,
    factored: bool = True,
    scale_parameter: bool = True,
    relative_step: bool = True,
) -> Tensor:
    """Adafactor (torch.optim.Adafactor's definition) with momentum of the preconditioned
    update, the momentum direction clipped (flora-opt's order, PyTorch and optax alike);
    ``scale_parameter`` / ``relative_step`` as in transformers.Adafactor."""
    theta = theta.double().clone()
    matrix = factored and theta.dim() == 2
    r = torch.zeros(theta.shape[0], dtype=torch.float64)
    c = torch.zeros(theta.shape[-1], dtype=torch.float64)
    v = torch.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        w = t**beta2_decay  # 1 - beta2_hat_t
        rho = min(lr, 1 / t**0.5) if relative_step else lr
        alpha = max(eps2, _rms(theta)) * rho if scale_parameter else rho
        theta = theta * (1 - lr * weight_decay)
        if matrix:
            r = (1 - w) * r + w * (g * g).mean(dim=1)
            c = (1 - w) * c + w * (g * g).mean(dim=0)
            v_hat = torch.outer(r, c) / max(float(r.mean()), eps1)
        else:
            v = (1 - w) * v + w * g * g
            v_hat = v
        u = g / torch.clamp(torch.sqrt(v_hat), min=eps1)
        direction = u if momentum is None else momentum(t, u)
        direction = direction / max(1.0, _rms(direction) / d)  # clipping after momentum
        theta = theta - alpha * direction
    return theta


def flora_adamw(
    theta: Tensor,
    grads: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    factored: bool,
    momentum: CompressedMomentum | None,
) -> Tensor:
    """AdamW (Loshchilov & Hutter) with the first moment from ``momentum``."""
    theta = theta.double().clone()
    v = torch.zeros_like(theta)
    r = torch.zeros(theta.shape[0], dtype=torch.float64)
    c = torch.zeros(theta.shape[-1], dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        theta = theta * (1 - lr * weight_decay)
        m = g if momentum is None else momentum(t, g)
        if factored:
            r = beta2 * r + (1 - beta2) * (g * g).mean(dim=1)
            c = beta2 * c + (1 - beta2) * (g * g).mean(dim=0)
            v = torch.outer(r, c) / float(r.mean())
        else:
            v = beta2 * v + (1 - beta2) * g * g
        if getattr(momentum, "variant", None) == "subspace" and momentum.side is not None:
            remainder, in_subspace = momentum.parts  # bias-correct the momentum term only
            m_hat = remainder + in_subspace / (1 - beta1**t)
        else:
            m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        theta = theta - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return theta


def subspace_adam(
    theta: Tensor,
    grads: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    side: str,
    kappa: int,
    projection: Callable[[int], Tensor],
    growth_limit: float | None,
) -> Tensor:
    """GaLore's Adam in the subspace plus Fira's scaled remainder and norm-growth limiter,
    with the moments transferred at a window change (FloraAdamW(preconditioner="subspace")).
    Written on the transposed matrix for the right side, with an explicit orthonormal basis."""
    theta = theta.double().clone()
    tr = side == "right"
    window, e_prev = 0, 0.0
    q = None
    m = v = None
    for t, g in enumerate(grads, start=1):
        g = g.double().T if tr else g.double()
        w = t // kappa
        q_new = projection(w).double()
        q_new = q_new * (q_new.shape[0] / q_new.shape[1]) ** 0.5  # orthonormal rows
        if m is None:
            m = torch.zeros(q_new.shape[0], g.shape[1], dtype=torch.float64)
            v = torch.zeros_like(m)
        elif w != window:  # coordinates in the new basis: T = Q' Q^T
            transfer = q_new @ q.T
            m = transfer @ m
            v = (transfer * transfer) @ v
        q, window = q_new, w
        theta = theta * (1 - lr * weight_decay)
        r = q @ g  # (rank, n)
        m = beta1 * m + (1 - beta1) * r
        v = beta2 * v + (1 - beta2) * r * r
        n = (m / (1 - beta1**t)) / (torch.sqrt(v / (1 - beta2**t)) + eps)
        phi = torch.linalg.vector_norm(n, dim=0) / (torch.linalg.vector_norm(r, dim=0) + eps)
        e = (g - q.T @ r) * phi  # column j scaled by phi_j
        if growth_limit is not None:
            norm = float(torch.linalg.vector_norm(e))
            f = max(norm / e_prev, growth_limit) / growth_limit if e_prev > 0 else 1.0
            e = e / f
            e_prev = norm / f
        update = q.T @ n + e
        theta = theta - lr * (update.T if tr else update)
    return theta


def compressed_accumulation(
    grads: Sequence[Tensor], a: Tensor | None, side: str | None, *, scale: float = 1.0
) -> Tensor:
    """Algorithm 1 for one matrix over one cycle: C = sum_i A G_i, G-hat = scale * A^T C.

    Written element by element over the micro-batches: C starts at zero, each G_i is
    compressed and added, and only at the end decompressed. ``side=None``: plain sum.
    """
    if side is None:
        total = torch.zeros_like(grads[0], dtype=torch.float64)
        for g in grads:
            total = total + g.double()
        return scale * total
    a = a.double()
    shape = grads[0].shape
    m = shape[0]
    n = grads[0].numel() // m
    c = torch.zeros((a.shape[0], n) if side == "left" else (m, a.shape[0]), dtype=torch.float64)
    for g in grads:
        c = c + _down(g.double().reshape(m, n), a, side)
    return (scale * _up(c, a, side)).reshape(shape)


def sketch_accumulation(
    grads: Sequence[Tensor], omega: Tensor, psi: Tensor, side: str, *, scale: float = 1.0
) -> Tensor:
    """The low-rank sketch over one cycle in the generalized Nystrom form: with a_i the
    matrix as (kept, compressed), Y = sum_i a_i Omega^T and W = sum_i Psi a_i built one
    micro-batch at a time, G-hat = scale * Y (Psi Y)^+ W (equal to Q (Psi Q)^+ W when Y has
    full column rank), through an SVD-based pseudo-inverse."""
    shape = grads[0].shape
    m = shape[0]
    n = grads[0].numel() // m
    omega, psi = omega.double(), psi.double()
    y = w = None
    for g in grads:
        a = g.double().reshape(m, n)
        a = a if side == "right" else a.T
        y = a @ omega.T if y is None else y + a @ omega.T
        w = psi @ a if w is None else w + psi @ a
    approx = y @ torch.linalg.pinv(psi @ y) @ w
    return (scale * (approx if side == "right" else approx.T)).reshape(shape)


def _projector(a: Tensor) -> Tensor:
    """The orthogonal projector c A^T A onto the row space of an orthonormal A (r x d)."""
    return (a.shape[0] / a.shape[1]) * a.T @ a


def _on_side(pi: Tensor, x: Tensor, side: str) -> Tensor:
    return pi @ x if side == "left" else x @ pi


def subspace_sgd(
    theta: Tensor,
    grads: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    side: str | None,
    kappa: int,
    projection: Callable[[int], Tensor] | None,
) -> Tensor:
    """torch SGD's buffer inside the subspace of window floor(t / kappa), the gradient outside.

    Written in the full space: the buffer's subspace part is a full matrix ``b_in`` that the
    window change projects onto the new subspace, ``b = (I - Pi) g + b_in``.
    """
    theta = theta.clone()
    b = b_in = None
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * theta
        if side is None:
            b = g.clone() if t == 1 else momentum * b + (1 - dampening) * g
        else:
            pi = _projector(projection(t // kappa))
            if b_in is not None and t % kappa == 0:
                b_in = _on_side(pi, b_in, side)
            pg = _on_side(pi, g, side)
            b_in = pg if t == 1 else momentum * b_in + (1 - dampening) * pg
            b = g - pg + b_in
        d = g + momentum * b if nesterov else b
        theta = theta - lr * d
    return theta


def subspace_lion(
    theta: Tensor,
    grads: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    side: str | None,
    kappa: int,
    projection: Callable[[int], Tensor] | None,
) -> Tensor:
    """Lion (Chen et al., 2023, Program 1) with its momentum inside the subspace of window
    floor(t / kappa) and the gradient itself outside, written in the full space."""
    theta = theta.clone()
    m = torch.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        theta = theta * (1 - lr * weight_decay)
        if side is None:
            c = torch.sign(beta1 * m + (1 - beta1) * g)
            m = beta2 * m + (1 - beta2) * g
        else:
            pi = _projector(projection(t // kappa))
            if t % kappa == 0:
                m = _on_side(pi, m, side)
            pg = _on_side(pi, g, side)
            c = torch.sign(g - pg + beta1 * m + (1 - beta1) * pg)
            m = beta2 * m + (1 - beta2) * pg
        theta = theta - lr * c
    return theta


_PHILOX_M, _PHILOX_W, _MASK32 = (0xD2511F53, 0xCD9E8D57), (0x9E3779B9, 0xBB67AE85), 0xFFFFFFFF


def philox_python(ctr: Sequence[int], key: Sequence[int], rounds: int = 10) -> list[int]:
    """Philox4x32-R in Python integers, from Salmon et al. (SC 2011), Random123's order:
    the key is bumped before every round but the first."""
    c, (k0, k1) = list(ctr), key
    for r in range(rounds):
        if r > 0:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        p0, p1 = _PHILOX_M[0] * c[0], _PHILOX_M[1] * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> 32) ^ c[3] ^ k1, p0 & _MASK32]
    return c
