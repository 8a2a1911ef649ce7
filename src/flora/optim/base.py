"""The thin ``torch.optim.Optimizer`` shell shared by :class:`~flora.Flora` and
:class:`~flora.FloraAdamW`.

It validates hyperparameters, names parameters, applies the compress-or-not policy
(:mod:`flora.policy`), fetches projections (:mod:`flora.projection`), keeps non-finite
gradients out of the state, keeps state in float32 for low-precision parameters across
``load_state_dict`` and builds the memory plan. Subclasses provide the per-parameter math.

Per-parameter state holds only tensors and Python ints:

* ``step`` — number of updates applied to this parameter;
* for a compressed momentum: ``key`` (stable parameter key), ``side`` (0 = left, 1 = right),
  ``window`` (index of the current projection) and ``window_start`` (step at which it began);
* ``nonfinite_skips`` — only once a non-finite gradient was skipped;
* the subclass's tensors.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

try:  # DTensor parameters (FSDP2); absent on torch builds without torch.distributed
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

from flora.plan import Plan, PlanRow
from flora.policy import Decision, compile_patterns, decide
from flora.projection import DISTRIBUTIONS, parameter_key, projection_matrix

__all__ = ["FloraOptimizerBase", "ShardReduce"]

_SIDE_CODES = {"left": 0, "right": 1}
_SIDE_NAMES = ("left", "right")
NONFINITE_POLICIES = ("skip", "raise")
MOMENTUM_VARIANTS = ("history", "paper")
SIDE_OPTIONS = ("auto", "left", "right")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
        isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex()
    )


def check_real(name: str, value: object, low: float, high: float, *, high_open: bool) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``low <= value <= high`` (or ``<``)."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)  # type: ignore[arg-type]
    if math.isnan(v) or v < low or (v >= high if high_open else v > high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {v}")


def check_bool(name: str, value: object) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def factored_numel(shape: tuple[int, ...]) -> int:
    """Elements of Adafactor's row and column factors for a tensor with >= 2 dims."""
    numel = math.prod(shape)
    return numel // shape[-1] + numel // shape[-2]


def factored_zeros(grad: Tensor) -> tuple[Tensor, Tensor]:
    """Zero row factor ``(..., m, 1)`` and column factor ``(..., 1, n)`` for ``grad``."""
    row_shape, col_shape = list(grad.shape), list(grad.shape)
    row_shape[-1], col_shape[-2] = 1, 1
    return grad.new_zeros(row_shape), grad.new_zeros(col_shape)


def state_dtype(param: Tensor) -> torch.dtype:
    """State and update math run in float32 for fp16/bf16 parameters, else in their dtype."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


def _all_finite(grads: list[Tensor]) -> list[bool]:
    """Per tensor: are all entries finite? One reduction pass each and one host sync.

    A NaN or Inf entry makes the sum non-finite; a finite tensor whose sum overflows is
    confirmed by the exact (four-pass) ``isfinite`` check, so there are no false verdicts.
    """
    device = grads[0].device
    sums = torch.stack([g.sum().to(device=device, dtype=torch.float32) for g in grads])
    verdict = torch.isfinite(sums).tolist()
    for i, ok in enumerate(verdict):
        if not ok:
            verdict[i] = bool(torch.isfinite(grads[i]).all())
    return verdict


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
    column factor of a matrix, whose rows are the reduced dimension."""
    return lambda key: not (key == "col_var" and p.dim() == 2)


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


def _local(t: Any) -> Any:
    return t._local_tensor if DTensor is not None and isinstance(t, DTensor) else t


