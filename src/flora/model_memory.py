"""``flora plan``: optimizer-state and accumulation memory for a model, without its weights.

The model is built on the ``meta`` device (shapes only, no memory): one of the project's GPT
sizes (:data:`flora.gpt.SIZES`), a named ``transformers`` architecture preset
(:data:`HF_PRESETS`, e.g. ``llama-7b``), or a ``config.json`` / model folder (read with
``transformers.AutoConfig``; no download, no weights).

How each number is obtained:

* **Flora, FloraAdamW**: the real optimizer is built on the meta parameters and its
  :meth:`~flora.optim.base.FloraOptimizerBase.plan` is read (tests check that it equals the
  bytes the optimizer holds after a step).
* **AdamW** (``torch.optim.AdamW``): ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype
  plus a float32 ``step`` tensor per parameter (the layout torch uses; tested).
* **Adafactor** (``torch.optim.Adafactor``, no momentum): row and column factors over the last
  two dims for tensors with >= 2 dims, a full variance otherwise, plus the ``step`` tensor
  (tested against the real optimizer).
* **8-bit AdamW** (bitsandbytes, formula): two uint8 states plus two float32 absmax per block
  of 256 for tensors of >= 4096 elements, two float32 states below that; the two shared
  256-entry quantization maps are not counted.
* **GaLore AdamW** (galore-torch, formula) at the same rank, on the matrices Flora compresses:
  Adam states of the projected gradient, ``2 r max(m, n)``, plus the stored projection
  ``r min(m, n)``; other parameters plain AdamW. (GaLore's scripts usually leave embeddings and
  heads uncompressed, which costs more.)
* **Accumulation**: plain accumulation keeps a full ``.grad``; Flora's
  :class:`~flora.GradientAccumulator` keeps its exact :meth:`~flora.GradientAccumulator.plan`.
* **The lean preset** (``lean=True``, ``flora plan --lean``; :func:`flora.lean_setup` on the
  bf16 meta model): bf16 parameters, the largest single gradient (step-in-backward frees
  each gradient once its parameter is stepped), the lean optimizer's exact ``plan()`` (bf16
  moments and basis) and the step-in-backward accumulator's exact ``plan()`` (none for
  ``accumulate=1``); against mixed-precision AdamW's 16 bytes per parameter (float32 master
  weights and moments, bf16 weights and gradients), and bf16 training with 8-bit AdamW or
  GaLore at the same rank (bf16 weights, a full bf16 ``.grad``, their state by the formulas
  above; no master weights). The optimizer's workspace for a step — float32 copies, the
  update, the rounding's random words — is *measured*: :func:`step_workspace_bytes` runs
  the preset's step-in-backward on one real CPU matrix of the model's largest matrix shape
  (two smaller matrices of its orientation, extrapolated linearly in the entries, when it
  has more than :data:`WORKSPACE_PROBE_NUMEL` entries)
  under the PyTorch profiler and counts what it allocates beyond the gradient. Activations
  are not counted. ``flora train --lean`` prints the same rows, but the workspace, for the
  model it trains (tested equal).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import flora
from flora.gpt import GPT, SIZES, lean_config
from flora.rounding import ROUNDING_CHUNK
from flora.state_plan import Plan, format_bytes

__all__ = [
    "HF_PRESETS",
    "MemoryPlan",
    "PlanError",
    "build_meta_model",
    "peak_gradient_bytes",
    "plan_memory",
]

#: transformers architectures by name (config fields as in their published config.json)
HF_PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "llama-13b": {
        "model_type": "llama",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "t5-3b": {
        "model_type": "t5",
        "d_model": 1024,
        "d_ff": 16384,
        "d_kv": 128,
        "num_heads": 32,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "vocab_size": 32128,
    },
}


class PlanError(ValueError):
    """The model cannot be planned (unknown name, unreadable config, missing transformers)."""


def _transformers_model(config_dict: dict[str, Any], source: str) -> nn.Module:
    try:
        import transformers
    except ImportError as err:
        raise PlanError(f"{source} needs transformers: pip install transformers") from err
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise PlanError(f"{source}: config has no model_type")
    _check_sizes(config_dict, source)
    # transformers raises many kinds of errors for a config that does not build a model
    # (TypeError for a string size, RuntimeError for a negative one, ZeroDivisionError, ...):
    # each is the user's config, reported as one line
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
        archs = getattr(config, "architectures", None) or []
        auto = transformers.AutoModelForCausalLM
        if config.is_encoder_decoder or any("ConditionalGeneration" in a for a in archs):
            auto = transformers.AutoModelForSeq2SeqLM
        with torch.device("meta"):
            try:
                return auto.from_config(config)
            except ValueError:
                return transformers.AutoModel.from_config(config)
    except Exception as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise PlanError(
            f"{source}: the config does not build a model ({type(err).__name__}: {first})"
        ) from err


#: config fields that are sizes or counts: positive integers when present
_SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers",
    "num_decoder_layers", "n_embd", "n_layer", "n_head", "n_positions", "n_inner",
    "max_position_embeddings", "head_dim",
)  # fmt: skip


def _check_sizes(config: dict[str, Any], source: str) -> None:
    for key in _SIZE_FIELDS:
        if key not in config or config[key] is None:
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PlanError(f"{source}: {key} must be a positive integer, got {value!r}")
    for width, heads in (("hidden_size", "num_attention_heads"), ("n_embd", "n_head")):
        if width in config and heads in config and config[width] % config[heads]:
            raise PlanError(
                f"{source}: {width} ({config[width]}) must be divisible by {heads} "
                f"({config[heads]})"
            )


def build_meta_model(spec: str, *, lean: bool = False) -> tuple[nn.Module, str]:
    """The model named by ``spec`` on the meta device, and a description of it; with
    ``lean``, a flora GPT size has the lean preset's vocabulary blocks
    (:func:`flora.gpt.lean_config`), as ``flora train --lean`` builds it."""
    if spec in SIZES:
        config = lean_config(SIZES[spec]) if lean else SIZES[spec]
        with torch.device("meta"):
            return GPT(config), f"flora GPT {spec!r} {config}"
    if spec in HF_PRESETS:
        model = _transformers_model(HF_PRESETS[spec], spec)
        return model, f"{spec} ({type(model).__name__} from transformers)"
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config_dict = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PlanError(f"cannot read {path}: {err}") from err
        if not isinstance(config_dict, dict):
            raise PlanError(f"{path} is not a JSON object")
        model = _transformers_model(config_dict, str(path))
        return model, f"{path} ({type(model).__name__} from transformers)"
    choices = ", ".join([*SIZES, *HF_PRESETS])
    raise PlanError(
        f"unknown model {spec!r}: give one of {choices}, a config.json or a model folder "
        "(hub names need a download; save the config locally first)"
    )


def _unique_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _shared(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters reachable under more than one name (a head tied to the token
    embedding, each of its vocabulary blocks)."""
    uses: dict[int, list[Any]] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses.setdefault(id(p), [p, 0])[1] += 1
    return [p for p, count in uses.values() if count > 1 and p.requires_grad]


