"""The thin ``torch.optim.Optimizer`` shell shared by :class:`~flora.Flora`,
:class:`~flora.FloraAdamW`, :class:`~flora.FloraSGD` and :class:`~flora.FloraLion`.

It validates hyperparameters, names parameters, applies the compress-or-not policy
(:mod:`flora.policy`), fetches projections (:mod:`flora.projection`), keeps non-finite
gradients out of the state, keeps state in float32 for low-precision parameters across
``load_state_dict`` and builds the memory plan. Subclasses provide the per-parameter math.

Per-parameter state holds only tensors and Python ints:

* ``step`` — number of updates applied to this parameter;
* for a compressed momentum: ``key`` (stable parameter key), ``side`` (0 = left, 1 = right),
  ``window`` (index of the current projection) and ``window_start`` (step at which it began);
* ``nonfinite_skips`` — only once this parameter's update was skipped with
  ``nonfinite="skip_parameter"``;
* the subclass's tensors.

Non-finite gradients are found for the whole step before any parameter is touched (one
reduction per gradient and one host sync): ``nonfinite="skip"`` (default, GradScaler's
convention) skips the whole step, so every parameter's step counter stays equal;
``"skip_parameter"`` skips only the offending parameters; ``"raise"`` raises
``FloatingPointError`` with no parameter updated; ``"unchecked"`` does not look (no
reduction, no host sync: torch's optimizers' behaviour, for a loop whose ``GradScaler`` or
own check already decides).

The multi-tensor step (``foreach``; every optimizer here offers it) takes same-shaped
compressed matrices in buckets — same group,
state layout, dtype, device and step count, at most :data:`BUCKET_NUMEL` stacked entries, two
or more matrices — and steps each bucket with batched ops on stacked state
(:mod:`flora.optim.buckets`; ``state[p][key]`` are views of the stacks), seeded projections
generated per bucket (:func:`flora.projection.projection_matrices`). What it does not take —
uncompressed parameters, vectors, bf16/fp16 parameters, narrow moments, FSDP2 shards, cached
or generator-v1 projections, the first step and the step that starts a window — goes
through the per-parameter loop, the reference (``foreach=False`` takes everything there).

``load_state_dict`` follows ``torch.optim.Optimizer`` (its pre- and post-hooks run, in order),
then matches the saved parameters by name when both sides have names (a reordered group is
re-matched; a different set of names is refused, naming the differences), validates the saved
groups like the constructor and every state against the policy (keys, shapes, side, rank,
projection key) before anything changes, and keeps float32 state for fp16/bf16 parameters
(torch would cast it to the parameter's dtype); other floating state takes the parameter's
dtype, as in torch.

Under ``torch.distributed`` with more than one process, the first ``step()`` checks (one
``all_gather_object``) that every process uses the same settings, and raises ``ValueError``
naming the first setting that differs (``check_replicas=False`` turns this off, e.g. when not
every process calls ``step()``).

Under FSDP2 (``fully_shard``: DTensor parameters sharded by rows, ``Shard(0)``) every update
runs on the rank's own rows. The state tensors are DTensors too — row-wise states (momentum
``(m, r)``, second moments, row factors) are ``Shard(0)`` like the parameter, Adafactor's
column factor of a matrix ``(1, n)`` is ``Replicate()`` — so that
``torch.distributed.checkpoint`` can save them and load them at another world size. Global
statistics (a parameter's RMS, column means) are all-reduced through :class:`ShardReduce`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

try:  # DTensor parameters (FSDP2); absent on torch builds without torch.distributed
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

from flora.momentum import VARIANTS
from flora.optim.buckets import Bucket, StackedStates
from flora.options import (
    BASIS_DTYPES,
    MOMENT_DTYPES,
    NONFINITE_POLICIES,
    SIDE_CHOICES,
    check_bool,
    check_choice,
    check_dtype,
    check_int,
    check_real,
    is_int,
    state_dtype,
)
from flora.philox import random_words, stream_words
from flora.policy import (
    Decision,
    check_unique_names,
    compile_patterns,
    decide,
    momentum_growth,
    warn_unmatched_patterns,
)
from flora.projection import (
    DISTRIBUTIONS,
    GENERATOR,
    GENERATORS,
    GRADIENT,
    parameter_key,
    projection_matrices,
    projection_matrix,
    range_basis_steps,
)
from flora.quantization import absmax_shape, dequantize_int8, quantize_int8_
from flora.reductions import ShardSums, run_sums
from flora.replicas import check_same_settings
from flora.rounding import ROUNDINGS, compensated_round_, stochastic_round_stream_
from flora.state_plan import Plan, PlanRow

__all__ = ["FloraOptimizerBase", "ShardReduce", "group_defaults"]

#: most entries the multi-tensor step stacks per bucket (its workspace: about two stacks)
BUCKET_NUMEL = 2**22
#: on the CPU, ``foreach=None`` stacks matrices with a stored basis only up to this many
#: entries: larger ones are bound by memory traffic, where the stack's copy costs more than
#: the ops it saves; seeded projections, generated per bucket, pay at every size
#: (``benchmarks/results/stack_crossover_cpu.md``); ``foreach=True`` stacks every size
CPU_STACK_NUMEL = 2**16
_SIDE_CODES = {"left": 0, "right": 1}
_SIDE_NAMES = ("left", "right")
#: the momentum's projections: the seeded families, or a gradient basis kept in the state
MOMENTUM_DISTRIBUTIONS = (*DISTRIBUTIONS, GRADIENT)


def factored_zeros(grad: Tensor) -> tuple[Tensor, Tensor]:
    """Zero row factor ``(..., m, 1)`` and column factor ``(..., 1, n)`` for ``grad``."""
    row_shape, col_shape = list(grad.shape), list(grad.shape)
    row_shape[-1], col_shape[-2] = 1, 1
    return grad.new_zeros(row_shape), grad.new_zeros(col_shape)


def _all_finite(grads: list[Tensor]) -> list[bool]:
    """Per tensor: are all entries finite? One reduction pass each and one host sync.

    A NaN or Inf entry makes the sum non-finite; a finite tensor whose sum overflows is
    confirmed by the exact (four-pass) ``isfinite`` check, so there are no false verdicts.
    Only that rare case costs a second host sync.
    """
    device = grads[0].device
    sums = torch.stack([_as_float32(g.sum(), device) for g in grads])
    verdict = torch.isfinite(sums).tolist()
    suspects = [i for i, ok in enumerate(verdict) if not ok]
    if suspects:
        exact = torch.stack([torch.isfinite(grads[i]).all().to(device) for i in suspects])
        for i, ok in zip(suspects, exact.tolist(), strict=True):
            verdict[i] = bool(ok)
    return verdict


def _check_given_grad(param: Tensor, grad: Tensor) -> None:
    """A gradient handed to ``step_parameter``: a dense tensor of ``param``'s shape and
    device, of its dtype or float32; not for FSDP2 shards."""
    if not isinstance(grad, Tensor):
        raise TypeError(f"grad must be a Tensor, got {type(grad).__name__}")
    if _is_sharded(param) or isinstance(grad, DTensor):
        raise ValueError("grad cannot be given for an FSDP2 shard: set param.grad instead")
    if grad.shape != param.shape or grad.device != param.device:
        raise ValueError(
            f"grad must match param's shape {tuple(param.shape)} and device {param.device}, "
            f"got {tuple(grad.shape)} on {grad.device}"
        )
    if grad.dtype not in (param.dtype, torch.float32):
        raise ValueError(f"grad must be {param.dtype} or torch.float32, got {grad.dtype}")


def _window_starts(group: dict[str, Any], state: dict[str, Any], step: int) -> bool:
    """Whether step ``step`` of a compressed momentum starts a new window: ``step -
    window_start >= kappa`` (with a constant kappa at steps kappa, 2 kappa, ...)."""
    return step - state["window_start"] >= group["kappa"]


def _projection_shape(state: dict[str, Any], m: int, n: int) -> tuple[int, int]:
    """(rank, dim) of the projection of a compressed momentum on an (m, n) matrix view."""
    momentum = state["exp_avg"]
    if state["side"] == _SIDE_CODES["left"]:
        return momentum.shape[0], m
    return momentum.shape[1], n


def _as_float32(t: Tensor, device: torch.device) -> Tensor:
    return t if t.dtype == torch.float32 and t.device == device else t.to(device, torch.float32)


def _is_sharded(p: Tensor) -> bool:
    """A DTensor parameter (FSDP2); only row sharding, ``Shard(0)`` on a 1-D mesh, is handled."""
    if DTensor is None or not isinstance(p, DTensor):
        return False
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise NotImplementedError(
            f"Flora supports DTensor parameters sharded as (Shard(0),) on a 1-D mesh "
            f"(FSDP2's fully_shard default), got {tuple(p.placements)}"
        )
    return True


@dataclass(frozen=True)
class ShardReduce:
    """How a shard-local update reaches global statistics under FSDP2.

    ``shape`` is the parameter's global shape (its rows are split across the ranks);
    ``sum_`` all-reduces a tensor in place (sum) over the ranks holding the shards.
    """

    shape: torch.Size
    sum_: Callable[[Tensor], Any]


def _row_sharded_keys(p: Tensor) -> Callable[[str], bool]:
    """Which state keys are split by rows like ``p`` (the rest are replicated): all but the
    column factor of a matrix, whose rows are the reduced dimension, a gradient basis (over
    the columns: FSDP2 compresses on the right) and scalars."""
    replicated = {"projection", "residual_norm"}  # a basis over columns, a scalar
    return lambda key: key not in replicated and not (key == "col_var" and p.dim() == 2)


def _as_dtensor(local: Tensor, p: Tensor, row_sharded: bool) -> Tensor:
    """Wrap a state tensor computed on ``p``'s shard as a DTensor on ``p``'s mesh."""
    if row_sharded:
        shape = torch.Size((p.shape[0], *local.shape[1:]))
        placements = [Shard(0)]
    else:
        shape, placements = local.shape, [Replicate()]
    stride = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return DTensor.from_local(
        local, p.device_mesh, placements, run_check=False, shape=shape, stride=tuple(stride)
    )


def group_defaults(arguments: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments (its ``locals()`` on entry) as param-group defaults: every
    one but ``self``, ``params``, ``check_replicas`` and ``compiled``, in signature order."""
    skip = ("self", "params", "check_replicas", "compiled", "__class__")
    return {k: v for k, v in arguments.items() if k not in skip}


