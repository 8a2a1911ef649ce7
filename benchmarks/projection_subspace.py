"""GaLore's SVD subspace against Flora's random one: how much of the LM's gradient each keeps.
The measured cause of the LM experiment's GaLore-ahead-of-Flora result.

On the LM experiment's quick model and data (``flora-experiments lm --quick``: LLaMA-style,
hidden 128, Shakespeare bytes, rank 32), the model is trained for 200 steps with Adafactor
(no momentum, its best step size there, the experiment's warm-up + cosine schedule). At each
refresh step of GaLore (every ``update_proj_gap`` = 50 steps, as in the experiment) each
block matrix ``G`` (``m x n``) gets both projections on its smaller side ``d``:

* GaLore: ``Q``, the top-``r`` singular vectors of that step's gradient, kept until the next
  refresh; the gradient seen is ``Q Q^T G``;
* Flora: ``P`` (``r x d``, entries N(0, 1/r), :func:`flora.projection.projection_matrix`);
  the gradient seen is ``P^T P G``, whose expected cosine with ``G`` is about
  ``(1 + (d + 1) / r) ** -0.5`` whatever ``G`` is.

The table gives the cosine between what each keeps and the true gradient, over all block
matrices together, at the refresh step and 1, 10 and 49 steps after it (GaLore's subspace
ages; Flora's does not depend on the gradient).

A control separates GaLore's subspace from its step sizes: GaLore's best run
(``lm_quick.json``) moves the block matrices by Adam at ``lr * scale`` (scale 0.25) and
everything else (embeddings, norms, head) by Adam at ``lr``. Full-rank AdamW with those
two step sizes shows how much of GaLore's lead over AdamW (one step size for all) comes from
them rather than from projecting.

    python benchmarks/projection_subspace.py     # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "projection_subspace.md"
LM_RESULTS = OUT.parent / "compare" / "lm_quick.json"
OFFSETS = (0, 1, 10, 49)
KINDS = ("galore", "flora")


def smaller_side(g: torch.Tensor) -> torch.Tensor:
    """``g`` oriented so that the projected side is its first dimension."""
    return g if g.shape[0] <= g.shape[1] else g.T


def per_group_adamw(cfg, train, val, lr_rest: float, lr_matrices: float) -> float:
    """Held-out perplexity of full-rank AdamW with one step size for the block matrices and
    another for the rest, trained as ``flora-experiments lm`` trains each row."""
    from flora_experiments.lm import MATRICES, _batches, _evaluate, _model, _schedule

    model = _model(cfg)
    low = [p for n, p in model.named_parameters() if any(m in n for m in MATRICES)]
    rest = [p for n, p in model.named_parameters() if not any(m in n for m in MATRICES)]
    groups = [{"params": rest, "lr": lr_rest}, {"params": low, "lr": lr_matrices}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = _schedule(opt, cfg.steps)
    for x in _batches(train, cfg, cfg.steps, cfg.seed + 1):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return math.exp(_evaluate(model, val))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gap", type=int, default=50, help="GaLore's update_proj_gap")
    parser.add_argument("--lr", type=float, default=0.1, help="Adafactor's (lm_quick best)")
    parser.add_argument(
        "--lm-results", type=Path, default=LM_RESULTS, help="GaLore's best lr, perplexities"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from flora.projection import parameter_key, projection_matrix
    from flora_experiments.lm import MATRICES, LMConfig, _batches, _data, _model, _schedule

    cfg = LMConfig.quick()
    train, val = _data(cfg)
    model = _model(cfg)
    matrices = {n: p for n, p in model.named_parameters() if any(m in n for m in MATRICES)}
    opt = torch.optim.Adafactor(model.parameters(), lr=args.lr)
    sched = _schedule(opt, cfg.steps)
    galore: dict[str, torch.Tensor] = {}
    flora: dict[str, torch.Tensor] = {}
    table: dict[tuple[int, int], tuple[float, float]] = {}
    for step, x in enumerate(_batches(train, cfg, cfg.steps, cfg.seed + 1)):
        model(input_ids=x, labels=x).loss.backward()
        refresh, offset = divmod(step, args.gap)
        if offset == 0:
            for name, p in matrices.items():
                g = smaller_side(p.grad.double())
                galore[name] = torch.linalg.svd(g, full_matrices=False)[0][:, : args.rank]
                flora[name] = projection_matrix(
                    args.rank, g.shape[0], seed=0, key=parameter_key(name), window=refresh,
                    dtype=torch.float64,
                )  # fmt: skip
        if offset in OFFSETS:
            true_sq, seen_sq, dot = 0.0, dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0.0)
            for name, p in matrices.items():
                g = smaller_side(p.grad.double())
                true_sq += float(g.square().sum())
                for kind, seen in (
                    ("galore", galore[name] @ (galore[name].T @ g)),
                    ("flora", flora[name].T @ (flora[name] @ g)),
                ):
                    seen_sq[kind] += float(seen.square().sum())
                    dot[kind] += float((seen * g).sum())
            table[refresh * args.gap, offset] = tuple(
                dot[k] / math.sqrt(true_sq * seen_sq[k]) for k in KINDS
            )
            print(step, table[refresh * args.gap, offset], flush=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    best = {r["optimizer"]: r for r in json.loads(args.lm_results.read_text())["rows"]}
    galore_lr = best["galore"]["lr"]
    control = per_group_adamw(cfg, train, val, galore_lr, galore_lr * 0.25)
    print("control", control, flush=True)

    dims = sorted({min(p.shape) for p in matrices.values()})
    predicted = [(1 + (d + 1) / args.rank) ** -0.5 for d in dims]
    lines = [
        "# GaLore's SVD subspace against Flora's random subspace",
        "",
        "Reproduce: `python benchmarks/projection_subspace.py`",
        "",
        f"LLaMA-style decoder as `flora-experiments lm --quick` (hidden {cfg.hidden}, {cfg.layers} "
        f"layers, batch {cfg.batch}, sequence {cfg.seq}, Shakespeare bytes) trained {cfg.steps} "
        f"steps with torch Adafactor (lr {args.lr:g}, the experiment's schedule). Rank "
        f"{args.rank}, GaLore's subspace refreshed every {args.gap} steps from that step's "
        f"gradient. Cosine with the true gradient of what each projection keeps, over the "
        f"{len(matrices)} block matrices together (smaller side {', '.join(map(str, dims))}; "
        f"Flora predicted {', '.join(f'{c:.2f}' for c in predicted)}).",
        "",
        "| refresh at step | steps since refresh | GaLore (SVD) | Flora (random) |",
        "|---|---|---|---|",
    ]
    for (start, offset), (g, f) in sorted(table.items()):
        lines.append(f"| {start} | {offset} | {g:.3f} | {f:.3f} |")
    lines += [
        "",
        f"Control, full-rank AdamW with GaLore's step sizes (block matrices "
        f"{galore_lr * 0.25:.3g}, the rest {galore_lr:.3g}), same model, batches and "
        f"schedule: held-out perplexity {control:.3f} (`lm_quick.md`: GaLore "
        f"{best['galore']['val_ppl']:.3f}, AdamW at one step size {best['adamw']['val_ppl']:.3f}"
        f" ({best['adamw']['lr']:.3g})).",
        "",
        "GaLore's column is the share of each later gradient that lies in the refresh "
        "step's top singular directions (an orthogonal projection: cosine = kept norm / "
        "norm). Flora's column does not depend on the gradient; what its projection drops "
        "comes back as unbiased noise that averages out only over many updates.",
        "",
        f"torch {torch.__version__}, seed 0 (model, batches, Flora's projections).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
