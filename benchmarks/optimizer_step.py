"""Optimizer-state bytes and step() time on GPT-2-small shapes, as ratios within one run.

Compares flora.Flora and flora.FloraAdamW at ranks 8/32/128 with torch.optim.Adafactor,
torch.optim.AdamW and the official flora_opt.Flora (same rank, kappa, beta1) when it is
installed. All optimizers see the same parameters and the same fixed gradients; timings are
medians over interleaved rounds, so machine noise hits every optimizer alike. State bytes are
counted from the tensors each optimizer really holds and checked against flora's plan formula.

    python benchmarks/optimizer_step.py                 # full GPT-2 small (124M), CPU
    python benchmarks/optimizer_step.py --layers 2      # quicker
    python benchmarks/optimizer_step.py --device cuda   # on a GPU machine

Writes benchmarks/results/optimizer_step_<device>.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import flora

parser = argparse.ArgumentParser()
parser.add_argument("--layers", type=int, default=12)
parser.add_argument(
    "--shapes", choices=("gpt2", "small"), default="gpt2",
    help="GPT-2-small's parameters, or 96 matrices of 64x64 (the multi-tensor engine's case)",
)  # fmt: skip
parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--device", default="cpu")
parser.add_argument("--out", default=None)
args = parser.parse_args()
device = torch.device(args.device)


def gpt2_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    d, vocab, ctx = 768, 50257, 1024
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (3 * d, d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (4 * d, d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (d, 4 * d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


SHAPES = (
    gpt2_shapes(args.layers) if args.shapes == "gpt2" else [(f"w{i}", (64, 64)) for i in range(96)]
)
gen = torch.Generator().manual_seed(0)
INIT = [torch.randn(s, generator=gen) * 0.02 for _, s in SHAPES]
GRADS = [torch.randn(s, generator=gen) * 1e-3 for _, s in SHAPES]


def make_params() -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for (name, _), init, grad in zip(SHAPES, INIT, GRADS, strict=True):
        p = torch.nn.Parameter(init.to(device).clone())
        p.grad = grad.to(device).clone()
        out.append((name, p))
    return out


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )


CANDIDATES = {
    "torch Adafactor": lambda ps: torch.optim.Adafactor([p for _, p in ps], lr=1e-2),
    "torch AdamW": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, foreach=True),
}
ENGINE = [  # (row suffix, options): the default, the loop, every size stacked, compiled
    ("", {}),
    (" loop (foreach=False)", {"foreach": False}),
    (" foreach=True", {"foreach": True}),
    (" foreach=True, compiled", {"foreach": True, "compiled": True}),
]
VARIANTS = {
    # Flora's seed-only orthonormal basis, kept per window (the default basis is state already)
    (flora.Flora, 1e-2): [*ENGINE, (" orthonormal, cached", {
        "distribution": "orthonormal", "cache_projection": True})],
    (flora.FloraAdamW, 1e-3): [ENGINE[0], (" cached", {"cache_projection": True}), *ENGINE[1:]],
}  # fmt: skip
for r in args.ranks:
    for (cls, lr), variants in VARIANTS.items():
        for suffix, options in variants:
            CANDIDATES[f"{cls.__name__} r{r}{suffix}"] = (
                lambda ps, cls=cls, lr=lr, r=r, options=options: cls(ps, lr=lr, rank=r, **options)
            )
try:
    import flora_opt  # official implementation (imports bitsandbytes and accelerate)

    for r in args.ranks:
        CANDIDATES[f"flora_opt.Flora r{r}"] = lambda ps, r=r: flora_opt.Flora(
            [p for _, p in ps], lr=1e-2, rank=r, beta1=0.9, kappa=1000
        )
    peer_version = getattr(flora_opt, "__version__", "0.0.3")
except ImportError as err:  # reported in the results, not hidden
    peer_version = f"not installed ({err})"

opts, params, times = {}, {}, {name: [] for name in CANDIDATES}
first_step = {}
for name, build in CANDIDATES.items():
    params[name] = make_params()
    opts[name] = build(params[name])


def timed_step(name: str) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opts[name].step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


for name in CANDIDATES:  # first step allocates state: timed separately
    first_step[name] = timed_step(name)
for name in CANDIDATES:  # the second, untimed: the multi-tensor step's first (compile=True
    for (_, p), g in zip(params[name], GRADS, strict=True):  # compiles there)
        if p.grad is None:
            p.grad = g.to(device).clone()
    opts[name].step()
for _ in range(args.rounds):
    for name in CANDIDATES:
        for (_, p), g in zip(params[name], GRADS, strict=True):
            if p.grad is None:  # flora_opt frees p.grad inside its step: give it back
                p.grad = g.to(device).clone()
        times[name].append(timed_step(name))

median = {name: statistics.median(ts) for name, ts in times.items()}
nbytes = {name: state_bytes(opt) for name, opt in opts.items()}


def baseline(name: str) -> str:
    return "torch AdamW" if "AdamW" in name else "torch Adafactor"


rows = []
for name in CANDIDATES:
    opt = opts[name]
    formula = opt.plan().state_bytes if isinstance(opt, flora.optim.FloraOptimizerBase) else None
    base = baseline(name)
    rows.append(
        "| {} | {:.1f} | {} | {:.3f} | {:.3f} | {:.0f} | {:.0f} | {:.2f} | {} |".format(
            name,
            nbytes[name] / 2**20,
            "-" if formula is None else ("yes" if formula == nbytes[name] else f"NO ({formula})"),
            nbytes[name] / nbytes["torch AdamW"],
            nbytes[name] / nbytes["torch Adafactor"],
            first_step[name] * 1e3,
            median[name] * 1e3,
            median[name] / median[base],
            base,
        )
    )

flora_vs_peer = []
for r in args.ranks:
    peer = f"flora_opt.Flora r{r}"
    if peer in median:
        for ours in (f"Flora r{r}", f"Flora r{r} orthonormal, cached"):
            flora_vs_peer.append(
                f"| {ours} | {median[ours] / median[peer]:.2f} | "
                f"{nbytes[ours] / nbytes[peer]:.3f} |"
            )

n_params = sum(t.numel() for t in INIT)
command = "python " + " ".join(sys.argv)
lines = [
    (
        f"# Optimizer step: GPT-2-small shapes ({args.layers} layers, {n_params / 1e6:.1f}M params)"
        if args.shapes == "gpt2"
        else f"# Optimizer step: {len(SHAPES)} matrices of 64x64 ({n_params / 1e6:.2f}M params)"
    ),
    "",
    f"Reproduce: `{command}` (after `make bench-setup`).",
    "",
    f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, device `{device}`"
    + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    + f"; torch {torch.__version__}; flora {flora.__version__}; flora_opt {peer_version}.",
    f"Timing: median of {args.rounds} interleaved rounds of one `step()`, fixed gradients; "
    "the first step (state allocation) is listed separately and the second is not timed "
    "(the multi-tensor step's first, where `compiled=True` compiles). Ratios use baselines "
    "timed in the same run. State bytes count every tensor in `optimizer.state`.",
    "",
    "| optimizer | state MiB | = plan formula | state / AdamW | state / Adafactor "
    "| first step ms | step ms | step / baseline | baseline |",
    "|---|---|---|---|---|---|---|---|---|",
    *rows,
    "",
]
if flora_vs_peer:
    lines += [
        "Against the official package at the same rank:",
        "",
        "| ours | step time / flora_opt | state / flora_opt |",
        "|---|---|---|",
        *flora_vs_peer,
        "",
    ]
text = "\n".join(lines)
print(text)
suffix = "" if args.shapes == "gpt2" else f"_{args.shapes}"
out = Path(
    args.out or Path(__file__).parent / "results" / f"optimizer_step{suffix}_{device.type}.md"
)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(text)
print(f"wrote {out}")