def _global_row_offset(whole: Tensor | None) -> int:
    """The first global row of this rank's shard of a row-sharded (FSDP2) DTensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    assert whole is not None
    offset = compute_local_shape_and_global_offset(
        whole.shape,
        whole.device_mesh,  # type: ignore[attr-defined]
        whole.placements,  # type: ignore[attr-defined]
    )[1]
    return int(offset[0]) if len(offset) else 0


def _is_moment(key: str, value: Any) -> bool:
    """State kept in ``moment_dtype``: every floating tensor with elements but the basis, the
    compensation and 8-bit scales (0-d scalars such as the limiter's norm stay in the state
    dtype); an int8-coded momentum is one too."""
    return (
        isinstance(value, Tensor)
        and (value.is_floating_point() or value.dtype == torch.int8)
        and value.dim() > 0
        and key not in ("projection", "compensation")
        and not key.endswith(_ABSMAX)
    )


_ABSMAX = "_absmax"  # suffix of an int8 state's per-block scales


def _moment_dtype(group: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The floating dtype moments are stored in: the group's ``moment_dtype`` (bf16 for the
    moments an int8 setting does not quantize), else ``dtype``."""
    chosen = group["moment_dtype"] or dtype
    return torch.bfloat16 if chosen == torch.int8 else chosen


def _quantized(group: dict[str, Any], key: str, state: dict[str, Any]) -> bool:
    """Whether ``state[key]`` is kept 8-bit: the compressed momentum with int8 moments."""
    return group["moment_dtype"] == torch.int8 and key == "exp_avg" and "side" in state


def _stored_dtype(
    group: dict[str, Any], key: str, value: Tensor, dtype: torch.dtype, param_dtype: torch.dtype
) -> torch.dtype:
    """The dtype state entry ``key`` is kept in (``dtype``: the state dtype)."""
    if key == "projection":
        return _basis_dtype(group, dtype)
    if key == "compensation":
        return param_dtype
    if key.endswith(_ABSMAX):
        return torch.float32
    return _moment_dtype(group, dtype) if _is_moment(key, value) else dtype


def _widened(view: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``view`` with its moments in ``dtype`` for the update's math (copies; int8 codes
    decoded with their scales, which the math does not see)."""
    out = {}
    for k, v in view.items():
        if k.endswith(_ABSMAX):
            continue
        if isinstance(v, Tensor) and v.dtype == torch.int8:
            out[k] = dequantize_int8(v, view[k + _ABSMAX], dtype)
        else:
            out[k] = v.to(dtype) if _is_moment(k, v) else v
    return out


def _compensated(group: dict[str, Any], p: Tensor) -> bool:
    """Whether ``p`` keeps a bf16 compensation buffer (``rounding="compensated"``)."""
    return group["rounding"] == "compensated" and p.dtype == torch.bfloat16


def _basis_dtype(group: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient basis is stored in: the group's ``basis_dtype``, else ``dtype``."""
    return group["basis_dtype"] or dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _local(t: Any) -> Any:
    return t._local_tensor if DTensor is not None and isinstance(t, DTensor) else t


