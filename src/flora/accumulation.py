r"""Compressed gradient accumulation for any optimizer (the paper's Algorithm 1).

For a cycle of micro-batches with gradients :math:`G_1, \dots, G_k` (``k = steps``, or fewer
when a cycle is ended early) and, per compressed matrix, a projection :math:`A` drawn afresh
for the cycle (:mod:`flora.projection`, stream ``"accumulation"``, window = cycle index):

.. math::
    C &\leftarrow 0 \\
    C &\leftarrow C + \operatorname{down}_A(G_i) \quad (i = 1..k)\\
    \hat G &= s \cdot \operatorname{up}_A(C), \qquad
    s = 1 \text{ (reduction="sum")} \text{ or } 1/k \text{ (reduction="mean")}

with ``down``/``up`` on the policy's side (``A C`` is ``r x n`` on the left, ``m x r`` on
the right). That is ``distribution="gaussian"`` (or another seeded family). The default,
``distribution="sketch"``, keeps two linear sketches of the same sum in the same numbers and
forms :math:`\hat G` as the rank-``k`` matrix they determine (see the argument below).
Each micro-batch's gradient is compressed in a per-parameter
``post_accumulate_grad`` hook and ``p.grad`` freed at once, so only ``C`` and one parameter's
gradient at a time are held. At the end of the cycle ``p.grad`` holds :math:`\hat G`, so
clipping, grad-norm logging, ``GradScaler`` and ``optimizer.step()`` work unchanged.
Parameters the policy (:mod:`flora.policy`) does not compress accumulate in ``p.grad`` as
usual.

Deviations from the paper, all deliberate:

* The default estimate is the low-rank sketch, not the paper's unbiased projection: at the
  same buffer bytes it trained better in the quality study on MiniLM accumulation and LM
  pre-training, and tied on the translation row (``docs/results.md``);
  ``distribution="gaussian"`` is Algorithm 1 as printed.

* ``reduction="sum"`` (default) keeps PyTorch's convention that ``.grad`` is the *sum* of the
  micro-batch gradients: scale the loss by ``1/steps`` as in a plain accumulation loop (the
  paper's :math:`\hat G = A^\top C / \tau` is ``reduction="mean"`` with an unscaled loss,
  which also divides a shortened cycle by its true length).
* Buffers of fp16/bf16 parameters are kept in float32; ``p.grad`` is rounded once to the
  parameter's dtype at the end.
* Under ``DistributedDataParallel`` the micro-batches run in ``no_sync()`` and the compressed
  buffers (and the gradients of uncompressed parameters) are all-reduced and averaged once
  at the end of the cycle. The projection is linear and identical on every rank, so this
  equals compressing the averaged gradient, with communication shrunk by ``r / min(m, n)``.

Step-in-backward mode (``step_in_backward=True``): on the last micro-batch of a cycle each
parameter's :math:`\hat G` is formed in its hook, the parameter is stepped — with
``optimizer.step_parameter(p)`` where the optimizer has it (``Flora``, ``FloraAdamW``: time
independent of the number of parameters, then one ``optimizer.step()`` with no gradient left
at the end of the cycle, so step hooks and LR schedulers see one step), else
``optimizer.step()`` while only that parameter has a gradient — and the gradient is freed,
so at most one full-size gradient exists at a time, *with* accumulation. The optimizer's
param groups (and so LR schedulers) are used as they are. Global-norm clipping needs every
gradient before the first update, so in this mode ``max_param_grad_norm`` clips each
parameter's gradient separately, and :attr:`GradientAccumulator.last_grad_norm` reports the
true global norm of the (unclipped) decompressed gradient of the cycle. ``GradScaler``
cannot unscale across parameters in this mode and is not supported with it.

A weight used twice (a head tied to the token embedding) gets one autograd gradient, the sum
of its uses', so the first use's gradient is held until the last use's backward. A model that
computes its second use with :func:`tied_use` hands that use's gradient to the accumulator as
it is formed; the accumulator then steps the shared weight at the end of the backward pass.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from flora.options import state_dtype
from flora.policy import (
    Decision,
    check_options,
    check_unique_names,
    compile_patterns,
    decide,
    warn_unmatched_patterns,
)
from flora.projection import (
    DISTRIBUTIONS,
    GENERATOR,
    GENERATORS,
    GRADIENT,
    SKETCH,
    parameter_key,
    projection_matrix,
    range_basis,
    sketch_reconstruct,
    sketch_sizes,
    up,
)
from flora.replicas import check_same_settings
from flora.state_plan import Plan, PlanRow

__all__ = ["AccumulationMemory", "GradientAccumulator", "route_shared_uses", "tied_use"]

#: parameter -> the accumulator method that takes the gradients of its tied_use() aliases
_ROUTES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def tied_use(weight: Tensor) -> Tensor:
    r"""The tensor to compute a second use of a shared parameter with (a head tied to the
    token embedding): ``weight`` itself, unless a :class:`GradientAccumulator` that
    compresses or steps in backward manages it; then a leaf alias of the same storage whose
    gradient goes straight into the accumulator.

    Autograd sums every use's gradient of a leaf before its hook runs, so a tied head's
    gradient, formed first in backward, is otherwise held until the embedding's backward, the
    last: at GPT-2-small scale with step-in-backward, 0.62 bytes per parameter
    (``benchmarks/results/lean_memory_tied_cpu.md``). The accumulator compresses each use's
    gradient as it arrives (the compression is linear, so the buffer holds the same sum up to
    rounding) and steps the parameter at the end of the backward pass. Plain autograd (and
    the same values) with no accumulator, under ``torch.no_grad()``, or after
    :meth:`GradientAccumulator.remove`. A model whose every extra use of a shared parameter
    goes through this sets ``routes_shared_gradients = True``, so that
    :func:`flora.model_memory.peak_gradient_bytes` plans it without the hold
    (:class:`flora.gpt.GPT` does)."""
    route = _ROUTES.get(weight)
    absorb = route() if route is not None else None
    if absorb is None or not torch.is_grad_enabled() or not weight.requires_grad:
        return weight
    alias = weight.detach().requires_grad_()

    def deliver(leaf: Tensor) -> None:
        grad, leaf.grad = leaf.grad, None
        absorb(weight, grad)

    alias.register_post_accumulate_grad_hook(deliver)
    return alias


def _routed_linear(self: nn.Linear, x: Tensor) -> Tensor:
    return nn.functional.linear(x, tied_use(self.weight), self.bias)


def _routed_embedding(self: nn.Embedding, x: Tensor) -> Tensor:
    return nn.functional.embedding(
        x, tied_use(self.weight), self.padding_idx, self.max_norm, self.norm_type,
        self.scale_grad_by_freq, self.sparse,
    )  # fmt: skip


_ROUTED_FORWARDS: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Linear: _routed_linear,
    nn.Embedding: _routed_embedding,
}


def route_shared_uses(model: nn.Module) -> list[str]:
    """Compute every later use of ``model``'s shared weights with :func:`tied_use`: a weight
    reachable under several names (a Hugging Face head tied to the token embedding,
    ``lm_head.weight`` and ``transformer.wte.weight``) keeps its first holder as it is, and
    each other holder's ``forward`` is replaced by its own with ``tied_use(self.weight)``.
    Sets ``model.routes_shared_gradients = True`` (read by
    :func:`flora.model_memory.peak_gradient_bytes`; not where a whole module is used twice,
    whose uses cannot be told apart) and returns the rerouted modules' names (none for a
    model without shared weights, or one that routes them itself). The values computed do
    not change. Holders must be ``nn.Linear`` or ``nn.Embedding``
    (exactly those types); another raises TypeError naming it, with nothing changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if getattr(model, "routes_shared_gradients", False):
        return []
    holders: dict[int, list[tuple[str, nn.Module, Tensor]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for _, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if p.requires_grad:
                holders.setdefault(id(p), []).append((name, module, p))
    # a module used twice holds its parameters once per name: nothing to reroute there
    later = [h for hs in holders.values() for h in hs[1:] if h[1] is not hs[0][1]]
    same_module = any(all(h[1] is hs[0][1] for h in hs) for hs in holders.values() if len(hs) > 1)
    for name, module, p in later:
        if type(module) not in _ROUTED_FORWARDS or module.weight is not p:
            raise TypeError(
                f"route_shared_uses: {name!r} ({type(module).__name__}) holds a shared weight, "
                "and only the weight of an nn.Linear or nn.Embedding can be rerouted: compute "
                "that use with flora.accumulation.tied_use(weight) yourself"
            )
    for _, module, _ in later:
        module.forward = _ROUTED_FORWARDS[type(module)].__get__(module)  # type: ignore[method-assign]
    if later and not same_module:
        model.routes_shared_gradients = True  # type: ignore[assignment]
    return [name for name, _, _ in later]


def _norm(t: Tensor) -> Tensor:
    """The 2-norm, in float32 for half-precision tensors."""
    half = t.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(t, dtype=torch.float32 if half else None)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


STREAM = "accumulation"
REDUCTIONS = ("sum", "mean")
_STATE_VERSION = 1


@dataclass(frozen=True)
class AccumulationMemory:
    """Accumulation memory, in bytes.

    ``buffer_bytes``: what the accumulator keeps for a cycle (compressed buffers plus the
    full-size gradients of uncompressed parameters); ``naive_bytes``: what plain accumulation
    keeps (a full-size ``.grad`` for every parameter); ``projection_cache_bytes``: cached
    projections (``cache_projection=True``); ``cuda_peak_bytes``:
    ``torch.cuda.max_memory_allocated`` of the parameters' CUDA device, else ``None``.
    """

    buffer_bytes: int
    naive_bytes: int
    projection_cache_bytes: int
    cuda_peak_bytes: int | None


class _Slot:
    """One managed parameter: its policy decision and its buffer for the current cycle."""

    __slots__ = (
        "basis", "buffer", "capacity", "decision", "dense", "dtype", "key", "name", "param",
        "proj", "rows", "seen", "shared", "sketch", "stepped",
    )  # fmt: skip

    def __init__(self, name: str, param: Tensor, decision: Decision, key: int) -> None:
        self.name, self.param, self.decision, self.key = name, param, decision, key
        self.dtype = state_dtype(param)  # float32 buffers for fp16/bf16 parameters
        self.buffer: Tensor | None = None  # compressed C, or full-size sum (step-in-backward)
        self.proj: tuple[int, Any] | None = None  # (cycle, A or (Omega, Psi)) when caching
        self.basis: Tensor | None = None  # distribution="gradient": this cycle's basis
        self.sketch: tuple[int, int] | None = None  # distribution="sketch": sizes (k, l)
        self.seen = False  # received a gradient this cycle
        self.stepped = False  # stepped inside its hook this cycle
        #: used more than once (a tied head): stepped at the end of the backward pass, as
        #: its uses' gradients arrive apart when the model computes them with tied_use()
        self.shared = False
        #: exact_rows: how many rows of the kept dimension fit in the buffer exactly, and
        #: how many are held this cycle (None: the buffer holds the compressed form)
        self.capacity = 0
        self.rows: int | None = None
        #: its first gradient of a cycle did not fit: later cycles start compressed (the
        #: same values, one pass and one host sync fewer per cycle)
        self.dense = False

    @property
    def compressed(self) -> bool:
        return self.decision.compressed

    @property
    def shape2d(self) -> tuple[int, int]:
        return self.decision.matrix_shape  # type: ignore[return-value]

    def oriented(self, g: Tensor) -> Tensor:
        """The matrix ``g`` (in ``shape2d``) as ``(kept, compressed)``: ``g`` when compressed
        on the right, ``g.T`` on the left."""
        return g if self.decision.side == "right" else g.T

    def sketches(self) -> tuple[Tensor, Tensor]:
        """``distribution="sketch"``: views ``Y`` (kept, k) and ``W`` (l, compressed) at the
        start of the buffer (its last ``r o - k o - l d`` entries stay zero)."""
        assert self.buffer is not None and self.sketch is not None
        k, l_ = self.sketch
        dim, kept = self.decision.compressed_dim, self.decision.kept_dim
        flat = self.buffer.view(-1)
        y = flat[: kept * k].view(kept, k)  # type: ignore[operator]
        return y, flat[kept * k : kept * k + l_ * dim].view(l_, dim)  # type: ignore[operator]

    def exact_rows(self) -> tuple[Tensor, Tensor]:
        """``exact_rows``: views of the ``n = rows`` held rows of the gradient as
        ``(kept, compressed)``: their values ``(n, d)`` at the start of the buffer and their
        indices (ascending) bit-cast into its last ``n`` entries."""
        assert self.buffer is not None and self.rows is not None
        flat, n, d = self.buffer.view(-1), self.rows, self.decision.compressed_dim
        ints = flat.view(torch.int32 if flat.element_size() == 4 else torch.int64)
        return flat[: n * d].view(n, d), ints[flat.numel() - n :]  # type: ignore[operator]


def _named_parameters(
    params: nn.Module | Iterable[Any],
) -> tuple[list[tuple[str, Tensor]], bool, nn.Module | None]:
    """(name, parameter) pairs, whether names were given, and the DDP wrapper if any."""
    ddp = None
    if isinstance(params, nn.parallel.DistributedDataParallel):
        ddp, params = params, params.module
    if isinstance(params, nn.Module):  # every name of a tied weight: its uses are counted
        named = params.named_parameters(remove_duplicate=False)
        return [(n, p) for n, p in named if p.requires_grad], True, ddp
    if isinstance(params, Tensor):
        raise TypeError("params must be a module or an iterable of parameters, got a Tensor")
    items = list(params)
    if not items:
        raise ValueError("params is empty")
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return [(n, p) for n, p in items if p.requires_grad], True, None
    if all(isinstance(x, Tensor) for x in items):
        return [(f"param{i}", p) for i, p in enumerate(items) if p.requires_grad], False, None
    raise TypeError("params must be a module, model.named_parameters() or an iterable of tensors")


def _check_tensor(
    value: Any, shape: tuple[int, ...] | None, dtype: torch.dtype | None, name: str
) -> None:
    """Refuse a saved buffer or gradient that is not a floating tensor of ``shape``."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(f"state_dict: the buffer of {name!r} is missing or not a float tensor")
    if tuple(value.shape) != tuple(shape):  # type: ignore[arg-type]
        raise ValueError(
            f"state_dict: the buffer of {name!r} has shape {tuple(value.shape)}, "
            f"expected {tuple(shape)}"  # type: ignore[arg-type]
        )
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"state_dict: the buffer of {name!r} is {value.dtype}, expected {dtype}")


class GradientAccumulator:
    r"""Accumulate gradients over ``steps`` micro-batches in compressed form, for any optimizer.

    Args:
        params: a module (its ``named_parameters()``), a ``DistributedDataParallel`` module
            (compressed all-reduce, see the module docstring), ``model.named_parameters()``,
            or an iterable of parameters (keyed by position). Parameters that do not require
            grad are ignored.
        steps: micro-batches per cycle (the paper's tau).
        rank: rank of the projections.
        seed: user seed of the projections (a fresh projection per cycle derives from it).
        compress: ``False`` turns compression off (plain accumulation).
        exclude: regex(es) of parameter names never compressed.
        side: ``"auto"`` (compress the smaller dimension), ``"left"`` or ``"right"``.
        distribution: ``"sketch"`` (default, below); a projection family, ``"gaussian"``
            (the paper's Algorithm 1), ``"rademacher"``, ``"orthonormal"`` or
            ``"coordinates"`` (:mod:`flora.projection`); or
            ``"gradient"``: each cycle's basis is the dominant subspace of the cycle's first
            gradient (:func:`flora.projection.range_basis`), and :math:`\hat G` is the
            projection of the accumulated gradient onto it, :math:`c\,\operatorname{up}(C)`
            with :math:`c = r/d` — low-noise but biased (the remainder is dropped, as in
            GaLore), with ``r * d`` more numbers per compressed matrix during a cycle. Not
            under DDP (the ranks' first gradients differ) and not with
            ``cache_projection``; or ``"sketch"`` (default): the buffer's ``r * o`` numbers
            (``o`` the kept dimension, ``d`` the compressed one) hold two seeded Gaussian
            sketches of the accumulated gradient, :math:`Y = a\,\Omega^\top` (``o x k``) and
            :math:`W = \Psi a` (``l x d``), :math:`a` the gradient as ``(o, d)``, sizes from
            :func:`flora.projection.sketch_sizes` (``k = (r-1)/3`` for a square matrix), and
            :math:`\hat G` is the rank-``k`` approximation they determine
            (:func:`flora.projection.sketch_reconstruct`; Tropp et al. 2017) — biased towards
            the gradient's dominant directions, exact for gradients of rank ``<= k``, with
            far less error than an unbiased projection when the spectrum decays. Seeded and
            linear, so it works under DDP (the all-reduced sketches sketch the averaged
            gradient) and with ``cache_projection`` (both test matrices are cached). It needs
            ``rank >= 4`` (a matrix too small for one sketch vector is refused with the rank
            it needs; ``"gaussian"`` has no such floor).
        reduction: ``"sum"`` (PyTorch convention: ``p.grad`` is the sum of the micro-batch
            gradients; scale the loss by ``1/steps``) or ``"mean"`` (divide by the number of
            micro-batches in the cycle).
        cache_projection: keep each parameter's projection for the cycle instead of
            regenerating it per micro-batch (memory reported in :meth:`plan`).
        optimizer: the optimizer to step inside backward (step-in-backward mode only).
        step_in_backward: step each parameter in its hook on the last micro-batch.
        max_param_grad_norm: step-in-backward only: clip each parameter's gradient to this
            norm (per parameter; global clipping is impossible in this mode).
        max_grad_norm: at the end of each cycle, scale every ``p.grad`` by
            ``min(1, max_grad_norm / grad_norm)``, with ``grad_norm`` the estimate of the
            *true* norm (:attr:`grad_norm`). Prefer it to ``torch.nn.utils.clip_grad_norm_``
            on the decompressed gradient: with a projection its norm is larger than the true
            one by about ``sqrt(1 + (d+1)/r)``; the default sketch's is close to the true one
            but depends on the spectrum. Not with ``step_in_backward``.
        exact_rows: hold a compressed matrix's gradient exactly while its non-zero rows (of
            the kept dimension ``o``) fit in the buffer's ``r o`` numbers — ``n`` rows take
            ``n d`` values and ``n`` indices, so up to ``r o // (d + 1)`` — and switch to the
            compressed form (adding the held rows to the gradient that does not fit) for the
            rest of the cycle once they do not. An embedding lookup's gradient is non-zero
            only on the rows of the tokens seen: over a cycle of short micro-batches it stays
            exact, at no more memory. Dense matrices switch at their first gradient, after
            one pass that finds their non-zero rows (one host sync per matrix and micro-batch
            while rows are held), and start later cycles compressed. Not under DDP (the
            ranks' rows differ).
        is_last_micro_batch: for training loops you do not write (Hugging Face ``Trainer``,
            ``accelerate``): instead of ``micro_batch()``, each backward pass is a micro-batch,
            and this callable, asked when the backward pass reaches the first parameter,
            says whether it ends the cycle (e.g. accelerate's ``sync_gradients``). The cycle
            is finished when that backward pass ends, so ``p.grad`` is ready for clipping.
            See :mod:`flora.integrations`.

    Use (wrap forward *and* backward, as with ``DistributedDataParallel.no_sync``)::

        acc = GradientAccumulator(model, steps=16, rank=32, max_grad_norm=1.0)
        for i, batch in enumerate(loader):
            with acc.micro_batch(last=i == len(loader) - 1):
                (loss_fn(model(batch)) / 16).backward()
            if acc.sync_gradients:  # p.grad: the decompressed sum, clipped by acc.grad_norm
                optimizer.step()
                optimizer.zero_grad()
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        steps: int,
        *,
        rank: int = 32,
        seed: int = 0,
        compress: bool = True,
        exclude: str | Iterable[str] | None = None,
        side: Literal["auto", "left", "right"] = "auto",
        distribution: Literal[
            "gaussian", "rademacher", "orthonormal", "coordinates", "gradient", "sketch"
        ] = "sketch",
        reduction: Literal["sum", "mean"] = "sum",
        cache_projection: bool = False,
        optimizer: Optimizer | None = None,
        step_in_backward: bool = False,
        max_param_grad_norm: float | None = None,
        is_last_micro_batch: Callable[[], bool] | None = None,
        max_grad_norm: float | None = None,
        exact_rows: bool = False,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be an int, got {type(steps).__name__}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        check_options(
            rank=rank,
            seed=seed,
            side=side,
            distribution=distribution,
            flags={
                "compress": compress,
                "cache_projection": cache_projection,
                "step_in_backward": step_in_backward,
                "exact_rows": exact_rows,
            },
            distributions=(*DISTRIBUTIONS, GRADIENT, SKETCH),
        )
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if step_in_backward and optimizer is None:
            raise ValueError("step_in_backward=True needs the optimizer (optimizer=...)")
        if optimizer is not None and not step_in_backward:
            raise ValueError("optimizer is only used with step_in_backward=True")
        if max_param_grad_norm is not None:
            if not step_in_backward:
                raise ValueError(
                    "max_param_grad_norm is for step_in_backward=True; otherwise use max_grad_norm "
                    "(global clipping with the true-norm estimate)"
                )
            _check_positive("max_param_grad_norm", max_param_grad_norm)
        if max_grad_norm is not None:
            if step_in_backward:
                raise ValueError(
                    "max_grad_norm needs every gradient before the first update, which "
                    "step_in_backward=True does not have: use max_param_grad_norm"
                )
            _check_positive("max_grad_norm", max_grad_norm)
        if is_last_micro_batch is not None and not callable(is_last_micro_batch):
            raise TypeError("is_last_micro_batch must be a callable returning a bool")
        patterns = compile_patterns(
            exclude if exclude is None or isinstance(exclude, str) else tuple(exclude)
        )
        named, has_names, ddp = _named_parameters(params)
        if not named:
            raise ValueError("params holds no parameter that requires grad")
        if patterns and not has_names:
            raise ValueError("exclude patterns need parameter names: pass a module or names")
        self._ddp = ddp
        self._group = ddp.process_group if ddp is not None else None
        if ddp is not None and is_last_micro_batch is not None:
            raise ValueError(
                "is_last_micro_batch is not supported under DistributedDataParallel: use "
                "micro_batch(), which also runs the micro-batches in no_sync()"
            )
        if distribution == GRADIENT and (ddp is not None or cache_projection):
            raise ValueError(
                "distribution='gradient' takes each cycle's basis from the first gradient, "
                + (
                    "which differs between DDP ranks: use a seeded distribution under DDP"
                    if ddp is not None
                    else "so there is nothing to cache: leave cache_projection False"
                )
            )
        if ddp is not None and exact_rows:
            raise ValueError(
                "exact_rows=True is not supported under DistributedDataParallel: each rank's "
                "gradients have other non-zero rows, so the buffers cannot be all-reduced"
            )
        if ddp is not None and step_in_backward:
            raise ValueError(
                "step_in_backward=True is not supported under DistributedDataParallel: "
                "the compressed all-reduce needs every buffer before the first update"
            )
        self.steps, self.rank, self.seed = steps, rank, seed
        self.compress, self.side, self.distribution = compress, side, distribution
        #: the projection generator (:mod:`flora.projection`); a loaded state sets its own
        self.generator = GENERATOR
        self.exclude, self.reduction = patterns, reduction
        self.cache_projection = cache_projection
        self.optimizer, self.step_in_backward = optimizer, step_in_backward
        self._step_parameter = getattr(optimizer, "step_parameter", None)
        #: whether step_parameter takes the gradient itself (Flora's optimizers): then a
        #: low-precision parameter gets its float32 estimate, not one rounded to its dtype
        accepts = (
            inspect.signature(self._step_parameter).parameters
            if self._step_parameter is not None
            else {}
        )
        self._hands_grad = "grad" in accepts
        #: whether it may overwrite that gradient (``consume=True``: Flora's optimizers)
        self._hands_over = "consume" in accepts
        self.max_param_grad_norm = max_param_grad_norm
        self.max_grad_norm = max_grad_norm
        self.is_last_micro_batch = is_last_micro_batch
        self.exact_rows = exact_rows

        self._slots: list[_Slot] = []
        seen_ids: set[int] = set()
        distinct = []
        twice: set[int] = set()
        for name, p in named:
            if id(p) in seen_ids:  # one tensor listed twice (tied weights): managed once
                twice.add(id(p))
                continue
            seen_ids.add(id(p))
            distinct.append((name, p))
        check_unique_names([n for n, _ in distinct], "GradientAccumulator parameter names")
        if has_names:
            warn_unmatched_patterns(patterns, [n for n, _ in distinct], "exclude")
        for name, p in distinct:
            if p.is_complex():
                raise TypeError(f"complex parameters are not supported ({name})")
            d = decide(name, p.shape, rank=rank, compress=compress, exclude=patterns, side=side)
            key = parameter_key(name if has_names else int(name[len("param") :]))
            slot = _Slot(name, p, d, key)
            if distribution == SKETCH and d.compressed:
                try:
                    slot.sketch = sketch_sizes(rank, d.kept_dim, d.compressed_dim)  # type: ignore[arg-type]
                except ValueError as e:
                    raise ValueError(f"distribution='sketch', {name!r}: {e}") from None
            slot.shared = id(p) in twice
            if exact_rows and d.compressed:  # n d values and n indices in the r o numbers
                slot.capacity = math.prod(d.state_shape) // (d.compressed_dim + 1)  # type: ignore[arg-type,operator]
            self._slots.append(slot)
        self._by_param = {id(s.param): s for s in self._slots}
        if optimizer is not None:
            self._check_optimizer(optimizer)

        self.cycle = 0  #: index of the current cycle (the projection window)
        self.position = 0  #: micro-batches done in the current cycle
        self.sync_gradients = False  #: True right after a micro-batch that ended a cycle
        self.last_grad_norm: Tensor | None = None  #: step-in-backward: global norm of G-hat
        #: estimate of the true global norm of the last cycle's accumulated gradient (below)
        self.grad_norm: Tensor | None = None
        self.last_communicated_bytes = 0  #: bytes all-reduced at the end of the last cycle
        self._active = False
        self._last = False
        self._removed = False
        self._flats: list[Tensor] = []
        self._norm_sq: Tensor | None = None
        # before any hook is registered, so a refused accumulator leaves nothing behind
        if self._group is not None:  # every replica must draw the same projections
            check_same_settings(
                {**self._settings(), "parameters": [s.name for s in self._slots]},
                what="GradientAccumulator",
                group=self._group,
            )
        self._handles = [
            s.param.register_post_accumulate_grad_hook(self._hook)
            for s in self._slots
            if s.compressed or step_in_backward or is_last_micro_batch is not None
        ]
        self._routed = [s.param for s in self._slots if s.compressed or step_in_backward]
        for p in self._routed:  # where a model calls tied_use(p)
            _ROUTES[p] = weakref.WeakMethod(self._absorb)

    # ------------------------------------------------------------------ set-up helpers
    def _check_optimizer(self, optimizer: Optimizer) -> None:
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
        missing = [s.name for s in self._slots if id(s.param) not in in_opt]
        if missing:
            raise ValueError(
                f"step_in_backward: parameters not in the optimizer would never be stepped: "
                f"{', '.join(missing[:5])}"
            )
        extra = in_opt - set(self._by_param)
        if extra:
            raise ValueError(
                f"step_in_backward: the optimizer holds {len(extra)} parameter(s) the "
                "accumulator does not manage; their gradients would be stepped repeatedly"
            )

    def remove(self) -> None:
        """Remove the hooks; backward passes are then plain PyTorch again, and
        :meth:`micro_batch` and :meth:`finish_cycle` raise (they would no longer compress
        the matrices while still dividing the vectors' gradients with ``reduction="mean"``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self._routed:
            route = _ROUTES.get(p)
            if route is not None and route() == self._absorb:
                del _ROUTES[p]
        self._routed.clear()
        self._removed = True

    def _check_not_removed(self, what: str) -> None:
        if self._removed:
            raise RuntimeError(f"GradientAccumulator.{what} after remove(): the hooks are gone")

    def _slot(self, param: Tensor | str) -> _Slot:
        for s in self._slots:
            if s.param is param or s.name == param:
                return s
        raise ValueError("param is not managed by this accumulator")

    def decision(self, param: Tensor | str) -> Decision:
        """The policy's decision for ``param`` (a managed parameter or its name)."""
        return self._slot(param).decision

    def projection(self, param: Tensor | str, cycle: int | None = None) -> Tensor | None:
        """The ``(rank, dim)`` projection of ``param`` in ``cycle`` (default: current)."""
        s = self._slot(param)
        if not s.compressed:
            return None
        if self.distribution == GRADIENT:
            if s.basis is None or cycle not in (None, self.cycle):
                raise ValueError(
                    "distribution='gradient': a basis exists only in the current cycle, "
                    "after the parameter's first gradient in it"
                )
            return s.basis
        if self.distribution == SKETCH:
            raise ValueError(
                "distribution='sketch' has two test matrices, not a projection: see "
                "flora.projection.sketch_reconstruct"
            )
        return self._make_projection(s, self.cycle if cycle is None else cycle)

    def _make_projection(self, s: _Slot, cycle: int, only: str | None = None) -> Any:
        """The cycle's projection ``A``, or for the sketch its test matrices ``(Omega, Psi)``:
        Gaussian, ``(k, d)`` and ``(l, o)``, streams ``accumulation/range`` and
        ``accumulation/co-range`` (``only="co-range"``: ``Psi`` alone, all that the
        reconstruction needs)."""
        d = s.decision
        if s.sketch is not None:
            k, l_ = s.sketch
            sizes = {"range": (k, d.compressed_dim), "co-range": (l_, d.kept_dim)}

            def test_matrix(stream: str) -> Tensor:
                rows, cols = sizes[stream]
                return projection_matrix(
                    rows,  # type: ignore[arg-type]
                    cols,  # type: ignore[arg-type]
                    seed=self.seed,
                    key=s.key,
                    window=cycle,
                    stream=f"{STREAM}/{stream}",
                    device=s.param.device,
                    dtype=s.dtype,
                    generator=self.generator,
                )

            return test_matrix(only) if only else (test_matrix("range"), test_matrix("co-range"))
        return projection_matrix(
            d.rank,  # type: ignore[arg-type]
            d.compressed_dim,  # type: ignore[arg-type]
            seed=self.seed,
            key=s.key,
            window=cycle,
            stream=STREAM,
            distribution=self.distribution,  # type: ignore[arg-type]
            device=s.param.device,
            dtype=s.dtype,
            generator=self.generator,
        )

    def _projection_now(self, s: _Slot, only: str | None = None) -> Any:
        """This cycle's projection (or the sketch's test matrices, or with ``only`` one of
        them), from the cache when ``cache_projection``."""
        if self.distribution == GRADIENT:
            assert s.basis is not None
            return s.basis
        if not self.cache_projection:
            return self._make_projection(s, self.cycle, only)
        if s.proj is None or s.proj[0] != self.cycle:
            s.proj = (self.cycle, self._make_projection(s, self.cycle))
        return s.proj[1] if only is None else s.proj[1][("range", "co-range").index(only)]

    # ------------------------------------------------------------------ buffers
    def _allocate(self) -> None:
        """Zeroed compressed buffers for a new cycle: views into one flat tensor per
        (device, dtype), so that the all-reduce is a single zero-copy call."""
        groups: dict[tuple[torch.device, torch.dtype], list[_Slot]] = {}
        for s in self._slots:
            if s.compressed:
                groups.setdefault((s.param.device, s.dtype), []).append(s)
        self._flats = []
        for (device, dtype), slots in groups.items():
            sizes = [math.prod(s.decision.state_shape) for s in slots]  # type: ignore[arg-type]
            flat = torch.zeros(sum(sizes), device=device, dtype=dtype)
            for s, view in zip(slots, flat.split(sizes), strict=True):
                s.buffer = view.view(s.decision.state_shape)  # type: ignore[arg-type]
                s.rows = 0 if s.capacity and not s.dense else None
            self._flats.append(flat)

    def _release(self) -> None:
        for s in self._slots:
            s.buffer = None
            s.basis = None
            s.rows = None
            s.seen = False
            s.stepped = False
            if s.proj is not None and s.proj[0] != self.cycle:
                s.proj = None
        self._flats = []

    # ------------------------------------------------------------------ the cycle
    @contextlib.contextmanager
    def micro_batch(self, *, last: bool = False) -> Iterator[None]:
        """Context for one micro-batch's forward and backward.

        The cycle ends after this micro-batch when it is the ``steps``-th of the cycle or
        when ``last=True`` (an early end, e.g. the last batch of an epoch); then
        :attr:`sync_gradients` is True and ``p.grad`` holds the accumulated gradient.
        """
        if not isinstance(last, bool):
            raise TypeError(f"last must be a bool, got {type(last).__name__}")
        self._check_not_removed("micro_batch()")
        if self._active:
            raise RuntimeError("micro_batch() contexts cannot be nested")
        self._begin(last)
        try:
            with self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext():
                yield
        except BaseException:
            self._active = False
            raise
        self._end()

    def _begin(self, last: bool) -> None:
        if self.position == 0:
            self._allocate()
            self._norm_sq = None
        self.sync_gradients = False
        self._active = True
        self._last = last or self.position + 1 == self.steps

    @torch.no_grad()
    def _end(self) -> None:
        self._active = False
        self.position += 1
        if self._last:
            self._finish()

    def _begin_from_hook(self) -> None:
        """``is_last_micro_batch`` mode: the first hook of a backward pass opens the
        micro-batch, and a callback queued on the autograd engine closes it when that
        backward pass ends."""
        self._begin(bool(self.is_last_micro_batch()))  # type: ignore[misc]
        torch.autograd.Variable._execution_engine.queue_callback(self._end)

    def finish_cycle(self) -> None:
        """End the current cycle now (after at least one micro-batch), e.g. when the data
        ran out and the last micro-batch was not marked ``last=True``."""
        self._check_not_removed("finish_cycle()")
        if self._active:
            raise RuntimeError("finish_cycle() cannot be called inside micro_batch()")
        if self.position == 0:
            raise RuntimeError("finish_cycle(): no micro-batch in the current cycle")
        self._finish()

    @torch.no_grad()
    def _hook(self, param: Tensor) -> None:
        s = self._by_param.get(id(param))
        if s is None:  # torch hands later hooks what an earlier one returned
            raise RuntimeError(
                "GradientAccumulator's hook received a tensor that is not a managed parameter: "
                "a post-accumulate-grad hook registered before it returned a value instead of "
                "None"
            )
        grad = param.grad
        if not self._take(s, grad):
            return
        if s.compressed or self.step_in_backward:
            param.grad = None
        del grad  # freed before the step: one copy of this gradient at a time
        if self.step_in_backward and self._last and not s.shared:
            self._step_one(s, self.position + 1)

    @torch.no_grad()
    def _absorb(self, param: Tensor, grad: Tensor | None) -> None:
        """The gradient of one :func:`tied_use` of ``param``, taken in like a hook's; the
        parameter is then stepped at the end of the backward pass (its other uses' gradients
        may still be coming)."""
        s = self._by_param[id(param)]
        if s.stepped:
            raise RuntimeError(
                f"a tied_use() gradient of {s.name!r} arrived after it was stepped: give the "
                "accumulator the module (or list the weight under each of its names) so it "
                "knows the weight is shared and steps it at the end of the backward pass"
            )
        s.shared = True
        self._take(s, grad)

    def _take(self, s: _Slot, grad: Tensor | None) -> bool:
        """Compress ``grad`` into ``s`` (or add it to its full-size sum under
        step-in-backward); False when there is none."""
        if not self._active and self.is_last_micro_batch is not None:
            self._begin_from_hook()
        if not self._active:
            raise RuntimeError(
                f"GradientAccumulator: backward() reached {s.name!r} outside "
                "accumulator.micro_batch(); wrap each micro-batch's forward and backward in it "
                "(or call accumulator.remove())"
            )
        if grad is None:
            return False
        if grad.is_sparse or grad.is_complex():
            raise RuntimeError(f"sparse or complex gradients are not supported ({s.name})")
        if s.stepped:
            raise RuntimeError(
                f"{s.name!r} was already stepped in this cycle: step_in_backward allows one "
                "backward() in the last micro-batch"
            )
        s.seen = True
        if s.compressed:
            self._compress_into(s, grad)
        elif self.step_in_backward:
            if s.buffer is None:
                s.buffer = grad if grad.dtype == s.dtype else grad.to(s.dtype)
            else:
                s.buffer.add_(grad)
        return True

    def _compress_into(self, s: _Slot, grad: Tensor) -> None:
        g = grad.reshape(s.shape2d)
        if g.dtype != s.dtype:
            g = g.to(s.dtype)
        if s.rows is not None and self._hold_rows(s, g):
            return
        if self.distribution == GRADIENT and s.basis is None:  # the cycle's first gradient
            d = s.decision
            s.basis = range_basis(
                g, d.rank, d.side, seed=self.seed, key=s.key, window=self.cycle,  # type: ignore[arg-type]
                stream=STREAM, generator=self.generator,
            )  # fmt: skip
        proj = self._projection_now(s)
        if s.sketch is not None:
            omega, psi = proj
            y, w = s.sketches()
            a = s.oriented(g)
            y.addmm_(a, omega.T)  # Y += a Omega^T
            w.addmm_(psi, a)  # W += Psi a
        elif s.decision.side == "left":
            s.buffer.addmm_(proj, g)  # type: ignore[union-attr]  # C += A G
        else:
            s.buffer.addmm_(g, proj.T)  # type: ignore[union-attr]  # C += G A^T

    def _hold_rows(self, s: _Slot, g: Tensor) -> bool:
        """``exact_rows``: add ``g`` (in ``shape2d``) to the held rows if the union of their
        non-zero rows still fits; otherwise fold the held rows into ``g`` (in place: ``g`` is
        this hook's gradient, freed after it) and leave the compressed form from now on.
        Whether a row is non-zero is read on the host: one sync per micro-batch."""
        a = s.oriented(g)  # (kept, compressed)
        new = a.ne(0).any(1).nonzero().squeeze(1)
        values, held = s.exact_rows()
        held = held.long()
        union = torch.unique(torch.cat([held, new])) if s.rows else new
        if union.numel() > s.capacity:
            if s.rows:
                a.index_add_(0, held, values)
            else:  # the cycle's first gradient: a dense matrix
                s.dense = True
            s.buffer.zero_()  # type: ignore[union-attr]
            s.rows = None
            return False
        merged = a.new_zeros(union.numel(), a.shape[1])
        if s.rows:
            merged.index_copy_(0, torch.searchsorted(union, held), values)
        merged.index_add_(0, torch.searchsorted(union, new), a.index_select(0, new))
        s.rows = union.numel()
        values, held = s.exact_rows()
        values.copy_(merged)
        held.copy_(union)
        return True

    def _decompressed(self, s: _Slot, count: int, *, cast: bool = True) -> Tensor:
        """G-hat of ``s`` in the parameter's shape and dtype (``cast=False``: in the
        buffers' dtype)."""
        assert s.buffer is not None
        if s.rows is not None:  # exact_rows: the accumulated gradient itself
            values, held = s.exact_rows()
            o, d = s.decision.kept_dim, s.decision.compressed_dim
            a = values.new_zeros(o, d).index_copy_(0, held.long(), values)  # type: ignore[arg-type]
            g = s.oriented(a).contiguous()
        elif s.sketch is not None:
            y, w = s.sketches()
            psi = self._projection_now(s, only="co-range")
            g = s.oriented(sketch_reconstruct(y, w, psi)).contiguous()
        elif s.compressed:
            proj = self._projection_now(s)
            g = up(s.buffer, proj, s.decision.side)  # type: ignore[arg-type]
            if self.distribution == GRADIENT:  # c up(C): the projection onto the basis
                g = g.mul_(proj.shape[0] / proj.shape[1])
        else:
            g = s.buffer
        if self.reduction == "mean":
            g = g.mul_(1.0 / count)  # g is a fresh product or a buffer this class owns
        g = g.reshape(s.param.shape)
        return g.to(s.param.dtype) if cast else g

    def _step_one(self, s: _Slot, count: int) -> None:
        """Step-in-backward: give ``s`` its G-hat, step the optimizer, free the gradient.
        Flora's optimizers take the estimate in the buffers' dtype (float32 for a bf16
        parameter) through ``step_parameter(p, grad)``; others get it as ``p.grad``."""
        p = s.param
        hand = self._hands_grad and p.dtype != s.dtype
        g = self._decompressed(s, count, cast=not hand)
        norm_sq = torch.linalg.vector_norm(g, dtype=torch.float32).square()
        self._norm_sq = norm_sq if self._norm_sq is None else self._norm_sq + norm_sq
        if self.max_param_grad_norm is not None:
            coef = (self.max_param_grad_norm / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)
            g.mul_(coef.to(g.dtype))
        s.buffer = None if not s.compressed else s.buffer
        if hand:  # float32 into a low-precision parameter: no rounding, no second copy; the
            # step may form its update in g's memory (consume)
            if self._hands_over:
                self._step_parameter(p, grad=g, consume=True)  # type: ignore[misc]
            else:
                self._step_parameter(p, grad=g)  # type: ignore[misc]
        else:
            p.grad = g
            if self._step_parameter is not None:  # Flora's optimizers: O(1) in the parameters
                self._step_parameter(p)
            else:  # any other optimizer: a whole step() while only p has a gradient
                self.optimizer.step()  # type: ignore[union-attr]
            p.grad = None
        s.stepped = True

    def _true_norm_estimate(self, count: int) -> Tensor | None:
        r"""sqrt of an unbiased estimate of the accumulated gradient's squared norm: the
        compressed buffers' :math:`\lVert C\rVert^2` (as :math:`\mathbb{E}[A^\top A] = I`,
        :math:`\mathbb{E}\lVert A G\rVert^2 = \lVert G\rVert^2`; the sketch's
        :math:`\lVert W\rVert^2 = \lVert \Psi a\rVert^2` likewise) plus the uncompressed
        gradients' squared norms."""
        parts = []  # (not used with step_in_backward, whose plain gradients sit in buffers)
        shrink = {}  # gradient basis: ||c up(C)|| = sqrt(c) ||C||, the applied gradient's
        for s in self._slots:
            if s.compressed:
                if s.buffer is not None and (s.seen or self._group is not None):
                    if self.distribution == GRADIENT:
                        shrink[s.name] = math.sqrt(s.decision.rank / s.decision.compressed_dim)  # type: ignore[operator]
                    if s.rows is not None:  # exact_rows: the norm itself
                        held = s.exact_rows()[0]
                    elif s.sketch is not None:
                        held = s.sketches()[1]
                    else:
                        held = s.buffer
                    parts.append(_norm(held) * shrink.get(s.name, 1.0))
            elif s.param.grad is not None:
                parts.append(_norm(s.param.grad))
        if not parts:
            return None
        devices = {t.device for t in parts}
        device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in parts) else torch.float32
        sq = torch.stack([t.to(device, dtype) for t in parts]).square().sum()
        return sq.sqrt() / count if self.reduction == "mean" else sq.sqrt()

    @torch.no_grad()
    def _finish(self) -> None:
        count = self.position
        self.last_communicated_bytes = 0
        if self._group is not None:
            self._all_reduce()
        if not self.step_in_backward:  # (in that mode some parameters are already stepped)
            self.grad_norm = self._true_norm_estimate(count)
        for s in self._slots:
            p = s.param
            if s.stepped:
                continue
            if self.step_in_backward:
                if s.seen:
                    self._step_one(s, count)
                continue
            if s.compressed:
                if s.seen or self._group is not None:
                    p.grad = self._decompressed(s, count)
                    s.buffer = None
            elif p.grad is not None and self.reduction == "mean":
                p.grad.mul_(1.0 / count)
        if self.step_in_backward and self._norm_sq is not None:
            self.last_grad_norm = self._norm_sq.sqrt()
        if self.step_in_backward and self._step_parameter is not None:
            self.optimizer.step()  # type: ignore[union-attr]  # no gradient left: hooks only
        if self.max_grad_norm is not None and self.grad_norm is not None:
            coef = (self.max_grad_norm / (self.grad_norm + 1e-6)).clamp(max=1.0)
            for s in self._slots:
                if s.param.grad is not None:
                    s.param.grad.mul_(coef.to(s.param.grad.device, s.param.grad.dtype))
        self._release()
        self.cycle += 1
        self.position = 0
        self.sync_gradients = True

    def _all_reduce(self) -> None:
        """Average the compressed buffers and the uncompressed gradients over the ranks."""
        world = dist.get_world_size(self._group)
        tensors = list(self._flats)
        plain = [s for s in self._slots if not s.compressed]
        for s in plain:
            if s.param.grad is None:
                s.param.grad = torch.zeros_like(s.param)
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for s in plain:
            g = s.param.grad
            by_kind.setdefault((g.device, g.dtype), []).append(g)  # type: ignore[union-attr]
        packed = [(grads, torch.cat([g.reshape(-1) for g in grads])) for grads in by_kind.values()]
        tensors.extend(flat for _, flat in packed)
        for t in tensors:
            dist.all_reduce(t, group=self._group)
            t.div_(world)
            self.last_communicated_bytes += t.numel() * t.element_size()
        for grads, flat in packed:
            for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(part.view_as(g))
        for s in self._slots:
            s.seen = True

    # ------------------------------------------------------------------ memory
    def plan(self) -> Plan:
        """Per-parameter decisions and exact accumulation bytes against plain accumulation.

        ``state_bytes`` is the buffer the accumulator keeps for the parameter during a cycle
        (the compressed ``C``, or the full-size gradient when it is not compressed);
        ``uncompressed_bytes`` is plain accumulation's full-size ``.grad``.
        """
        plan = Plan("GradientAccumulator", label="accumulation")
        for s in self._slots:
            d, p = s.decision, s.param
            naive = p.numel() * p.element_size()
            if d.compressed:
                itemsize = torch.empty((), dtype=s.dtype).element_size()
                held = math.prod(d.state_shape) * itemsize  # type: ignore[arg-type]
                if self.distribution == GRADIENT:  # the cycle's basis
                    held += d.rank * d.compressed_dim * itemsize  # type: ignore[operator]
                if self.cache_projection and s.sketch is not None:  # Omega (k, d), Psi (l, o)
                    k, l_ = s.sketch
                    entries = k * d.compressed_dim + l_ * d.kept_dim  # type: ignore[operator]
                    plan.projection_cache_bytes += entries * itemsize
                elif self.cache_projection:
                    plan.projection_cache_bytes += d.rank * d.compressed_dim * itemsize  # type: ignore[operator]
            elif self.step_in_backward:  # the sum is kept in the buffer dtype (float32)
                held = p.numel() * torch.empty((), dtype=s.dtype).element_size()
            else:
                held = naive
            plan.rows.append(
                PlanRow(
                    name=s.name,
                    shape=tuple(p.shape),
                    compressed=d.compressed,
                    reason=d.reason,
                    side=d.side if d.compressed else None,
                    rank=d.rank if d.compressed else None,
                    state_bytes=held,
                    uncompressed_bytes=naive,
                    adamw_bytes=0,
                )
            )
        return plan

    def buffer_bytes(self) -> int:
        """Bytes of accumulation buffers held right now (compressed buffers, the gradients
        of uncompressed parameters in ``p.grad`` or in step-in-backward buffers)."""
        total = sum(f.numel() * f.element_size() for f in self._flats)
        for s in self._slots:
            if s.compressed:
                if s.basis is not None:
                    total += s.basis.numel() * s.basis.element_size()
                continue
            t = s.buffer if s.buffer is not None else s.param.grad
            if t is not None and self.position > 0:
                total += t.numel() * t.element_size()
        return total

    def memory(self) -> AccumulationMemory:
        """Planned accumulation bytes and, on CUDA, the peak allocated memory."""
        plan = self.plan()
        device = self._slots[0].param.device
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return AccumulationMemory(
            plan.state_bytes, plan.uncompressed_bytes, plan.projection_cache_bytes, peak
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Position in the cycle, settings and buffers; loadable with ``weights_only=True``.

        Taken between micro-batches. Mid-cycle it holds the compressed buffers and the
        partial gradients of uncompressed parameters (which live in ``p.grad``), so a
        resumed run continues bit-identically.
        """
        if self._active:
            raise RuntimeError("state_dict() cannot be taken inside micro_batch()")
        buffers: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}
        bases: dict[str, Tensor] = {}
        seen: list[str] = []
        rows: dict[str, int] = {}
        if self.position > 0:
            for s in self._slots:
                if s.seen:
                    seen.append(s.name)
                if s.rows is not None:
                    rows[s.name] = s.rows
                if s.compressed:
                    buffers[s.name] = s.buffer.clone()  # type: ignore[union-attr]
                    if s.basis is not None:
                        bases[s.name] = s.basis.clone()
                else:
                    t = s.buffer if self.step_in_backward else s.param.grad
                    if t is not None:
                        grads[s.name] = t.clone()
        return {
            "version": _STATE_VERSION,
            "generator": self.generator,
            "cycle": self.cycle,
            "position": self.position,
            "settings": self._settings(),
            "compressed": [s.name for s in self._slots if s.compressed],
            "seen": seen,
            "buffers": buffers,
            "grads": grads,
            "bases": bases,
            "rows": rows,
        }

    def _settings(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "rank": self.rank,
            "seed": self.seed,
            "compress": self.compress,
            "side": self.side,
            "distribution": self.distribution,
            "reduction": self.reduction,
            "exclude": list(self.exclude),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the settings and compressed parameters must match.

        Everything is validated (settings, position, which parameters were seen, every
        buffer's and gradient's shape and dtype) before anything changes, so a refused
        ``state_dict`` leaves the accumulator as it was.
        """
        if self._active:
            raise RuntimeError("load_state_dict() cannot be called inside micro_batch()")
        if not isinstance(state_dict, dict) or state_dict.get("version") != _STATE_VERSION:
            raise ValueError("state_dict is not a GradientAccumulator state (version mismatch)")
        missing = {"cycle", "position", "settings", "compressed", "seen", "buffers", "grads"}
        missing -= set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}")
        saved = state_dict["settings"]
        if not isinstance(saved, dict):
            raise ValueError("state_dict['settings'] must be a dict")
        for key, value in self._settings().items():
            if saved.get(key) != value:
                raise ValueError(
                    f"state_dict was saved with {key}={saved.get(key)!r}, this accumulator "
                    f"has {key}={value!r}"
                )
        names = [s.name for s in self._slots if s.compressed]
        if list(state_dict["compressed"]) != names:
            raise ValueError("state_dict compresses different parameters than this accumulator")
        generator = state_dict.get("generator", 1)  # absent: written before generator v2
        if isinstance(generator, bool) or generator not in GENERATORS:
            raise ValueError(f"state_dict generator must be one of {GENERATORS}, got {generator!r}")
        cycle, position = state_dict["cycle"], state_dict["position"]
        for key, value in (("cycle", cycle), ("position", position)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict {key} must be a non-negative int, got {value!r}")
        if not 0 <= position < self.steps:
            raise ValueError(f"state_dict position {position} is outside [0, {self.steps})")
        managed = {s.name: s for s in self._slots}
        seen, buffers, grads = state_dict["seen"], state_dict["buffers"], state_dict["grads"]
        if not isinstance(buffers, dict) or not isinstance(grads, dict):
            raise ValueError("state_dict buffers and grads must be dicts")
        unknown = sorted({*seen, *grads} - set(managed))
        if unknown:
            raise ValueError(f"state_dict names parameters this accumulator lacks: {unknown}")
        if position > 0:
            for s in self._slots:
                if s.compressed:
                    _check_tensor(buffers.get(s.name), s.decision.state_shape, s.dtype, s.name)
            for name, g in grads.items():
                s = managed[name]
                if s.compressed:
                    raise ValueError(f"state_dict holds a full gradient for compressed {name!r}")
                _check_tensor(g, tuple(s.param.shape), None, name)
        bases = state_dict.get("bases", {})  # absent: written before the gradient basis
        if not isinstance(bases, dict):
            raise ValueError("state_dict bases must be a dict")
        for name, basis in bases.items():
            s = managed.get(name)  # type: ignore[assignment]
            if s is None or not s.compressed or self.distribution != GRADIENT:
                raise ValueError(f"state_dict holds a basis for {name!r}, which has none here")
            d = s.decision
            _check_tensor(basis, (d.rank, d.compressed_dim), s.dtype, name)  # type: ignore[arg-type]
        # absent: written before exact_rows; the setting itself is not compared: a state
        # without held rows continues compressed either way, one with rows needs the option
        rows = state_dict.get("rows", {})
        if not isinstance(rows, dict):
            raise ValueError("state_dict rows must be a dict")
        for name, n in rows.items():
            s = managed.get(name)  # type: ignore[assignment]
            if s is None or not s.capacity or position == 0:
                raise ValueError(f"state_dict holds exact rows for {name!r}, which has none here")
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= s.capacity:
                raise ValueError(
                    f"state_dict: {name!r} holds {n!r} exact rows, expected an int in "
                    f"[0, {s.capacity}]"
                )
        if self.distribution == GRADIENT and position > 0:
            lacking = [n for n in seen if managed[n].compressed and n not in bases]
            if lacking:
                raise ValueError(f"state_dict lacks the gradient bases of {lacking[:5]}")
        # valid: apply
        self._release()
        self.cycle, self.position, self.generator = cycle, position, generator
        for s in self._slots:  # cached projections may come from the other generator
            s.proj = None
        self.sync_gradients = False
        if position == 0:
            return
        self._allocate()
        for s in self._slots:
            s.seen = s.name in seen
            if s.compressed:
                s.buffer.copy_(buffers[s.name])  # type: ignore[union-attr]
                s.rows = rows.get(s.name)
                if s.name in bases:
                    s.basis = bases[s.name].to(s.param.device, copy=True)
                continue
            saved_grad = grads.get(s.name)
            value = None if saved_grad is None else saved_grad.to(s.param.device, copy=True)
            if value is not None and not self.step_in_backward:
                value = value.to(s.param.dtype)
            if self.step_in_backward:
                s.buffer = value
            else:
                s.param.grad = value

    def __repr__(self) -> str:
        compressed = sum(s.compressed for s in self._slots)
        return (
            f"GradientAccumulator(steps={self.steps}, rank={self.rank}, "
            f"compressed={compressed}/{len(self._slots)}, cycle={self.cycle}, "
            f"position={self.position}, step_in_backward={self.step_in_backward})"
        )
