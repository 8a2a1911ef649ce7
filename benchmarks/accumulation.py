"""Accumulation memory and time per cycle: naive vs flora.GradientAccumulator vs flora-opt.

A GPT-2-small-like ``transformers.GPT2LMHeadModel`` (built from a config, no download) is
trained for whole accumulation cycles of ``--tau`` micro-batches on byte tokens of the Python
standard library's source (real text; ids 0-255 of GPT-2's 50257-entry embedding). Rows:

* naive: plain accumulation (``(loss / tau).backward()``), then ``torch.optim.AdamW``;
* flora rR: ``GradientAccumulator(rank=R)``, then the same AdamW step (also with
  ``cache_projection=True`` and ``step_in_backward=True`` at rank 32);
* flora_opt: ``flora_opt.FloraAccelerator(accumulation_compression_rank=R)`` with its own
  ``flora_opt.Flora`` (it always steps inside backward and only works with that optimizer),
  and, as its baseline, naive accumulation followed by ``flora_opt.Flora``.

Accumulation bytes are measured in the middle of a cycle from the tensors really held
(``p.grad`` for naive, the accumulator's buffers, flora-opt's ``packs``) and checked against
``GradientAccumulator.plan()``. Times are per cycle (tau forward/backward passes, the
decompression and the optimizer step), medians over rounds in which every row runs once, and
reported as ratios to naive accumulation in the same run.

    python benchmarks/accumulation.py                       # GPT-2 small, CPU (~15 min)
    python benchmarks/accumulation.py --layers 2 --tau 4    # quick look
    python benchmarks/accumulation.py --device cuda         # on a GPU machine (adds peak)

Writes benchmarks/results/accumulation_<device>.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import flora
from flora.state_plan import format_bytes

parser = argparse.ArgumentParser()
parser.add_argument("--layers", type=int, default=12)
parser.add_argument("--embd", type=int, default=768)
parser.add_argument("--seq", type=int, default=128)
parser.add_argument("--micro-batch", type=int, default=1)
parser.add_argument("--tau", type=int, default=16)
parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128, 256])
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--device", default="cpu")
parser.add_argument("--out", default=None)
args = parser.parse_args()
device = torch.device(args.device)

try:
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:  # pragma: no cover - the benchmark environment has it
    sys.exit("needs transformers: make bench-setup")

CONFIG = GPT2Config(
    n_layer=args.layers,
    n_embd=args.embd,
    n_head=max(1, args.embd // 64),
    n_positions=args.seq,
    vocab_size=50257,
)


def corpus_tokens(limit: int = 4_000_000) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


TOKENS = corpus_tokens()
gen = torch.Generator().manual_seed(0)
STARTS = torch.randint(0, len(TOKENS) - args.seq - 1, (4096,), generator=gen)


def batch(i: int) -> torch.Tensor:
    rows = [TOKENS[s : s + args.seq] for s in STARTS[i * args.micro_batch :][: args.micro_batch]]
    return torch.stack(rows).to(device)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(CONFIG).to(device).train()


def loss_of(model: torch.nn.Module, i: int) -> torch.Tensor:
    x = batch(i)
    return model(input_ids=x, labels=x).loss


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- rows
class Row:
    """Builds a model and its accumulation; ``cycle(first)`` runs one whole cycle and returns
    the accumulation bytes measured after micro-batch tau/2."""

    name: str

    def cycle(self, first: int) -> int:
        raise NotImplementedError


class Naive(Row):
    def __init__(self) -> None:
        self.name = "naive accumulation + AdamW"
        self.model = make_model()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def cycle(self, first: int) -> int:
        held = 0
        for i in range(args.tau):
            (loss_of(self.model, first + i) / args.tau).backward()
            if i == args.tau // 2 - 1:
                held = tensor_bytes(p.grad for p in self.model.parameters())
        self.opt.step()
        self.opt.zero_grad()
        return held


class Flora(Row):
    def __init__(self, rank: int, **kwargs) -> None:
        extra = ", cached projection" if kwargs.get("cache_projection") else ""
        extra += ", step in backward" if kwargs.get("step_in_backward") else ""
        self.name = f"flora r{rank}{extra} + AdamW"
        self.model = make_model()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        if kwargs.get("step_in_backward"):
            kwargs["optimizer"] = self.opt
        self.acc = flora.GradientAccumulator(self.model, args.tau, rank=rank, **kwargs)

    def cycle(self, first: int) -> int:
        held = 0
        for i in range(args.tau):
            with self.acc.micro_batch():
                (loss_of(self.model, first + i) / args.tau).backward()
            if i == args.tau // 2 - 1:
                held = self.acc.buffer_bytes()
                plan = self.acc.plan()
                assert held == plan.state_bytes, (held, plan.state_bytes)
        if not self.acc.step_in_backward:
            self.opt.step()
            self.opt.zero_grad()
        return held


def _flora_opt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import flora_opt.optimizers.torch.flora as fo
    return fo


class FloraOptNaive(Row):
    def __init__(self) -> None:
        fo = _flora_opt()
        self.name = "naive accumulation + flora_opt.Flora (r32)"
        self.model = make_model()
        self.opt = fo.Flora(self.model.parameters(), lr=1e-4, rank=32)

    cycle = Naive.cycle


class FloraOptAccelerator(Row):
    def __init__(self, rank: int) -> None:
        fo = _flora_opt()
        self.name = f"flora_opt.FloraAccelerator r{rank} + flora_opt.Flora (r32)"
        self.accelerator = fo.FloraAccelerator(
            accumulation_compression_rank=rank, gradient_accumulation_steps=args.tau, cpu=True
        )
        model = make_model()
        opt = fo.Flora(model.parameters(), lr=1e-4, rank=32)
        self.model, self.opt = self.accelerator.prepare(model, opt)

    def cycle(self, first: int) -> int:
        held = 0
        for i in range(args.tau):
            with self.accelerator.accumulate(self.model):
                self.accelerator.backward(loss_of(self.model, first + i))
            if i == args.tau // 2 - 1:
                held = tensor_bytes(self.accelerator.packs.values())
        return held


def flora_opt_available() -> bool:
    try:
        _flora_opt()
    except Exception:
        return False
    return device.type in ("cpu", "cuda")


# ---------------------------------------------------------------- run
FACTORIES: list[tuple[str, Callable[[], Row]]] = [("naive", Naive)]
FACTORIES += [(f"r{r}", lambda r=r: Flora(r)) for r in args.ranks]
FACTORIES += [
    ("r32 cached", lambda: Flora(32, cache_projection=True)),
    ("r32 sib", lambda: Flora(32, step_in_backward=True)),
]
if flora_opt_available():
    FACTORIES += [("fo naive", FloraOptNaive), ("fo acc", lambda: FloraOptAccelerator(32))]

times: dict[str, list[float]] = {k: [] for k, _ in FACTORIES}
ratios: dict[str, list[float]] = {k: [] for k, _ in FACTORIES}
held: dict[str, int] = {}
names: dict[str, str] = {}
peaks: dict[str, int] = {}
plan_info: dict[str, tuple[int, int, int]] = {}
start = time.time()
Naive().cycle(0)  # process warm-up: the first model built pays one-off costs
for rnd in range(args.rounds):
    this_round: dict[str, float] = {}
    order = FACTORIES if rnd % 2 == 0 else FACTORIES[::-1]  # alternate to spread drift
    for key, factory in order:
        row = factory()
        names[key] = row.name
        row.cycle(0)  # warm-up cycle (allocator, first-call costs)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        held[key] = row.cycle(args.tau * (rnd + 1))
        sync()
        this_round[key] = time.perf_counter() - t0
        if device.type == "cuda":
            peaks[key] = torch.cuda.max_memory_allocated(device)
        if isinstance(row, Flora):
            plan = row.acc.plan()
            bound = sum(
                r.uncompressed_bytes * r.rank / min(r.shape[0], math.prod(r.shape[1:]))
                if r.compressed
                else r.uncompressed_bytes
                for r in plan.rows
            )
            plan_info[key] = (plan.state_bytes, plan.uncompressed_bytes, int(bound))
        del row
        print(f"round {rnd}: {key:10s} {this_round[key]:7.2f} s", flush=True)
    for key, t in this_round.items():
        times[key].append(t)
        ratios[key].append(t / this_round["naive"])
elapsed = time.time() - start

naive_bytes = held["naive"]
params = sum(p.numel() for p in make_model().parameters())
lines = [
    f"# Accumulation memory and time per cycle ({device.type})",
    "",
    f"GPT-2-like model from `transformers` ({params / 1e6:.1f}M parameters: {args.layers} "
    f"layers, d={args.embd}, vocab 50257, tied head), micro-batch {args.micro_batch} x "
    f"{args.seq} byte tokens of the CPython standard library source, tau = {args.tau}. "
    "Accumulation bytes are measured mid-cycle from the tensors held; times are per whole "
    "cycle (tau forward/backward passes + decompression + optimizer step), median over "
    f"{args.rounds} rounds, and the ratio is the median of per-round ratios to naive "
    "accumulation in the same round.",
    "",
    "| row | accumulation bytes | / naive | s / cycle | time / naive |",
    "|---|---|---|---|---|",
]
for key, _ in FACTORIES:
    lines.append(
        f"| {names[key]} | {format_bytes(held[key])} | {held[key] / naive_bytes:.4f} "
        f"| {statistics.median(times[key]):.2f} | {statistics.median(ratios[key]):.3f} |"
    )
if peaks:
    lines += ["", "| row | peak CUDA memory |", "|---|---|"]
    lines += [f"| {names[k]} | {format_bytes(v)} |" for k, v in peaks.items()]
lines += [
    "",
    "Target check (bytes from `GradientAccumulator.plan()`, equal to the measured bytes): "
    "buffer bytes <= sum over compressed matrices of r/min(m,n) x naive + uncompressed "
    "vectors.",
    "",
    "| rank | buffer bytes | bound | naive | met |",
    "|---|---|---|---|---|",
]
for key, (state, naive, bound) in plan_info.items():
    if key.startswith("r") and " " not in key:
        lines.append(
            f"| {key[1:]} | {state} | {bound} | {naive} | {'yes' if state <= bound else 'NO'} |"
        )
r32 = statistics.median(ratios["r32"]) if "r32" in ratios else float("nan")
lines += [
    "",
    f"Time target (<= 1.2x naive at rank 32): {r32:.3f}x, {'met' if r32 <= 1.2 else 'MISSED'}.",
    "",
    "Command: `" + " ".join(["python benchmarks/accumulation.py", *sys.argv[1:]]) + "`",
    "",
    f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
    f"{torch.get_num_threads()} threads; torch {torch.__version__}; flora {flora.__version__}; "
    f"benchmark wall time {elapsed / 60:.1f} min.",
]
out = Path(args.out or f"benchmarks/results/accumulation_{device.type}.md")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