class FloraOptimizerBase(Optimizer):
    """Shared machinery; see the module docstring. Not meant to be instantiated directly."""

    #: which projection stream the momentum uses (accumulation uses another)
    projection_stream = "momentum"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._validate_group(defaults, "")
        # stable parameter key -> ((seed, key, window, rank, dim), projection)
        self._projection_cache: dict[int, tuple[tuple[int, ...], Tensor]] = {}
        self._option_names = tuple(defaults)
        self._shards: ShardReduce | None = None  # set while _update runs on an FSDP2 shard
        self._current_param: Tensor | None = None  # the parameter _update is working on
        super().__init__(params, defaults)
        self._report_policy()

    # ------------------------------------------------------------------ validation
    def _validate_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        """Subclass hook: validate the base optimizer's own hyperparameters."""
        raise NotImplementedError

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        check_real(f"{where}lr", group["lr"], 0.0, math.inf, high_open=False)
        check_real(f"{where}weight_decay", group["weight_decay"], 0.0, math.inf, high_open=False)
        rank = group["rank"]
        if not _is_int(rank):
            raise TypeError(f"{where}rank must be an int, got {type(rank).__name__}")
        if rank <= 0:
            raise ValueError(f"{where}rank must be positive, got {rank}")
        kappa = group["kappa"]
        if not _is_int(kappa):
            raise TypeError(f"{where}kappa must be an int, got {type(kappa).__name__}")
        if kappa <= 0:
            raise ValueError(f"{where}kappa must be positive, got {kappa}")
        seed = group["seed"]
        if not _is_int(seed):
            raise TypeError(f"{where}seed must be an int, got {type(seed).__name__}")
        if seed < 0:
            raise ValueError(f"{where}seed must be >= 0, got {seed}")
        for flag in ("compress", "maximize", "cache_projection"):
            check_bool(f"{where}{flag}", group[flag])
        choices = (
            ("side", SIDE_OPTIONS),
            ("momentum_variant", MOMENTUM_VARIANTS),
            ("nonfinite", NONFINITE_POLICIES),
            ("distribution", DISTRIBUTIONS),
        )
        for key, options in choices:
            if group[key] not in options:
                raise ValueError(f"{where}{key} must be one of {options}, got {group[key]!r}")
        group["exclude"] = compile_patterns(group["exclude"])
        self._validate_hyperparameters(group, where)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        self._validate_group(group, f"param_groups[{index}].")
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(
                    f"{type(self).__name__} does not support complex parameters "
                    f"(param_groups[{index}] holds one of shape {tuple(p.shape)})"
                )
        if group["exclude"] and "param_names" not in group:
            raise ValueError("exclude patterns need parameter names: pass model.named_parameters()")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_projection_cache", {})
        self.__dict__.setdefault("_shards", None)
        self.__dict__.setdefault("_current_param", None)
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
        """The policy on the *global* shape. A row-sharded (FSDP2) matrix is compressed on
        the right, along its unsharded columns, so that every rank works on its own rows
        without communication; ``side="left"`` is refused for it."""
        side = group["side"]
        if p.dim() >= 2 and _is_sharded(p):
            if side == "left":
                raise NotImplementedError(
                    f"side='left' on the row-sharded parameter {name} needs an all-reduce per "
                    "step; use side='auto' or 'right'"
                )
            side = "right"
        return decide(
            name,
            p.shape,
            rank=group["rank"],
            compress=group["compress"],
            exclude=group["exclude"],
            side=side,
        )

    def decision(self, param: Tensor) -> Decision:
        """The policy's decision for ``param`` under its group's current settings."""
        for group, name, p in self._named_params():
            if p is param:
                return self._decide(group, name, p)
        raise ValueError("param is not optimized by this optimizer")

    def _uses_momentum(self, group: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _report_policy(self) -> None:
        too_small, matrices, compressed = [], 0, 0
        for group, name, p in self._named_params():
            d = self._decide(group, name, p)
            if p.dim() >= 2 and group["compress"] and self._uses_momentum(group):
                matrices += 1
                compressed += d.compressed
                if not d.compressed and d.rank is not None:
                    too_small.append(f"{name} {tuple(p.shape)}")
        cls = type(self).__name__
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
        momentum = state["exp_avg"]
        side = _SIDE_NAMES[state["side"]]
        m, n = p.shape[0], math.prod(p.shape[1:])  # p may be a (possibly empty) row shard
        rank, dim = (momentum.shape[0], m) if side == "left" else (momentum.shape[1], n)
        cache_key = (group["seed"], state["key"], window, rank, dim)
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
            dtype=momentum.dtype,
        )
        if group["cache_projection"]:
            self._projection_cache[state["key"]] = (cache_key, proj)
        return proj

    def projection(self, param: Tensor, window: int | None = None) -> Tensor | None:
        """The projection ``param``'s momentum uses now (or in ``window``), or None.

        Returns the ``(rank, dim)`` matrix of :func:`flora.projection.projection_matrix`;
        the side is ``self.decision(param).side``. Before the first step the state does not
        exist yet and window 0 is used.
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
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], step: int
    ) -> tuple[Tensor, Tensor, str]:
        """(P of the stored momentum, P for step ``step``, side); advances the window.

        A new window starts when ``step - window_start >= kappa``: with a constant kappa at
        steps ``kappa, 2 kappa, ...`` (Algorithm 2: "if t is a multiple of kappa").
        """
        side = _SIDE_NAMES[state["side"]]
        proj_old = self._projection(p, group, state, state["window"])
        if step - state["window_start"] < group["kappa"]:
            return proj_old, proj_old, side
        state["window"] += 1
        state["window_start"] = step
        return proj_old, self._projection(p, group, state, state["window"]), side

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
            # p is the local tensor: under FSDP2 a row shard, so a right-side state is (m_local, r)
            n = math.prod(p.shape[1:])
            shape = (d.rank, n) if d.side == "left" else (p.shape[0], d.rank)
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)  # type: ignore[arg-type]
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ plan
    def _second_moment_numel(self, group: dict[str, Any], shape: tuple[int, ...]) -> int:
        """Subclass hook: elements of the second-moment state of a parameter of ``shape``."""
        raise NotImplementedError

    def _state_numel(self, group: dict[str, Any], d: Decision) -> tuple[int, int]:
        """(elements of state, elements with compression off) for one parameter."""
        numel = math.prod(d.shape)
        second = self._second_moment_numel(group, d.shape)
        if not self._uses_momentum(group):
            return second, second
        momentum = math.prod(d.state_shape) if d.compressed else numel  # type: ignore[arg-type]
        return second + momentum, second + numel

    def plan(self) -> Plan:
        """Per-parameter decisions and exact state bytes (see :class:`flora.plan.Plan`)."""
        plan = Plan(type(self).__name__)
        for group, name, p in self._named_params():
            d = self._decide(group, name, p)
            itemsize = torch.empty((), dtype=state_dtype(p)).element_size()
            numel, full = self._state_numel(group, d)
            compressed = d.compressed and self._uses_momentum(group)
            plan.rows.append(
                PlanRow(
                    name=name,
                    shape=tuple(p.shape),
                    compressed=compressed,
                    reason=d.reason if self._uses_momentum(group) else "no momentum (beta1=0)",
                    side=d.side if compressed else None,
                    rank=d.rank if compressed else None,
                    state_bytes=numel * itemsize,
                    uncompressed_bytes=full * itemsize,
                    adamw_bytes=2 * p.numel() * p.element_size(),
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
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer`` but keep each state tensor's saved dtype.

        ``torch.optim.Optimizer`` casts floating state to the parameter's dtype; Flora keeps
        float32 state for fp16/bf16 parameters, so tensors are re-copied from ``state_dict``
        with their own dtype onto the parameter's device.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=value.dtype, copy=True)
        self._projection_cache.clear()

    # ------------------------------------------------------------------ step
    def _update(
        self, p: Tensor, grad: Tensor, group: dict[str, Any], name: str, state: dict[str, Any]
    ) -> None:
        """Subclass hook: one update of ``p`` (already in the state dtype, as is ``grad``)."""
        raise NotImplementedError

    def _momentum_inputs(
        self, p: Tensor, group: dict[str, Any], name: str, state: dict[str, Any], beta1: float
    ) -> tuple[Tensor, Tensor, str] | None:
        """Create the momentum lazily; return this step's projections if it is compressed."""
        if beta1 > 0 and "exp_avg" not in state:
            self._init_momentum(p, group, name, state)
        if beta1 > 0 and "side" in state:
            return self._momentum_projections(p, group, state, state["step"] + 1)
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model, returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        named = [(g, name, p) for g, name, p in self._named_params() if p.grad is not None]
        for _, name, p in named:
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients ({name})"
                )
            if p.grad.is_complex():
                raise RuntimeError(
                    f"{type(self).__name__} does not support complex gradients ({name})"
                )
        if not named:
            return loss
        # FSDP2: work on each rank's shard; decisions use the global shape (see _decide)
        sharded = [_is_sharded(p) for _, _, p in named]
        locals_ = [
            (p._local_tensor, p.grad._local_tensor) if is_sharded else (p, p.grad)
            for (_, _, p), is_sharded in zip(named, sharded, strict=True)
        ]
        finite = _all_finite([g for _, g in locals_])
        if any(sharded):  # every rank must take the same skip decision
            finite = self._agree(named, sharded, finite)
        for (group, name, p), ok, is_sharded, (local, local_grad) in zip(
            named, finite, sharded, locals_, strict=True
        ):
            state = self.state[p]
            if not ok:
                if group["nonfinite"] == "raise":
                    raise FloatingPointError(
                        f"{type(self).__name__}: non-finite gradient for parameter {name!r} "
                        "(nonfinite='raise')"
                    )
                state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
                warnings.warn(
                    f"{type(self).__name__}: non-finite gradient for parameter {name!r}; "
                    "its update was skipped (nonfinite='skip')",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            grad = local_grad if not group["maximize"] else -local_grad
            dtype = state_dtype(p)  # fp32 math for fp16/bf16 parameters, rounded once
            work = local if local.dtype == dtype else local.to(dtype)
            # under FSDP2 the update sees the local shards of its DTensor state
            view = {k: _local(v) for k, v in state.items()} if is_sharded else state
            self._current_param = p
            self._shards = self._shard_reduce(p) if is_sharded else None
            try:
                self._update(
                    work, grad if grad.dtype == dtype else grad.to(dtype), group, name, view
                )
            finally:
                self._current_param, self._shards = None, None
            if is_sharded:
                self._store_sharded_state(p, state, view)
            if work is not local:
                local.copy_(work)
        return loss

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