def peak_gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients alive at once under step-in-backward: the largest one, except
    where a weight is used twice (a head tied to the token embedding) and the model does not
    route its uses apart (``routes_shared_gradients``, :func:`flora.accumulation.tied_use`):
    autograd then holds the first use's gradient until the last use's backward, so every
    tied weight's gradient is alive at once, plus the one being formed (measured on
    GPT-2-small: ``benchmarks/results/lean_memory_tied_cpu.md``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    largest = max((p.numel() * p.element_size() for p in params), default=0)
    if getattr(model, "routes_shared_gradients", False):
        return largest
    tied = [p.numel() * p.element_size() for p in _shared(model)]
    return max(largest, sum(tied) + max(tied)) if tied else largest


def adamw_bytes(params: list[nn.Parameter]) -> int:
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)


def adafactor_bytes(params: list[nn.Parameter]) -> int:
    total = 0
    for p in params:
        if p.dim() >= 2:
            numel = math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]
        else:
            numel = p.numel()
        total += numel * p.element_size() + 4
    return total


def adamw_8bit_bytes(params: list[nn.Parameter]) -> int:
    total = 0
    for p in params:
        n = p.numel()
        if n < 4096:
            total += 2 * n * 4
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / 256)
    return total


def galore_bytes(named: list[tuple[str, nn.Parameter]], flora_plan: Plan, rank: int) -> int:
    compressed = {r.name for r in flora_plan.rows if r.compressed}
    total = 0
    for name, p in named:
        if name in compressed:
            m, n = p.shape[0], math.prod(p.shape[1:])
            total += (2 * rank * max(m, n) + rank * min(m, n)) * p.element_size()
        else:
            total += 2 * p.numel() * p.element_size()
    return total


