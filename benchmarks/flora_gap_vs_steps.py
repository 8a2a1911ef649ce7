"""Does Flora's gap to full momentum shrink with longer training? The LM experiment's quick
model (``flora-experiments lm --quick``: LLaMA-style, hidden 128, Shakespeare bytes, rank 32,
kappa 50) trained for several run lengths with Adafactor without momentum, Adafactor with full
momentum (``Flora(compress=False)``) and Flora, each at the step size that was best in the
200-step sweep of ``lm_quick.md`` (schedule: the experiment's warm-up + cosine, stretched to
the run length); writes ``results/flora_gap_vs_steps.md``.

The projection keeps a cosine of about ``(1 + (n+1)/r) ** -0.5`` with the true momentum
(``projection_noise.md``; 0.45 at r = 32, n = 128), so in a run limited by the number of
steps Flora moves slower than full momentum; the noise is fresh in every resampling window,
so over a longer run it should average out and the gap should shrink. This checks that.

    python benchmarks/flora_gap_vs_steps.py     # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "flora_gap_vs_steps.md"
RUNS = {"adafactor": 0.1, "adafactor-momentum": 0.03, "flora": 0.03}  # lm_quick.md's best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="200,600,1200")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from flora_experiments.lm import LMConfig, _data, train_one

    base = LMConfig.quick()
    train, val = _data(base)
    table = {}
    for steps in map(int, args.steps.split(",")):
        cfg = replace(base, steps=steps)
        for name, lr in RUNS.items():
            torch.manual_seed(0)
            table[steps, name] = train_one(name, lr, cfg, train, val)["val_ppl"]
            print(steps, name, f"{table[steps, name]:.3f}", flush=True)

    lines = [
        "# Flora's gap to full momentum against run length",
        "",
        "Reproduce: `python benchmarks/flora_gap_vs_steps.py`",
        "",
        f"LLaMA-style decoder as `flora-experiments lm --quick` (hidden {base.hidden}, "
        f"{base.layers} layers, batch {base.batch}, sequence {base.seq}, Shakespeare bytes), "
        f"Flora rank {base.rank}, kappa {base.kappa}; step sizes fixed at the 200-step sweep's "
        f"best ({', '.join(f'{k} {v:g}' for k, v in RUNS.items())}). Held-out perplexity per byte.",
        "",
        "| steps | Adafactor, no momentum | full momentum | Flora | Flora / full momentum |",
        "|---|---|---|---|---|",
    ]
    for steps in map(int, args.steps.split(",")):
        none, full, flora = (table[steps, n] for n in RUNS)
        lines.append(f"| {steps} | {none:.3f} | {full:.3f} | {flora:.3f} | {flora / full:.3f} |")
    lines += ["", f"torch {torch.__version__}, seed 0, one run per cell."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