class FloraOptimizerBase(Optimizer):
    """Shared machinery; see the module docstring. Not meant to be instantiated directly."""

    #: which projection stream the momentum uses (accumulation uses another)
    projection_stream = "momentum"

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        check_replicas: bool = True,
        compiled: bool = False,
    ) -> None:
        check_bool("check_replicas", check_replicas)
        check_bool("compiled", compiled)
        #: whether the multi-tensor step's bucket functions run ``torch.compile``-d
        self.compiled = compiled
        self._compiled_fns: dict[Callable[..., None], Callable[..., None]] = {}
        self._validate_group(defaults, "")
        # stable parameter key -> ((seed, key, window, rank, dim), projection)
        self._projection_cache: dict[int, tuple[tuple[int, ...], Tensor]] = {}
        self._option_names = tuple(defaults)
        self._shards: ShardReduce | None = None  # set while _update runs on an FSDP2 shard
        self._current_param: Tensor | None = None  # the parameter _update is working on
        self._replicas_unchecked = check_replicas  # checked across processes at first step
        # ((group ids, parameter count), id(param) -> (group, name)) for step_parameter
        self._index: tuple[Any, dict[int, tuple[dict[str, Any], str]]] | None = None
        self._stacked = StackedStates()  # the multi-tensor step's stacked states (buckets)
        #: whole steps skipped because of non-finite gradients (``nonfinite="skip"``), since
        #: construction (not part of ``state_dict``)
        self.skipped_steps = 0
        super().__init__(params, defaults)
        self._report_policy()

    # ------------------------------------------------------------------ validation
    def _validate_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        """Subclass hook: validate the base optimizer's own hyperparameters."""
        raise NotImplementedError

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        check_real(f"{where}lr", group["lr"], 0.0, math.inf, high_open=False)
        check_real(f"{where}weight_decay", group["weight_decay"], 0.0, math.inf, high_open=False)
        for key, low in (("rank", 1), ("kappa", 1), ("seed", 0)):
            check_int(f"{where}{key}", group[key], low)
        for flag in ("compress", "maximize", "cache_projection"):
            check_bool(f"{where}{flag}", group[flag])
        if group.get("foreach") is not None:
            check_bool(f"{where}foreach", group["foreach"])
        choices = (
            ("side", SIDE_CHOICES),
            ("momentum_variant", VARIANTS),
            ("nonfinite", NONFINITE_POLICIES),
            ("distribution", MOMENTUM_DISTRIBUTIONS),
            ("rounding", ROUNDINGS),
        )
        for key, options in choices:
            check_choice(f"{where}{key}", group[key], options)
        check_dtype(f"{where}basis_dtype", group["basis_dtype"], BASIS_DTYPES)
        check_dtype(f"{where}moment_dtype", group["moment_dtype"], MOMENT_DTYPES)
        if group["distribution"] == GRADIENT:
            if group["momentum_variant"] != "subspace":
                raise ValueError(
                    f"{where}distribution='gradient' (Flora's default) needs "
                    f"momentum_variant='subspace', got {group['momentum_variant']!r}: only "
                    "that form keeps the momentum inside an orthonormal basis, which a "
                    "gradient basis is; pass a seed-only distribution with it, e.g. "
                    "distribution='gaussian' (the paper's)"
                )
            if group["cache_projection"]:
                raise ValueError(
                    f"{where}cache_projection=True has no effect with distribution='gradient' "
                    "(Flora's default: its basis is kept in the state): leave it False, or "
                    "cache a seed-only distribution, e.g. distribution='orthonormal'"
                )
        group["exclude"] = compile_patterns(group["exclude"])
        self._validate_hyperparameters(group, where)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group like ``torch.optim.Optimizer``; it is validated before it is kept, so
        after an error the optimizer is unchanged and a corrected group can be added."""
        super().add_param_group(param_group)
        try:
            self._check_new_group(self.param_groups[-1], len(self.param_groups) - 1)
        except BaseException:
            self.param_groups.pop()
            raise

    def _check_new_group(self, group: dict[str, Any], index: int) -> None:
        self._validate_group(group, f"param_groups[{index}].")
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(
                    f"{type(self).__name__} does not support complex parameters "
                    f"(param_groups[{index}] holds one of shape {tuple(p.shape)})"
                )
            if p.dtype == torch.float16 and group["rounding"] != "nearest":
                raise ValueError(
                    f"param_groups[{index}].rounding={group['rounding']!r} is for bf16 "
                    "parameters; float16 ones need rounding='nearest' (or a bf16 model)"
                )
        if group["exclude"] and "param_names" not in group:
            raise ValueError("exclude patterns need parameter names: pass model.named_parameters()")
        if "param_names" in group:  # names key the projections: two must never share one
            check_unique_names(
                [n for g in self.param_groups for n in g.get("param_names", ())],
                f"{type(self).__name__} parameter names",
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_projection_cache", {})
        self.__dict__.setdefault("_shards", None)
        self.__dict__.setdefault("_current_param", None)
        self.__dict__.setdefault("_replicas_unchecked", False)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_index", None)
        self.__dict__.setdefault("_stacked", StackedStates())
        self.__dict__.setdefault("compiled", False)
        self.__dict__.setdefault("_compiled_fns", {})
        for key in self.__dict__.get("_option_names", ()):  # options added in later versions
            for group in self.param_groups:
                group.setdefault(key, self.defaults[key])

    # ------------------------------------------------------------------ naming and policy
    def _named_params(self) -> Iterable[tuple[dict[str, Any], str, Tensor]]:
        position = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                yield group, (names[i] if names else f"param{position}"), p
                position += 1

    def _key_of(self, group: dict[str, Any], name: str) -> int:
        if "param_names" in group:
            return parameter_key(name)
        return parameter_key(int(name[len("param") :]))

    def _decide(self, group: dict[str, Any], name: str, p: Tensor) -> Decision:
        """The policy on the *global* shape; a row-sharded (FSDP2) matrix is compressed on
        the right (:func:`flora.policy.decide`, ``row_sharded``)."""
        return decide(
            name,
            p.shape,
            rank=group["rank"],
            compress=group["compress"],
            exclude=group["exclude"],
            side=group["side"],
            row_sharded=p.dim() >= 2 and _is_sharded(p),
        )

    def decision(self, param: Tensor) -> Decision:
        """The policy's decision for ``param`` under its group's current settings."""
        for group, name, p in self._named_params():
            if p is param:
                return self._decide(group, name, p)
        raise ValueError("param is not optimized by this optimizer")

    def _uses_momentum(self, group: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _beta1(self, group: dict[str, Any]) -> float:
        """Subclass hook: the momentum coefficient of ``group``."""
        raise NotImplementedError

    def _growth(self, group: dict[str, Any], d: Decision) -> float | None:
        """How much the compressed momentum's error can grow per window, for a compressed
        parameter with momentum, else None (see :func:`flora.policy.momentum_growth`)."""
        if not (d.compressed and self._uses_momentum(group)):
            return None
        return momentum_growth(
            self._beta1(group), group["kappa"], d.compressed_dim, d.rank,  # type: ignore[arg-type]
            variant=group["momentum_variant"], distribution=group["distribution"],
        )  # fmt: skip

    def _report_policy(self) -> None:
        too_small, unstable, matrices, compressed = [], [], 0, 0
        for group, name, p in self._named_params():
            d = self._decide(group, name, p)
            if p.dim() >= 2 and group["compress"] and self._uses_momentum(group):
                matrices += 1
                compressed += d.compressed
                if not d.compressed and d.rank is not None:
                    too_small.append(f"{name} {tuple(p.shape)}")
            growth = self._growth(group, d)
            if growth is not None and growth >= 1:
                unstable.append(f"{name} ({growth:.2f})")
        for group in self.param_groups:
            warn_unmatched_patterns(
                group["exclude"], group.get("param_names", ()), "exclude", stacklevel=5
            )
        cls = type(self).__name__
        if unstable:
            warnings.warn(
                f"{cls}: the compressed momentum can grow without bound for "
                f"{len(unstable)} parameter(s): beta1**kappa * sqrt(1 + (d+1)/rank) >= 1 for "
                + ", ".join(unstable[:5])
                + (" ..." if len(unstable) > 5 else "")
                + ". Each resampling multiplies the stale momentum's noise by "
                "sqrt(1 + (d+1)/rank); raise kappa or rank. See optimizer.plan().",
                RuntimeWarning,
                stacklevel=4,
            )
        shown = ", ".join(too_small[:5]) + (" ..." if len(too_small) > 5 else "")
        if matrices and not compressed:
            warnings.warn(
                f"{cls}: no parameter is compressed ({matrices} matrices considered"
                + (f"; rank >= compressed dimension for {shown}" if too_small else "")
                + "); memory equals the uncompressed optimizer. See optimizer.plan().",
                stacklevel=4,
            )
        elif too_small:
            warnings.warn(
                f"{cls}: {len(too_small)} matrix parameter(s) keep uncompressed momentum "
                f"because rank >= their compressed dimension: {shown}. "
                "See optimizer.plan().",
                stacklevel=4,
            )

    # ------------------------------------------------------------------ projections
    def _projection(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], window: int
    ) -> Tensor:
        if group["distribution"] == GRADIENT:  # data-dependent: only the current one exists
            if "projection" not in state or window != state["window"]:
                raise ValueError(
                    "distribution='gradient': a basis exists only for the current window, "
                    "after the window's first step"
                )
            basis, dtype = state["projection"], state_dtype(p)
            return basis if basis.dtype == dtype else basis.to(dtype)
        # p may be a (possibly empty) row shard
        rank, dim = _projection_shape(state, p.shape[0], math.prod(p.shape[1:]))
        generator = state.get("generator", 1)  # states from before v2 name none
        cache_key = (group["seed"], state["key"], window, rank, dim, generator)
        if group["cache_projection"]:
            cached = self._projection_cache.get(state["key"])
            if cached is not None and cached[0] == cache_key:
                return cached[1]
        proj = projection_matrix(
            rank,
            dim,
            seed=group["seed"],
            key=state["key"],
            window=window,
            stream=self.projection_stream,
            distribution=group["distribution"],
            device=p.device,
            dtype=state_dtype(p),
            generator=generator,
        )
        if group["cache_projection"]:
            self._projection_cache[state["key"]] = (cache_key, proj)
        return proj

    def projection(self, param: Tensor, window: int | None = None) -> Tensor | None:
        """The projection ``param``'s momentum uses now (or in ``window``), or None.

        Returns the ``(rank, dim)`` matrix of :func:`flora.projection.projection_matrix`;
        the side is ``self.decision(param).side``. Before the first step the state does not
        exist yet and window 0 is used. With ``distribution="gradient"`` only the current
        window's basis exists (from its first step on); any other request raises ValueError.
        """
        for group, name, p in self._named_params():
            if p is not param:
                continue
            state = self.state.get(p, {})
            if "side" in state:
                return self._projection(
                    p, group, state, state["window"] if window is None else window
                )
            d = self._decide(group, name, p)
            if not d.compressed or not self._uses_momentum(group):
                return None
            if group["distribution"] == GRADIENT:
                raise ValueError(
                    "distribution='gradient': the basis is found from the gradient at the "
                    "first step; there is none before it"
                )
            dim = d.compressed_dim
            assert dim is not None and d.rank is not None
            return projection_matrix(
                d.rank,
                dim,
                seed=group["seed"],
                key=self._key_of(group, name),
                window=0 if window is None else window,
                stream=self.projection_stream,
                distribution=group["distribution"],
                device=p.device,
                dtype=state_dtype(p),
            )
        raise ValueError("param is not optimized by this optimizer")

    def _momentum_projections(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], step: int, grad: Tensor
    ) -> Generator[Tensor, None, tuple[Tensor, Tensor | None, str]]:
        """(P of the stored momentum, P of the new window or None, side); advances the window.

        A new window starts when ``step - window_start >= kappa``: with a constant kappa at
        steps ``kappa, 2 kappa, ...`` (Algorithm 2: "if t is a multiple of kappa"); only then
        is the second entry a matrix, and the momentum is transferred to it. With
        ``distribution="gradient"`` a window's basis is :func:`flora.projection.range_basis`
        of ``grad`` at its first step (step 1 for window 0), kept as ``state["projection"]``.
        A :data:`ShardSums` body (the gradient basis of a shard asks for sums).
        """
        side = _SIDE_NAMES[state["side"]]
        if group["distribution"] == GRADIENT and "projection" not in state:
            state["projection"] = yield from self._gradient_basis(p, group, state, grad, side)
        proj = self._projection(p, group, state, state["window"])
        if not _window_starts(group, state, step):
            return proj, None, side
        state["window"] += 1
        state["window_start"] = step
        if group["distribution"] == GRADIENT:
            state["projection"] = yield from self._gradient_basis(p, group, state, grad, side)
        return proj, self._projection(p, group, state, state["window"]), side

    def _gradient_basis(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], grad: Tensor, side: str
    ) -> Generator[Tensor, None, Tensor]:
        """This window's basis from ``grad`` (:func:`flora.projection.range_basis_steps`; on
        an FSDP2 shard a :data:`ShardSums` body: its products are sums over the rows)."""
        momentum = state["exp_avg"]
        rank = momentum.shape[0] if side == "left" else momentum.shape[1]
        matrix = grad.reshape(p.shape[0], math.prod(p.shape[1:]))
        shard = None
        if self._shards is not None:  # FSDP2: this rank's rows of the global matrix
            offset = _global_row_offset(self._current_param)
            shard = (offset, int(self._shards.shape[0]))
        try:
            basis = yield from range_basis_steps(
                matrix.to(state_dtype(p)), rank, side,  # type: ignore[arg-type]
                seed=group["seed"], key=state["key"], window=state["window"],
                stream=self.projection_stream, shard=shard, generator=state.get("generator", 1),
            )  # fmt: skip
        except torch.linalg.LinAlgError as err:  # a NaN/Inf gradient nothing checked
            raise FloatingPointError(
                f"{type(self).__name__}: the gradient basis of a {tuple(p.shape)} matrix "
                f"cannot be found from its gradient at window {state['window']} (non-finite "
                f"entries? nonfinite={group['nonfinite']!r} lets them through)"
            ) from err
        dtype = _basis_dtype(group, state_dtype(p))
        return basis if basis.dtype == dtype else basis.to(dtype)

    def _init_momentum(
        self, p: Tensor, group: dict[str, Any], name: str, state: dict[str, Any]
    ) -> None:
        """Create ``exp_avg``: compressed per the policy, else full size. ``p`` is the tensor
        being updated (a shard under FSDP2); the decision uses the parameter's global shape."""
        d = self._decide(group, name, self._current_param if self._current_param is not None else p)
        dtype = state_dtype(p)
        if d.compressed:
            state["key"] = self._key_of(group, name)
            state["side"] = _SIDE_CODES[d.side]  # type: ignore[index]
            state["window"] = 0
            state["window_start"] = 0
            state["generator"] = GENERATOR  # how its projections are drawn, for resumes
            # p is the local tensor: under FSDP2 a row shard, so a right-side state is (m_local, r)
            n = math.prod(p.shape[1:])
            shape = (d.rank, n) if d.side == "left" else (p.shape[0], d.rank)
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)  # type: ignore[arg-type]
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ plan
    def _state_bytes(
        self, group: dict[str, Any], d: Decision, dtype: torch.dtype
    ) -> tuple[int, int]:
        """(bytes of state, bytes with compression off) for one parameter whose state
        tensors are kept in ``dtype`` (a gradient basis in its ``basis_dtype``)."""
        itemsize = _itemsize(_moment_dtype(group, dtype))  # moments; scalars stay in dtype
        numel = math.prod(d.shape)
        shapes = self._second_moment_shapes(group, d).values()
        second = sum(math.prod(s) for s in shapes if len(s)) * itemsize
        second += sum(1 for s in shapes if not len(s)) * _itemsize(dtype)
        if not self._uses_momentum(group):
            return second, second
        momentum = math.prod(d.state_shape) if d.compressed else numel  # type: ignore[arg-type]
        extra = 0
        if d.compressed and group["moment_dtype"] == torch.int8:  # codes and block scales
            extra += momentum + 4 * math.prod(absmax_shape(d.state_shape))  # type: ignore[arg-type]
            momentum = 0
        if d.compressed and group["distribution"] == GRADIENT:  # the stored basis
            basis = d.rank * d.compressed_dim  # type: ignore[operator]
            extra += basis * _itemsize(_basis_dtype(group, dtype))
        if not len(d.shape):  # a scalar parameter's momentum is a scalar: the state dtype
            itemsize = _itemsize(dtype)
        return second + momentum * itemsize + extra, second + numel * itemsize

    def plan(self) -> Plan:
        """Per-parameter decisions and exact state bytes (see :class:`flora.state_plan.Plan`)."""
        plan = Plan(type(self).__name__)
        for group, name, p in self._named_params():
            d = self._decide(group, name, p)
            if not p.requires_grad:  # never has a gradient, so never gets state
                plan.rows.append(
                    PlanRow(name, tuple(p.shape), False, "frozen (requires_grad=False)",
                            None, None, 0, 0, 0)
                )  # fmt: skip
                continue
            itemsize = _itemsize(state_dtype(p))
            state_bytes, full_bytes = self._state_bytes(group, d, state_dtype(p))
            if _compensated(group, p):  # the bf16 compensation buffer, either way
                state_bytes += 2 * p.numel()
                full_bytes += 2 * p.numel()
            compressed = d.compressed and self._uses_momentum(group)
            plan.rows.append(
                PlanRow(
                    name=name,
                    shape=tuple(p.shape),
                    compressed=compressed,
                    reason=d.reason if self._uses_momentum(group) else "no momentum (beta1=0)",
                    side=d.side if compressed else None,
                    rank=d.rank if compressed else None,
                    state_bytes=state_bytes,
                    uncompressed_bytes=full_bytes,
                    adamw_bytes=2 * p.numel() * p.element_size(),
                    growth=self._growth(group, d) if compressed else None,
                )
            )
            if compressed and group["cache_projection"]:
                plan.projection_cache_bytes += d.rank * d.compressed_dim * itemsize  # type: ignore[operator]
        return plan

    def state_bytes(self) -> int:
        """Bytes of all tensors currently held in ``self.state`` (on this rank: the local
        shards of DTensor states)."""
        return sum(
            _local(v).numel() * v.element_size()
            for s in self.state.values()
            for v in s.values()
            if isinstance(v, Tensor)
        )

    def projection_cache_bytes(self) -> int:
        """Bytes of projections cached with ``cache_projection=True``."""
        return sum(t.numel() * t.element_size() for _, t in self._projection_cache.values())

    # ------------------------------------------------------------------ state dict
    def _second_moment_shapes(
        self, group: dict[str, Any], d: Decision
    ) -> dict[str, tuple[int, ...]]:
        """Subclass hook: the second-moment state tensors of a parameter (policy ``d``)."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer``, with names, validation and Flora's dtypes.

        Order: the registered pre-hooks; then (as the last pre-hook) matching by parameter
        name and validation of every group and state — nothing is changed if it fails;
        torch's positional load; then, before the registered post-hooks, each floating state
        tensor is re-copied from the (hook-processed) ``state_dict`` in the state dtype
        (float32 for fp16/bf16 parameters, else the parameter's dtype), so what a post-hook
        does is kept.
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        loaded: dict[str, Any] = {}

        def pre_hook(optimizer: Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
            sd = self._match_by_name(sd)
            self._check_loaded(sd)
            loaded["sd"] = sd
            return sd

        def post_hook(optimizer: Optimizer) -> None:
            self._restore_dtypes(loaded["sd"])

        pre = self.register_load_state_dict_pre_hook(pre_hook)
        post = self.register_load_state_dict_post_hook(post_hook, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
        self._projection_cache.clear()
        self._stacked.clear()

    def _match_by_name(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Reorder each saved group's parameters to this optimizer's order by their names."""
        saved_groups = sd["param_groups"]
        cls = type(self).__name__
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            n = len(saved_groups) if isinstance(saved_groups, list) else "no list of"
            raise ValueError(
                f"state_dict has {n} parameter group(s), this {cls} has {len(self.param_groups)}"
            )
        new_groups = []
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"state_dict param_groups[{i}] is not a parameter group")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict param_groups[{i}] holds {len(saved['params'])} parameters, "
                    f"this {cls}'s holds {len(group['params'])}"
                )
            names, saved_names = group.get("param_names"), saved.get("param_names")
            if names is None or saved_names is None or list(names) == list(saved_names):
                new_groups.append(saved)
                continue
            if len(set(saved_names)) != len(saved_names) or set(names) != set(saved_names):
                missing = sorted(set(names) - set(saved_names))
                extra = sorted(set(saved_names) - set(names))
                raise ValueError(
                    f"state_dict param_groups[{i}] holds other parameters than this {cls}: "
                    f"missing {missing[:5]}, unexpected {extra[:5]}"
                    + ("" if missing or extra else " (duplicate names in the state_dict)")
                )
            by_name = dict(zip(saved_names, saved["params"], strict=True))
            new_groups.append(
                {**saved, "params": [by_name[n] for n in names], "param_names": list(names)}
            )
        return {**sd, "param_groups": new_groups}

    def _check_loaded(self, sd: dict[str, Any]) -> None:
        """Validate the saved groups like the constructor, and every state against the
        policy those groups imply; raise ValueError naming the group or parameter."""
        groups = []
        for i, saved in enumerate(sd["param_groups"]):
            group = {**self.defaults, **saved}  # options added in later versions: defaults
            try:
                self._validate_group(dict(group), f"state_dict param_groups[{i}].")
            except TypeError as err:  # a bad saved value is a bad state_dict: one error type
                raise ValueError(f"{err} (a state saved by another optimizer?)") from err
            groups.append(group)
        where_of: dict[Any, tuple[dict[str, Any], str, Tensor]] = {}
        position = 0
        for group, current, saved in zip(
            groups, self.param_groups, sd["param_groups"], strict=True
        ):
            names = current.get("param_names")
            for j, (saved_id, p) in enumerate(zip(saved["params"], current["params"], strict=True)):
                where_of[saved_id] = (group, names[j] if names else f"param{position}", p)
                position += 1
        state = sd["state"]
        if not isinstance(state, dict):
            raise ValueError("state_dict['state'] must be a dict")
        for saved_id, st in state.items():
            if saved_id not in where_of:
                raise ValueError(f"state_dict holds state for an unknown parameter id {saved_id!r}")
            group, name, p = where_of[saved_id]
            self._check_param_state(group, name, p, st)

    def _check_param_state(self, group: dict[str, Any], name: str, p: Tensor, st: Any) -> None:
        cls = type(self).__name__
        where = f"state_dict: state of {name!r}"
        if not isinstance(st, dict):
            raise ValueError(f"{where} is not a dict")
        if not st:
            return
        step = st.get("step")
        if not is_int(step) or step < 0:
            raise ValueError(
                f"{where}: 'step' must be a non-negative int, got {type(step).__name__} "
                f"(a state saved by another optimizer than {cls}?)"
            )
        shape = tuple(p.shape)
        d = self._decide(group, name, p)
        expected: dict[str, tuple[int, ...]] = dict(self._second_moment_shapes(group, d))
        ints = {"step", "nonfinite_skips"}
        if self._uses_momentum(group) and "exp_avg" in st:
            if d.compressed:
                for key in ("key", "side", "window", "window_start"):
                    if not is_int(st.get(key)):
                        raise ValueError(
                            f"{where}: a full-size momentum, but {cls} compresses it now "
                            f"({d.reason}); load into an optimizer with the same settings"
                        )
                saved_side = st["side"]
                if saved_side not in (0, 1) or _SIDE_NAMES[saved_side] != d.side:
                    saved = _SIDE_NAMES[saved_side] if saved_side in (0, 1) else saved_side
                    raise ValueError(
                        f"{where}: momentum compressed on the {saved} side, this {cls} "
                        f"compresses it on the {d.side} ({d.reason}); pass side={saved!r} "
                        "(FSDP2 compresses row-sharded matrices on the right: use "
                        "side='right' in both runs to move between one device and FSDP2)"
                    )
                if st["key"] != self._key_of(group, name):
                    raise ValueError(
                        f"{where}: saved with the projection key of another parameter name or "
                        "position, so its momentum would be decoded with another projection"
                    )
                if st["window_start"] > step or st["window"] < 0:
                    raise ValueError(f"{where}: inconsistent window {st['window']}")
                if st.get("generator", 1) not in GENERATORS:  # absent: written before v2
                    raise ValueError(
                        f"{where}: projection generator {st.get('generator')!r} is not one "
                        f"of {GENERATORS} (a state from a newer flora?)"
                    )
                ints |= {"key", "side", "window", "window_start", "generator"}
                expected["exp_avg"] = d.state_shape  # type: ignore[assignment]
                if group["moment_dtype"] == torch.int8:
                    expected["exp_avg" + _ABSMAX] = absmax_shape(d.state_shape)  # type: ignore[arg-type]
                if group["distribution"] == GRADIENT:
                    expected["projection"] = (d.rank, d.compressed_dim)  # type: ignore[assignment]
                    if "projection" not in st:
                        raise ValueError(
                            f"{where}: no 'projection', which distribution='gradient' keeps "
                            "(saved with a seeded distribution? load with the same one)"
                        )
            else:
                if "side" in st:
                    raise ValueError(
                        f"{where}: a compressed momentum, but {cls} keeps it full size now "
                        f"({d.reason}); load into an optimizer with the same settings"
                    )
                expected["exp_avg"] = shape
        if _compensated(group, p):
            expected["compensation"] = shape
        for key, value in st.items():
            if key in ints:
                if not is_int(value):
                    raise ValueError(f"{where}: {key!r} must be an int")
                continue
            if key not in expected:
                raise ValueError(
                    f"{where}: unexpected entry {key!r} (a state saved by another optimizer "
                    f"or with other settings than this {cls}?)"
                )
            coded = key == "exp_avg" and group["moment_dtype"] == torch.int8 and d.compressed
            if not isinstance(value, Tensor) or not (
                value.dtype == torch.int8 if coded else value.is_floating_point()
            ):
                kind = "an int8 tensor (moment_dtype=torch.int8)" if coded else "a float tensor"
                raise ValueError(f"{where}: {key!r} must be {kind}")
            if tuple(value.shape) != tuple(expected[key]):
                raise ValueError(
                    f"{where}: {key!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(expected[key])}"
                )
        missing = [k for k in self._second_moment_shapes(group, d) if k not in st]
        if missing:
            raise ValueError(f"{where}: missing {missing}")

    def _restore_dtypes(self, sd: dict[str, Any]) -> None:
        """Re-copy the state tensors from ``sd`` in their dtypes (torch cast them all to the
        parameter's dtype, which would round float32 state of bf16 parameters and turn int8
        codes into floats): floats in the state dtype, a gradient basis in its group's
        ``basis_dtype``, moments in ``moment_dtype``, other tensors as saved."""
        for saved_group, group in zip(sd["param_groups"], self.param_groups, strict=True):
            for saved_id, p in zip(saved_group["params"], group["params"], strict=True):
                saved = sd["state"].get(saved_id)
                if not saved:
                    continue
                dtype = state_dtype(p)
                for key, value in saved.items():
                    if isinstance(value, Tensor):  # (torch casts int8 codes to floats too)
                        to = (
                            _stored_dtype(group, key, value, dtype, p.dtype)
                            if value.is_floating_point()
                            else value.dtype
                        )
                        self.state[p][key] = value.to(device=p.device, dtype=to, copy=True)

    # ------------------------------------------------------------------ step
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
        """Subclass hook: one update of ``p`` (already in the state dtype, as is ``grad``)
        as a :data:`ShardSums` body, which asks for sums only on an FSDP2 shard
        (``self._shards`` set); with ``scratch`` the update may overwrite ``grad`` (a copy
        nobody else reads)."""
        raise NotImplementedError

    def _momentum_inputs(
        self,
        p: Tensor,
        group: dict[str, Any],
        name: str,
        state: dict[str, Any],
        beta1: float,
        grad: Tensor,
    ) -> Generator[Tensor, None, tuple[Tensor, Tensor | None, str] | None]:
        """Create the momentum lazily; return this step's projections if it is compressed.
        A :data:`ShardSums` body (``projections = yield from self._momentum_inputs(...)``)."""
        if beta1 > 0 and "exp_avg" not in state:
            self._init_momentum(p, group, name, state)
        if beta1 > 0 and "side" in state:
            return (yield from self._momentum_projections(p, group, state, state["step"] + 1, grad))
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model, returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        named = [(g, name, p) for g, name, p in self._named_params() if p.grad is not None]
        self._step_named(named)
        return loss

    @torch.no_grad()
    def step_parameter(
        self, param: Tensor, grad: Tensor | None = None, *, consume: bool = False
    ) -> None:
        """Step ``param`` alone, as ``step()`` would if only ``param`` had a gradient, in time
        independent of the number of parameters (step-in-backward calls it once per parameter;
        :class:`flora.GradientAccumulator` then calls ``step()`` once, with no gradient left,
        so that step hooks and LR schedulers see one step per cycle). A parameter without a
        gradient is left alone; one the optimizer does not hold raises ValueError. Step hooks
        do not run.

        ``grad``, if given, is used instead of ``param.grad``: a dense tensor of ``param``'s
        shape and device, of the parameter's dtype or float32 (the accumulator hands a bf16
        parameter its float32 estimate this way, which ``param.grad`` could not hold: no
        rounding to bf16, and no bf16 copy beside the float32 one). Not for FSDP2 shards.
        ``consume=True`` lets the step overwrite that ``grad`` (its memory becomes the step's
        workspace; the accumulator hands over its fresh estimate this way)."""
        groups = tuple(id(g) for g in self.param_groups)
        count = sum(len(g["params"]) for g in self.param_groups)
        if self._index is None or self._index[0] != (groups, count):
            table = {id(p): (g, name) for g, name, p in self._named_params()}
            self._index = ((groups, count), table)
        entry = self._index[1].get(id(param))
        if entry is None:
            raise ValueError("param is not optimized by this optimizer")
        if grad is not None:
            _check_given_grad(param, grad)
            self._step_named([(entry[0], entry[1], param)], grads=[grad], consume=consume)
        elif param.grad is not None:
            self._step_named([(entry[0], entry[1], param)])

    def _step_named(
        self,
        named: list[tuple[dict[str, Any], str, Tensor]],
        grads: list[Tensor] | None = None,
        consume: bool = False,
    ) -> None:
        """The body of ``step()`` for the parameters in ``named`` (those with a gradient):
        the multi-tensor step for the buckets the subclass's engine takes
        (:meth:`_bucket_eligible`), the per-parameter loop for the rest. ``grads`` (from
        :meth:`step_parameter`) replace the parameters' ``.grad`` and take the loop
        (``consume``: the step may overwrite them)."""
        given = grads is not None  # from step_parameter: the loop (the engine stacks .grad)
        if grads is None:
            grads = [p.grad for _, _, p in named]
        for (_, name, _), grad in zip(named, grads, strict=True):
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients ({name})"
                )
            if grad.is_complex():
                raise RuntimeError(
                    f"{type(self).__name__} does not support complex gradients ({name})"
                )
        if self._replicas_unchecked:
            self._check_replicas()
        if not named:
            return
        # FSDP2: work on each rank's shard; decisions use the global shape (see _decide)
        sharded = [_is_sharded(p) for _, _, p in named]
        locals_ = [
            (p._local_tensor, grad._local_tensor) if is_sharded else (p, grad)
            for (_, _, p), grad, is_sharded in zip(named, grads, sharded, strict=True)
        ]
        checked = [i for i, (g, _, _) in enumerate(named) if g["nonfinite"] != "unchecked"]
        finite = [True] * len(named)
        if checked:
            verdict = _all_finite([locals_[i][1] for i in checked])
            for i, ok in zip(checked, verdict, strict=True):
                finite[i] = ok
            if any(sharded):  # every rank must take the same skip decision
                finite = self._agree(named, sharded, finite)
        if not all(finite) and self._skip_whole_step(named, finite):
            return
        if given:
            buckets, rest = [], {id(p) for _, _, p in named}
        else:
            buckets, rest = self._buckets([e for e, ok in zip(named, finite, strict=True) if ok])
        bodies = []
        for (group, name, p), ok, is_sharded, (local, local_grad) in zip(
            named, finite, sharded, locals_, strict=True
        ):
            if is_sharded:
                body = self._step_body(group, name, p, ok, True, local, local_grad, consume)
                bodies.append((body, p))
            elif not ok or id(p) in rest:
                self._step_one(group, name, p, ok, local, local_grad, consume)
        if bodies:
            self._run_shard_bodies(bodies)
        for kind, members in buckets:  # stacked one bucket at a time: a bounded workspace
            self._step_bucket(kind, members, torch.stack([p.grad for _, _, p in members]))

    def _buckets(
        self, named: list[tuple[dict[str, Any], str, Tensor]]
    ) -> tuple[list[tuple[tuple[Any, ...], list[tuple[dict[str, Any], str, Tensor]]]], set[int]]:
        """Buckets ``(kind, members)`` for the multi-tensor step, and the ids of the
        parameters left to the loop. Members share group, kind, shape, dtype, device and
        step count; a bucket holds at most ``max(1, BUCKET_NUMEL // numel)`` matrices, and a
        bucket of one is left to the loop."""
        by_key: dict[tuple[Any, ...], list[tuple[dict[str, Any], str, Tensor]]] = {}
        rest: set[int] = set()
        for entry in named:
            group, _, p = entry
            kind = self._engine_kind(group, p)
            if kind is None:
                rest.add(id(p))
                continue
            key = (id(group), kind, tuple(p.shape), p.dtype, p.device, self.state[p]["step"])
            by_key.setdefault(key, []).append(entry)
        buckets = []
        for key, members in by_key.items():
            size = max(1, BUCKET_NUMEL // members[0][2].numel())
            for i in range(0, len(members), size):
                chunk = members[i : i + size]
                if len(chunk) > 1:
                    buckets.append((key[1], chunk))
                else:  # a bucket of one gains nothing from stacking: the loop
                    rest.add(id(chunk[0][2]))
        return buckets, rest

    def _engine_kind(self, group: dict[str, Any], p: Tensor) -> tuple[Any, ...] | None:
        """The bucket kind of ``p`` this step, or None for the per-parameter loop: the
        engine takes initialised, unsharded, non-empty float32/float64 matrices whose
        moments are kept in their dtype, compressed, in a step that starts no window, and
        that the subclass's :meth:`_bucket_eligible` takes; ``foreach=False`` takes none."""
        foreach = group.get("foreach", False)
        if foreach is False or p.dim() != 2 or p.numel() == 0:
            return None
        if _is_sharded(p) or p.dtype != state_dtype(p) or p.grad.dtype != p.dtype:
            return None
        if group["moment_dtype"] not in (None, p.dtype) or p.grad.layout != torch.strided:
            return None
        state = self.state.get(p)
        if not state or "side" not in state or not self._bucket_eligible(group, state):
            return None
        basis = self._bucket_basis(group, state)
        if basis is None:
            return None
        large = p.device.type == "cpu" and p.numel() > CPU_STACK_NUMEL
        if foreach is None and large and basis != "seeded":
            return None  # memory-bound on the CPU: the stack's copy costs more than it saves
        return (_SIDE_NAMES[state["side"]], tuple(state["exp_avg"].shape), basis)

    #: the state keys (besides a stored basis) a bucket keeps stacked
    _bucket_moments: tuple[str, ...] = ()

    def _bucket_eligible(self, group: dict[str, Any], state: dict[str, Any]) -> bool:
        """Subclass hook: whether the multi-tensor step takes this compressed matrix's
        (initialised) state under ``group``'s options."""
        return False

    def _update_bucket(self, group: dict[str, Any], b: Bucket) -> None:
        """Subclass hook: one multi-tensor step of bucket ``b``; call the bucket function
        through :meth:`_bucket_function`."""
        raise NotImplementedError

    def _bucket_basis(self, group: dict[str, Any], state: dict[str, Any]) -> Any:
        """How the engine gets a compressed momentum's basis this step: its stored basis'
        dtype (``distribution="gradient"``), ``"seeded"`` (generated per bucket), or None
        when the loop must step it (a window starts: a new basis and the transfer; a cached
        or generator-v1 projection)."""
        if _window_starts(group, state, state["step"] + 1):
            return None
        if group["distribution"] == GRADIENT:
            return state["projection"].dtype if "projection" in state else None
        if group["cache_projection"] or state.get("generator", 1) != GENERATOR:
            return None
        return "seeded"

    def _bucket_projections(
        self,
        group: dict[str, Any],
        states: list[dict[str, Any]],
        stacks: dict[str, Tensor],
        like: Tensor,
    ) -> Tensor:
        """The bucket's projections ``(B, r, d)`` in ``like``'s dtype: the stored bases, or
        the seeded ones generated together (:func:`flora.projection.projection_matrices`)."""
        if "projection" in stacks:
            basis = stacks["projection"]
            return basis if basis.dtype == like.dtype else basis.to(like.dtype)
        rank, dim = _projection_shape(states[0], like.shape[-2], like.shape[-1])
        return projection_matrices(
            rank,
            dim,
            seed=group["seed"],
            keys=[st["key"] for st in states],
            windows=[st["window"] for st in states],
            stream=self.projection_stream,
            distribution=group["distribution"],
            device=like.device,
            dtype=like.dtype,
        )

    def _step_bucket(
        self,
        kind: tuple[Any, ...],
        members: list[tuple[dict[str, Any], str, Tensor]],
        grads: Tensor,
    ) -> None:
        group = members[0][0]
        if group["maximize"]:
            grads.neg_()
        params = [p for _, _, p in members]
        states = [self.state[p] for p in params]
        stored = ("projection",) if kind[2] != "seeded" else ()
        stacks = self._stacked.stacks(params, states, (*self._bucket_moments, *stored))
        for state in states:
            state["step"] += 1
        proj = self._bucket_projections(group, states, stacks, grads)
        step: int | Tensor = states[0]["step"]
        if self.compiled:  # the step as a tensor: one graph for every step
            step = torch.tensor(float(step), dtype=grads.dtype, device=grads.device)
        self._update_bucket(group, Bucket(params, grads, stacks, proj, kind[0], step))

    def _bucket_lr(self, group: dict[str, Any], b: Bucket) -> float | Tensor:
        """The group's ``lr`` for a bucket function: a 0-D tensor when compiled (so an LR
        change adds no graph), else a float."""
        lr = float(group["lr"])
        return torch.tensor(lr, device=b.grads.device) if self.compiled else lr

    def _bucket_function(self, fn: Callable[..., None]) -> Callable[..., None]:
        """``fn`` itself, or with ``compiled=True`` ``torch.compile(fn, fullgraph=True)``
        (made once per optimizer; dynamo then compiles one graph per bucket layout)."""
        if not self.compiled:
            return fn
        if fn not in self._compiled_fns:
            self._compiled_fns[fn] = torch.compile(fn, fullgraph=True)
        return self._compiled_fns[fn]

    def _step_one(
        self,
        group: dict[str, Any],
        name: str,
        p: Tensor,
        ok: bool,
        local: Tensor,
        local_grad: Tensor,
        consume: bool = False,
    ) -> None:
        """The per-parameter step of an unsharded parameter (``foreach=False``, and what the
        engine does not take): :meth:`_step_body` run to its end."""
        self._current_param, self._shards = p, None
        try:
            run_sums(self._step_body(group, name, p, ok, False, local, local_grad, consume), None)
        finally:
            self._current_param = None

    def _step_body(
        self,
        group: dict[str, Any],
        name: str,
        p: Tensor,
        ok: bool,
        is_sharded: bool,
        local: Tensor,
        local_grad: Tensor,
        consume: bool = False,
    ) -> ShardSums:
        """One parameter's step as a :data:`ShardSums` body (it yields only for an FSDP2
        shard, what ``_update`` needs summed over the shards). The update may overwrite its
        gradient when that is a copy made here (a sign or dtype change) or ``consume``
        hands it over. Whoever drives it sets ``_current_param`` and ``_shards`` first."""
        state = self.state[p]
        if not ok:  # nonfinite="skip_parameter"
            state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
            return
        grad = local_grad if not group["maximize"] else -local_grad
        dtype = state_dtype(p)  # fp32 math for fp16/bf16 parameters, rounded once
        work = local if local.dtype == dtype else local.to(dtype)
        # under FSDP2 the update sees the local shards of its DTensor state
        view = {k: _local(v) for k, v in state.items()} if is_sharded else state
        moments = group["moment_dtype"] not in (None, dtype)  # stored narrower
        math_view = _widened(view, dtype) if moments else view
        scratch = consume or grad is not local_grad or grad.dtype != dtype
        yield from self._update(
            work, grad if grad.dtype == dtype else grad.to(dtype), group, name, math_view,
            scratch=scratch,
        )  # fmt: skip
        if moments:
            self._store_moments(group, name, view, math_view, is_sharded)
        if work is not local:
            self._write_back(local, work, group, name, view)
        if is_sharded:
            self._store_sharded_state(p, state, view)

    def _run_shard_bodies(self, bodies: list[tuple[ShardSums, Tensor]]) -> None:
        """Run the step bodies of FSDP2-sharded parameters together, in rounds: every
        unfinished body runs to its next request, then the round's tensors are concatenated
        in parameter order and summed with one all-reduce per (process group, dtype, device)
        and the bodies resume. Every rank runs the same bodies in the same order, so all issue
        the same collectives; a step then needs as many all-reduces as its longest body has
        requests (Flora: 2, FloraAdamW: 1) whatever the number of parameters, instead of
        that many per parameter. ``_current_param`` and ``_shards`` are set around each run
        of a body (a blocking all-reduce inside one, the gradient basis's at a window start,
        stays in order too)."""

        def advance(body: ShardSums, p: Tensor, shards: ShardReduce) -> Tensor | None:
            self._current_param, self._shards = p, shards
            try:
                return body.send(None)  # the first send(None) starts the body
            except StopIteration:
                return None
            finally:
                self._current_param, self._shards = None, None

        started = [(b, p, self._shard_reduce(p)) for b, p in bodies]
        waiting = [(b, p, s, t) for b, p, s in started if (t := advance(b, p, s)) is not None]
        while waiting:
            rounds: dict[tuple[Any, torch.dtype, torch.device], list[Tensor]] = {}
            for _, p, _, wanted in waiting:
                key = (p.device_mesh.get_group(), wanted.dtype, wanted.device)
                rounds.setdefault(key, []).append(wanted)
            for (pg, _, _), tensors in rounds.items():
                flat = torch.cat([t.reshape(-1) for t in tensors])
                torch.distributed.all_reduce(flat, group=pg)
                for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                    t.copy_(part.view_as(t))
            waiting = [
                (b, p, s, t) for b, p, s, _ in waiting if (t := advance(b, p, s)) is not None
            ]

    def _store_moments(
        self,
        group: dict[str, Any],
        name: str,
        view: dict[str, Any],
        math_view: dict[str, Any],
        is_sharded: bool,
    ) -> None:
        """Round the float32 moments of ``math_view`` stochastically into ``view``'s
        ``moment_dtype`` tensors (created at the first step); copy everything else."""
        row_sharded = _row_sharded_keys(self._current_param) if is_sharded else None
        row = _global_row_offset(self._current_param) if is_sharded else 0
        key = self._key_of(group, name)
        for k, value in math_view.items():
            if not _is_moment(k, value):
                view[k] = value
                continue
            quantized = _quantized(group, k, math_view)
            target = torch.int8 if quantized else _moment_dtype(group, value.dtype)
            stored = view.get(k)
            if stored is None or stored.dtype != target:
                stored = view[k] = torch.empty_like(value, dtype=target)
            offset = row * math.prod(value.shape[1:]) if row_sharded and row_sharded(k) else 0
            if target not in (torch.bfloat16, torch.int8):  # float32 moments of float64 ones
                stored.copy_(value)
                continue
            words = stream_words("flora-state/v1", group["seed"], key, math_view["step"], k)
            if quantized:
                bits = random_words(value.numel(), words, offset=offset, device=value.device)
                if view.get(k + _ABSMAX) is None:
                    shape = absmax_shape(tuple(value.shape))
                    view[k + _ABSMAX] = torch.empty(shape, device=value.device)
                quantize_int8_(stored, view[k + _ABSMAX], value, bits)
            else:
                stochastic_round_stream_(stored, value.float(), words, offset=offset)

    def _write_back(
        self, local: Tensor, work: Tensor, group: dict[str, Any], name: str, view: dict[str, Any]
    ) -> None:
        """Round the float32 result ``work`` into the fp16/bf16 tensor ``local`` by the
        group's ``rounding`` (:mod:`flora.rounding`)."""
        rounding = group["rounding"]
        if rounding == "nearest" or local.dtype != torch.bfloat16:
            local.copy_(work)
        elif rounding == "compensated":
            if "compensation" not in view:
                view["compensation"] = torch.zeros_like(local)
            compensated_round_(local, work, view["compensation"])
        else:  # stochastic: keyed by (seed, parameter, step), indexed in the whole parameter
            offset = 0
            if self._shards is not None:
                offset = _global_row_offset(self._current_param) * math.prod(local.shape[1:])
            words = stream_words(
                "flora-rounding/v1", group["seed"], self._key_of(group, name), view["step"]
            )
            stochastic_round_stream_(local, work, words, offset=offset)

    def _skip_whole_step(
        self, named: list[tuple[dict[str, Any], str, Tensor]], finite: list[bool]
    ) -> bool:
        """Apply the ``nonfinite`` policies of the offending parameters before any update:
        raise if one says ``"raise"``, skip the step if one says ``"skip"`` (True), else warn
        that only those parameters are skipped (``"skip_parameter"``, False)."""
        cls = type(self).__name__
        bad = [
            (g["nonfinite"], name) for (g, name, _), ok in zip(named, finite, strict=True) if not ok
        ]
        shown = ", ".join(repr(n) for _, n in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if any(policy == "raise" for policy, _ in bad):
            raise FloatingPointError(
                f"{cls}: non-finite gradient for parameter(s) {shown}; no parameter was "
                "updated (nonfinite='raise')"
            )
        if any(policy == "skip" for policy, _ in bad):
            self.skipped_steps += 1
            warnings.warn(
                f"{cls}: non-finite gradient for parameter(s) {shown}; the whole step was "
                "skipped (nonfinite='skip')",
                RuntimeWarning,
                stacklevel=3,
            )
            return True
        warnings.warn(
            f"{cls}: non-finite gradient for parameter(s) {shown}; their updates were "
            "skipped (nonfinite='skip_parameter')",
            RuntimeWarning,
            stacklevel=3,
        )
        return False

    def _check_replicas(self) -> None:
        """First step under torch.distributed: every process must use the same settings
        (over an FSDP2 mesh's group if a parameter is sharded, else over the world; every
        parameter is looked at, with a gradient or not, so all processes pick the same)."""
        self._replicas_unchecked = False
        process_group = None
        for _, _, p in self._named_params():
            if _is_sharded(p):
                process_group = p.device_mesh.get_group()
                break
        settings: dict[str, Any] = {"optimizer": type(self).__name__}
        for i, group in enumerate(self.param_groups):
            for key in self._option_names:
                value = group[key]
                settings[f"param_groups[{i}].{key}"] = (
                    float(value) if isinstance(value, Tensor) else value
                )
            settings[f"param_groups[{i}].parameters"] = len(group["params"])
        check_same_settings(settings, what=type(self).__name__, group=process_group)

    @staticmethod
    def _shard_reduce(p: Tensor) -> ShardReduce:
        pg = p.device_mesh.get_group()
        return ShardReduce(p.shape, lambda t: torch.distributed.all_reduce(t, group=pg))

    @staticmethod
    def _store_sharded_state(p: Tensor, state: dict[str, Any], view: dict[str, Any]) -> None:
        """Write back the update's local view; new local tensors become DTensors."""
        row_sharded = _row_sharded_keys(p)
        for key, value in view.items():
            old = state.get(key)
            if isinstance(value, Tensor) and not isinstance(value, DTensor):
                if isinstance(old, DTensor) and old._local_tensor is value:
                    continue
                state[key] = _as_dtensor(value, p, row_sharded(key))
            else:
                state[key] = value

    @staticmethod
    def _agree(
        named: list[tuple[dict[str, Any], str, Tensor]], sharded: list[bool], finite: list[bool]
    ) -> list[bool]:
        """AND the finiteness verdicts of sharded parameters over their process groups."""
        out = list(finite)
        by_group: dict[Any, list[int]] = {}
        for i, ((_, _, p), is_sharded) in enumerate(zip(named, sharded, strict=True)):
            if is_sharded:
                by_group.setdefault(p.device_mesh.get_group(), []).append(i)
        for pg, indices in by_group.items():
            device = named[indices[0]][2]._local_tensor.device
            flags = torch.tensor([float(out[i]) for i in indices], device=device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN, group=pg)
            for i, flag in zip(indices, flags.tolist(), strict=True):
                out[i] = bool(flag)
        return out