@dataclass
class MemoryPlan:
    description: str
    parameters: int
    parameter_bytes: int
    rank: int
    accumulate: int
    optimizers: list[tuple[str, int, str]] = field(default_factory=list)  # name, bytes, how
    accumulation: list[tuple[str, int]] = field(default_factory=list)
    flora_plan: Plan | None = None
    lean: list[tuple[str, int]] = field(default_factory=list)  # whole training, lean preset

    def __str__(self) -> str:
        adamw = next(b for name, b, _ in self.optimizers if name.startswith("AdamW"))
        out = [
            f"model: {self.description}",
            f"parameters: {self.parameters:,} ({format_bytes(self.parameter_bytes)}); "
            f"gradients {format_bytes(self.parameter_bytes)}",
            "",
            f"{'optimizer state':34s} {'bytes':>12s}  {'vs AdamW':>8s}  how",
        ]
        for name, size, how in self.optimizers:
            out.append(f"{name:34s} {format_bytes(size):>12s}  {size / adamw:8.3f}  {how}")
        if self.accumulation:
            out += ["", f"{f'accumulation ({self.accumulate} micro-batches)':34s} {'bytes':>12s}"]
            for name, size in self.accumulation:
                out.append(f"{name:34s} {format_bytes(size):>12s}")
        if self.lean:
            out += ["", f"{'lean preset, whole training':34s} {'bytes':>12s}  {'B/param':>8s}"]
            for name, size in self.lean:
                out.append(f"{name:34s} {format_bytes(size):>12s}  {size / self.parameters:8.3f}")
        return "\n".join(out)


def plan_memory(
    model: nn.Module,
    *,
    rank: int,
    kappa: int = 1000,
    accumulate: int = 1,
    description: str = "",
    exclude: list[str] | None = None,
    lean: bool = False,
) -> MemoryPlan:
    """Optimizer-state bytes (and accumulation bytes when ``accumulate > 1``) for ``model``;
    with ``lean`` (``model`` in bf16) also the lean preset's whole-training rows."""
    named = _unique_named(model)
    params = [p for _, p in named]
    with_names = {"rank": rank, "kappa": kappa, "exclude": exclude}
    fl = flora.Flora(named, **with_names)
    fa = flora.FloraAdamW(named, **with_names)
    flora_plan, adamw_flora_plan = fl.plan(), fa.plan()
    result = MemoryPlan(
        description=description or type(model).__name__,
        parameters=sum(p.numel() for p in params),
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        rank=rank,
        accumulate=accumulate,
        flora_plan=flora_plan,
    )
    result.optimizers = [
        ("AdamW (torch)", adamw_bytes(params), "exact layout"),
        ("Adafactor (torch, no momentum)", adafactor_bytes(params), "exact layout"),
        ("8-bit AdamW (bitsandbytes)", adamw_8bit_bytes(params), "formula"),
        (f"GaLore AdamW r{rank}", galore_bytes(named, flora_plan, rank), "formula"),
        (f"Flora r{rank} (Adafactor + momentum)", flora_plan.state_bytes, "flora plan()"),
        (f"FloraAdamW r{rank}", adamw_flora_plan.state_bytes, "flora plan()"),
    ]
    if lean:
        result.lean = lean_rows(model, rank=rank, kappa=kappa, accumulate=accumulate)
    if accumulate > 1:
        acc = flora.GradientAccumulator(named, accumulate, rank=rank, exclude=exclude)
        acc_plan = acc.plan()
        acc.remove()
        result.accumulation = [
            ("naive (full .grad)", acc_plan.uncompressed_bytes),
            (f"Flora GradientAccumulator r{rank}", acc_plan.state_bytes),
        ]
    return result


