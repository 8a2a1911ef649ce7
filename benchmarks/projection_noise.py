"""How much of the true accumulated gradient survives Flora's compressed accumulation: the
measured cause of the accumulation experiment's low-rank accuracy loss.

On the accumulation experiment's model and data (pretrained all-MiniLM-L6-v2 + classifier,
Shakespeare passages, batch 1, tau = 16), one cycle of micro-batches is accumulated plainly
and with ``flora.GradientAccumulator`` at each rank, on the same examples and weights. For a
projection ``A`` (``r x n``, entries N(0, 1/r)) and a gradient row ``g``, ``A^T A g`` is
unbiased with ``E||A^T A g||^2 = ||g||^2 (1 + (n + 1) / r)``, so the expected cosine between
the decompressed and the true gradient is about ``(1 + (n + 1) / r) ** -0.5`` (summed over the
compressed matrices, uncompressed ones exact). The table puts the measured cosine next to that
prediction and the RMS of the decompressed gradient against the true one: the factor by which
an optimizer that normalizes each coordinate (AdamW, Adafactor) shrinks the true direction.

    python benchmarks/projection_noise.py     # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "projection_noise.md"


def accumulated(model, batches, rank: int | None, seed: int, distribution: str = "gaussian"):
    """(``name -> accumulated .grad`` over ``batches``, the plan or None): plain when
    ``rank`` is None."""
    import flora

    model.zero_grad(set_to_none=True)
    acc = None
    if rank is not None:
        acc = flora.GradientAccumulator(
            model, len(batches), rank=rank, seed=seed, distribution=distribution
        )
    for batch, label in batches:
        loss = model(**batch, labels=torch.tensor([label])).loss / len(batches)
        if acc is None:
            loss.backward()
        else:
            with acc.micro_batch():
                loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    plan = None
    if acc is not None:
        plan = acc.plan()
        acc.remove()  # its hooks must not see the next accumulator's micro-batches
    return grads, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="8,32,128,256")
    parser.add_argument("--seeds", type=int, default=3, help="projection seeds per rank")
    parser.add_argument("--distributions", default="gaussian,sketch", help="the accumulator's")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from flora_experiments.accumulate import AccumulateConfig, _encode, _model, passages
    from flora_experiments.datasets import shakespeare_works

    cfg = AccumulateConfig.quick()
    train, _ = passages(shakespeare_works(), cfg.works, cfg.passage_chars)
    model, tokenizer = _model(len(cfg.works))
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(len(train), (cfg.accumulate,), generator=gen).tolist()
    batches = [(_encode(tokenizer, [train[i][0]], cfg.max_tokens), train[i][1]) for i in picks]
    true, _ = accumulated(model, batches, None, 0)
    true_sq = sum(float(g.square().sum()) for g in true.values())

    rows = []
    for distribution, rank in (
        (d, r) for d in args.distributions.split(",") for r in map(int, args.ranks.split(","))
    ):
        cosines, rms_ratios, predicted = [], [], []
        for seed in range(args.seeds):
            got, plan = accumulated(model, batches, rank, seed, distribution)
            dot = sum(float((got[n] * true[n]).sum()) for n in true)
            got_sq = sum(float(g.square().sum()) for g in got.values())
            cosines.append(dot / math.sqrt(got_sq * true_sq))
            rms_ratios.append(math.sqrt(got_sq / true_sq))
            expected_sq = 0.0
            for row in plan.rows:
                g_sq = float(true[row.name].square().sum())
                if row.compressed:
                    n = row.shape[0] if row.side == "left" else row.shape[1]
                    g_sq *= 1 + (n + 1) / rank
                expected_sq += g_sq
            predicted.append(math.sqrt(true_sq / expected_sq))
        compressed = sum(r.uncompressed_bytes for r in plan.rows if r.compressed)
        total = sum(r.uncompressed_bytes for r in plan.rows)
        pred = sum(predicted) / len(predicted) if distribution == "gaussian" else None
        rows.append((distribution, rank, sum(cosines) / len(cosines), min(cosines),
                     max(cosines), pred, sum(rms_ratios) / len(rms_ratios),
                     compressed / total))  # fmt: skip

    lines = [
        "# Compressed accumulation: how much of the true gradient survives",
        "",
        "Reproduce: `python benchmarks/projection_noise.py`",
        "",
        f"all-MiniLM-L6-v2 + classifier, one cycle of tau = {cfg.accumulate} micro-batches of "
        f"one Shakespeare passage ({cfg.max_tokens} tokens), as in `flora-experiments accumulate "
        f"--quick`; {args.seeds} projection seeds per rank. Cosine between the decompressed "
        "and the plain accumulated gradient over the whole model; predicted (Gaussian "
        "projection): `(sum ||g||^2 / sum ||g||^2 (1 + (n+1)/r))^0.5` over the compressed "
        'matrices. The sketch (`distribution="sketch"`) holds the same bytes as the '
        "projection at each rank.",
        "",
        "| accumulator | rank | cosine (mean) | min | max | predicted | norm vs true "
        "| compressed bytes share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for distribution, rank, cos, lo, hi, pred, ratio, share in rows:
        shown = "-" if pred is None else f"{pred:.3f}"
        lines.append(
            f"| {distribution} | {rank} | {cos:.3f} | {lo:.3f} | {hi:.3f} | {shown} | "
            f"{ratio:.2f} | {share:.3f} |"
        )
    lines += [
        "",
        "An optimizer that divides each coordinate by its own RMS (AdamW, Adafactor) turns a "
        "gradient of cosine c with the truth into a step whose component along the true "
        "direction is about c times that of the plain gradient's step; the rest is noise of a "
        "fresh direction every cycle, which averages out only over many updates.",
        "",
        f"torch {torch.__version__}, seed 0 for the examples.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
