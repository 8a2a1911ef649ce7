r"""Flora as a gradient compressor for ``DistributedDataParallel``: a communication hook.

Each step, every matrix gradient :math:`G` (per the compress-or-not policy) in a DDP bucket is
compressed with the seeded projection :math:`P` of this step, the same on every rank
(:mod:`flora.projection`, stream ``"comm"``, window = iteration), the compressed buffers and
the uncompressed gradients are averaged with one all-reduce per bucket, and each gradient is
replaced by its decompression:

.. math::
    \hat G = \operatorname{up}_P\!\Big(\tfrac1W \sum_{w=1}^{W} \operatorname{down}_P(G_w)\Big)
          = \operatorname{up}_P\!\big(\operatorname{down}_P(\bar G)\big),
    \qquad \mathbb{E}_P[\hat G] = \bar G .

Like PowerSGD it cuts communication by about ``r / min(m, n)``, but it keeps no state, needs
no SVD or orthogonalisation, and is unbiased; the projection is resampled every step. Unlike
compressed *accumulation* (:class:`flora.GradientAccumulator`), the compression noise enters
every step's gradient, so it costs more quality per byte saved; the benchmark
``benchmarks/ddp_comm_hook.py`` measures how much.

Use::

    ddp = DistributedDataParallel(model)
    state = FloraCommState(ddp, rank=32)
    ddp.register_comm_hook(state, flora_comm_hook)

``FloraCommState.state_dict()`` holds the iteration counter (which selects the projections),
so a resumed run uses the same projections.
"""

# no ``from __future__ import annotations``: DDP checks the hook's annotations at runtime
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flora.options import state_dtype
from flora.policy import check_options, compile_patterns, decide, warn_unmatched_patterns
from flora.projection import GENERATOR, GENERATORS, down, parameter_key, projection_matrix, up
from flora.replicas import check_same_settings

__all__ = ["FloraCommState", "flora_comm_hook"]

STREAM = "comm"


class FloraCommState:
    """Settings, per-parameter decisions and the iteration counter of :func:`flora_comm_hook`.

    Args:
        ddp: the ``DistributedDataParallel`` module (parameters are keyed by their names in
            ``ddp.module``, so every rank draws the same projections).
        rank, seed, compress, exclude, side, distribution: as for
            :class:`flora.GradientAccumulator`.
    """

    def __init__(
        self,
        ddp: nn.parallel.DistributedDataParallel,
        *,
        rank: int = 32,
        seed: int = 0,
        compress: bool = True,
        exclude: str | list[str] | None = None,
        side: str = "auto",
        distribution: str = "gaussian",
    ) -> None:
        if not isinstance(ddp, nn.parallel.DistributedDataParallel):
            raise TypeError(
                f"ddp must be a DistributedDataParallel module, got {type(ddp).__name__}"
            )
        check_options(
            rank=rank, seed=seed, side=side, distribution=distribution, flags={"compress": compress}
        )
        patterns = compile_patterns(exclude)
        self.process_group = ddp.process_group
        self.rank, self.seed, self.distribution = rank, seed, distribution
        self.iteration = 0
        self.generator = GENERATOR  # the projection generator; a loaded state sets its own
        self.last_communicated_bytes = 0  # bytes all-reduced in the last completed step
        self._bytes_this_step = 0
        self.decisions = {}
        self.keys = {}
        for name, p in ddp.module.named_parameters():
            if p.requires_grad:
                self.decisions[id(p)] = decide(
                    name, p.shape, rank=rank, compress=compress, exclude=patterns, side=side
                )
                self.keys[id(p)] = parameter_key(name)
        names = [n for n, p in ddp.module.named_parameters() if p.requires_grad]
        warn_unmatched_patterns(patterns, names, "exclude")
        # every replica must draw the same projections: a differing seed would make them
        # drift apart, a differing rank abort inside the all-reduce
        check_same_settings(
            {
                "rank": rank,
                "seed": seed,
                "compress": compress,
                "exclude": list(patterns),
                "side": side,
                "distribution": distribution,
                "parameters": names,
            },
            what="FloraCommState",
            group=self.process_group,
        )

    def projection(self, param: Tensor, iteration: int | None = None) -> Tensor | None:
        """The projection ``param``'s gradient uses in ``iteration`` (default: the next)."""
        d = self.decisions[id(param)]
        if not d.compressed:
            return None
        return projection_matrix(
            d.rank,  # type: ignore[arg-type]
            d.compressed_dim,  # type: ignore[arg-type]
            seed=self.seed,
            key=self.keys[id(param)],
            window=self.iteration if iteration is None else iteration,
            stream=STREAM,
            distribution=self.distribution,  # type: ignore[arg-type]
            device=param.device,
            dtype=state_dtype(param),
            generator=self.generator,
        )

    def compressed_bytes(self) -> int:
        """Bytes one step all-reduces: compressed matrices plus uncompressed gradients (for
        float32 parameters; fp16/bf16 matrices are compressed in float32)."""
        return sum(
            4 * math.prod(d.state_shape if d.compressed else d.shape)  # type: ignore[arg-type]
            for d in self.decisions.values()
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "seed": self.seed,
            "rank": self.rank,
            "generator": self.generator,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or state.get("rank") != self.rank:
            raise ValueError(
                f"state_dict has seed={state.get('seed')}, rank={state.get('rank')}; "
                f"this hook state has seed={self.seed}, rank={self.rank}"
            )
        generator = state.get("generator", 1)  # absent: written before generator v2
        if isinstance(generator, bool) or generator not in GENERATORS:
            raise ValueError(f"state_dict generator must be one of {GENERATORS}, got {generator!r}")
        self.iteration = int(state["iteration"])
        self.generator = generator


def flora_comm_hook(state: FloraCommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: compress, all-reduce (average) and decompress one bucket."""
    world = dist.get_world_size(state.process_group)
    grads, params = bucket.gradients(), bucket.parameters()
    pieces, layout = [], []
    for p, g in zip(params, grads, strict=True):
        d = state.decisions.get(id(p))
        if d is not None and d.compressed:
            proj = state.projection(p)
            m, n = d.matrix_shape  # type: ignore[misc]
            g2 = g.reshape(m, n)
            if g2.dtype != proj.dtype:
                g2 = g2.to(proj.dtype)
            c = down(g2, proj, d.side)  # type: ignore[arg-type]
            layout.append((g, proj, d.side, c.shape))
            pieces.append(c.reshape(-1))
        else:
            layout.append((g, None, None, g.shape))
            pieces.append(
                g.reshape(-1).to(torch.float32) if g.dtype != torch.float32 else g.reshape(-1)
            )
    flat = torch.cat(pieces).div_(world)
    state._bytes_this_step += flat.numel() * flat.element_size()
    if bucket.is_last():
        state.last_communicated_bytes = state._bytes_this_step
        state._bytes_this_step = 0
        state.iteration += 1
    work = dist.all_reduce(flat, group=state.process_group, async_op=True)

    def decompress(fut: torch.futures.Future) -> Tensor:
        reduced = fut.value()[0]
        offset = 0
        for g, proj, side, shape in layout:
            size = int(torch.Size(shape).numel())
            part = reduced[offset : offset + size].view(shape)
            offset += size
            if proj is None:
                g.copy_(part.view_as(g))
            else:
                full = up(part, proj, side)
                g.copy_(full.reshape(g.shape))
        return bucket.buffer()

    return work.get_future().then(decompress)