#: the largest matrix :func:`step_workspace_bytes` steps whole; a larger one is extrapolated
#: from two smaller ones of its orientation
WORKSPACE_PROBE_NUMEL = 2**22
#: the short side of the smaller matrices a larger one's workspace is extrapolated from
WORKSPACE_PROBE_SIDE = 1024


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send the process's file descriptor 2 to /dev/null: the profiler's C++ side logs its
    start and stop there (Python exceptions still propagate and print afterwards)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_workspace_bytes(
    shape: tuple[int, ...], *, rank: int, kappa: int = 1000, accumulate: int = 1
) -> int:
    """Bytes the lean preset's step of one bf16 matrix of ``shape`` allocates beyond its
    gradient, measured on the CPU (:func:`_measured_workspace`). A matrix of more than
    :data:`WORKSPACE_PROBE_NUMEL` entries is measured on two smaller ones of its orientation
    (the short side cut to ``j = min(short side,`` :data:`WORKSPACE_PROBE_SIDE` ``)``;
    ``k`` and ``2k`` along the long side, ``k >= j`` so that they are compressed on its side,
    ``k j >= 32`` :data:`flora.rounding.ROUNDING_CHUNK`) and extrapolated linearly in
    the entries: the workspace is a per-entry part (float32 copies, the update) plus a
    nearly constant one (the rounding's pass of random words, the projections)."""
    m, n = shape[0], math.prod(shape[1:])
    kw = {"rank": rank, "kappa": kappa, "accumulate": accumulate}
    if m * n <= WORKSPACE_PROBE_NUMEL:
        return _measured_workspace(m, n, **kw)
    j = min(m, n, WORKSPACE_PROBE_SIDE)
    # at least 32 ROUNDING_CHUNK entries: the rounding's pass of words (a constant) then no
    # longer sets the peak, the update's float32 temporaries do, which grow with the entries
    k = max(j, 2 * rank, WORKSPACE_PROBE_NUMEL // (4 * j), -(-32 * ROUNDING_CHUNK // j))
    probe = (lambda rows: (rows, j)) if m >= n else (lambda cols: (j, cols))
    one, two = _measured_workspace(*probe(k), **kw), _measured_workspace(*probe(2 * k), **kw)
    per_entry = (two - one) / (k * j)
    return max(0, round(one + per_entry * (m * n - k * j)))


def _measured_workspace(m: int, n: int, *, rank: int, kappa: int, accumulate: int) -> int:
    """A bias-free ``nn.Linear`` with an (m, n) weight goes through :func:`flora.lean_setup`
    for one cycle of ``min(accumulate, 2)`` micro-batches (its state is created; more
    micro-batches change nothing in the step), then the last micro-batch of a second cycle —
    whose backward steps it — runs under the PyTorch profiler: the peak of its allocations
    less the bf16 gradient. (Frees of blocks allocated before the profiler started are not
    seen, so this errs high, never low.)"""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator().manual_seed(0)
    with torch.device("cpu"):
        layer = nn.Linear(n, m, bias=False)
    accumulate = min(accumulate, 2)
    setup = flora.lean_setup(layer, accumulate=accumulate, rank=rank, kappa=kappa)
    x = torch.randn(1, n, generator=generator).bfloat16()
    acc = setup.accumulator

    def micro_batch() -> None:
        with acc.micro_batch():
            layer(x).float().square().sum().backward()

    try:
        for _ in range(2 * accumulate - 1):
            micro_batch()
        with (
            _quiet_stderr(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            micro_batch()
    finally:
        acc.remove()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return max(0, peak - m * n * 2)


def lean_rows(
    model: nn.Module, *, rank: int, kappa: int = 1000, accumulate: int = 1
) -> list[tuple[str, int]]:
    """The lean preset's memory for a bf16 ``model`` (meta or real; its values are not
    changed, its tied weights' later uses are routed as the preset routes them):
    parameters, the gradients at their peak, optimizer state, accumulation buffers, their
    total, and mixed-precision AdamW's 16 bytes per parameter for comparison. The gradients
    are :func:`peak_gradient_bytes` (step-in-backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if any(p.dtype != torch.bfloat16 for p in params):
        raise PlanError("the lean preset trains in bfloat16: plan a bf16 model")
    setup = flora.lean_setup(model, accumulate=accumulate, rank=rank, kappa=kappa)
    try:
        parameters = sum(p.numel() * p.element_size() for p in params)
        gradient = peak_gradient_bytes(model)
        state = setup.optimizer.plan().state_bytes
        buffers = setup.accumulator.plan().state_bytes if accumulate > 1 else 0
    finally:
        setup.accumulator.remove()
    matrices = [tuple(p.shape) for p in params if p.dim() >= 2]
    largest = max(matrices, key=math.prod, default=None)
    workspace = (
        step_workspace_bytes(largest, rank=rank, kappa=kappa, accumulate=accumulate)
        if largest is not None
        else 0
    )
    total = parameters + gradient + state + buffers + workspace
    numel = sum(p.numel() for p in params)
    named = _unique_named(model)
    flora_plan = flora.Flora(named, rank=rank, kappa=kappa).plan()
    full_grads = 2 * numel  # bf16 weights and a full bf16 .grad, accumulated in place
    return [
        ("parameters (bf16)", parameters),
        ("gradients at their peak", gradient),
        (f"optimizer state (Flora r{rank})", state),
        ("accumulation buffers" + (f" ({accumulate})" if accumulate > 1 else ""), buffers),
        ("step workspace (measured)", workspace),
        ("total (without activations)", total),
        ("mixed-precision AdamW, same rows", 16 * numel),
        ("8-bit AdamW, bf16 weights + .grad", parameters + full_grads + adamw_8bit_bytes(params)),
        (
            f"GaLore r{rank}, bf16 weights + .grad",
            parameters + full_grads + galore_bytes(named, flora_plan, rank),
        ),
    ]
