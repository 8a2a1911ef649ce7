"""How well each compressed-accumulation estimate recovers MiniLM's real accumulated gradients.

Runs the MiniLM accumulation row's naive training (``flora_experiments.accumulate``: batch 1,
tau = 16, AdamW) and, at chosen optimizer steps, keeps every matrix's exact accumulated
gradient ``a`` (the sum of the 16 micro-batch gradients, as ``.grad`` holds it). Each
estimator then sees the same ``a`` at the same number of stored values as the accumulator's
rank-``r`` buffer (``r * kept`` numbers; sketches are linear, so sketching the sum equals
summing the micro-batches' sketches) and is scored by

* relative error ``||a - a_hat||_F / ||a||_F`` pooled over the matrices of a kind
  (``sqrt(sum ||a - a_hat||^2 / sum ||a||^2)``), and
* sign agreement weighted by ``|a|``: ``sum |a| [sign a_hat = sign a] - ...``, i.e.
  ``sum(|a| sign(a) sign(a_hat)) / sum |a|`` (AdamW's first steps are nearly sign steps).

Estimators: the unbiased Gaussian projection (Algorithm 1), Tropp et al.'s two-sketch
(the accumulator's default) with the default and other ``k : l`` splits, their three-sketch
with a core sketch (Tropp, Yurtsever, Udell & Cevher, SIAM J. Sci. Comput. 41(4), 2019), a
warm-started two-sketch whose range test matrix is the previous step's estimated co-range,
and the truncated SVD of the same rank (the best any rank-k estimate can do).

    python benchmarks/accumulation_error.py --capture 0,1,2,3,30,31,32,33,60,61,62,63 \
        --out /tmp/acc
    python benchmarks/accumulation_error.py --load /tmp/acc  # the table of
        # benchmarks/results/accumulation_error.md
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

RANK = 48


def capture(steps: list[int], out: Path, lr: float, seed: int) -> None:
    from flora_experiments.accumulate import AccumulateConfig, _encode, _model, passages
    from flora_experiments.datasets import shakespeare_works

    cfg = AccumulateConfig.quick()
    train, _ = passages(shakespeare_works(), cfg.works, cfg.passage_chars)
    model, tokenizer = _model(len(cfg.works))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    last = max(steps)
    order = torch.randint(len(train), ((last + 1) * cfg.accumulate,), generator=gen).tolist()
    out.mkdir(parents=True, exist_ok=True)
    for i, index in enumerate(order):
        text, label = train[index]
        batch = _encode(tokenizer, [text], cfg.max_tokens)
        (model(**batch, labels=torch.tensor([label])).loss / cfg.accumulate).backward()
        if (i + 1) % cfg.accumulate == 0:
            step = i // cfg.accumulate
            if step in steps:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad.ndim == 2}
                torch.save(grads, out / f"step{step}.pt")
                print(f"saved step {step}", file=sys.stderr, flush=True)
            opt.step()
            opt.zero_grad(set_to_none=True)


def gaussian(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def two_sketch(a: torch.Tensor, k: int, l_: int, gen: torch.Generator, omega=None):
    """a (o, d): Y = a Omega^T (o, k), W = Psi a (l, d)."""
    o, d = a.shape
    omega = gaussian((k, d), gen) if omega is None else omega
    psi = gaussian((l_, o), gen)
    y, w = a @ omega.T, psi @ a
    q = torch.linalg.qr(y).Q
    return q @ torch.linalg.lstsq(psi @ q, w).solution


def three_sketch(a: torch.Tensor, k: int, s: int, gen: torch.Generator):
    """Tropp et al. 2019: X = Upsilon a (k, d), Y = a Omega^T (o, k), Z = Phi a Psi^T (s, s)."""
    o, d = a.shape
    upsilon, omega = gaussian((k, o), gen), gaussian((k, d), gen)
    phi, psi = gaussian((s, o), gen), gaussian((s, d), gen)
    x, y, z = upsilon @ a, a @ omega.T, phi @ a @ psi.T
    q = torch.linalg.qr(y).Q  # (o, k)
    p = torch.linalg.qr(x.T).Q  # (d, k)
    left = torch.linalg.lstsq(phi @ q, z).solution  # (k, s)
    core = torch.linalg.lstsq(psi @ p, left.T).solution.T  # (k, k)
    return q @ core @ p.T


def projection(a: torch.Tensor, r: int, gen: torch.Generator):
    """Algorithm 1's unbiased estimate: a A^T A with A (r, d) of N(0, 1/r) entries."""
    proj = gaussian((r, a.shape[1]), gen) / math.sqrt(r)
    return (a @ proj.T) @ proj


def truncated(a: torch.Tensor, k: int):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def sizes_two(r: int, o: int, d: int, ratio: float):
    """Largest k with k o + l d <= r o, l = ratio * k + 1 (ratio 2 = Tropp's flat choice)."""
    k = 1
    while (k + 1) * o + (int(ratio * (k + 1)) + 1) * d <= r * o and k + 1 <= min(o, d):
        k += 1
    return k, min(int(ratio * k) + 1, o)


def sizes_plus(r: int, o: int, d: int, extra: int):
    """Largest k with k o + (k + extra) d <= r o."""
    k = (r * o - extra * d) // (o + d)
    return k, min(k + extra, o)


def sizes_three(r: int, o: int, d: int):
    """Largest k with k (o + d) + s^2 <= r o and s = 2k + 1 (Tropp 2019's recommendation
    for a flat spectrum, s >= 2k + 1), then s as large as the rest allows."""
    k = 1
    while (k + 1) * (o + d) + (2 * (k + 1) + 1) ** 2 <= r * o and k + 1 <= min(o, d):
        k += 1
    s = math.isqrt(r * o - k * (o + d))
    return k, min(s, o, d)


def oriented(name: str, g: torch.Tensor) -> torch.Tensor:
    """(kept, compressed): the accumulator compresses the smaller dimension."""
    return g if g.shape[0] >= g.shape[1] else g.T


def kind(name: str) -> str:
    if "embeddings" in name:
        return "embeddings"
    if "attention" in name:
        return "attention"
    if "intermediate" in name or "output.dense" in name:
        return "mlp"
    return "other"


def adam_first_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.sign() * b.sign() * a.abs()).sum() / a.abs().sum())


def evaluate(load: Path, r: int) -> None:
    files = sorted(load.glob("step*.pt"), key=lambda p: int(p.stem[4:]))
    steps = {int(p.stem[4:]): torch.load(p) for p in files}
    methods = ["projection", "two 1:2 (default)", "two 1:1", "two 1:3", "two l=k+6",
               "two l=k+12", "two l=1.5k", "three-sketch", "warm two 1:2", "half-warm two 1:2",
               "oracle-warm two 1:2", "svd rank k2", "svd rank k3"]  # fmt: skip
    err = {(m, c): [0.0, 0.0] for m in methods for c in ("all", "attention", "mlp", "embeddings")}
    agree = {m: [0.0, 0] for m in methods}
    gen = torch.Generator().manual_seed(0)
    previous: dict[str, torch.Tensor] = {}
    rows = []
    for step, grads in steps.items():
        for name, g in grads.items():
            if min(g.shape) < 16:
                continue
            a = oriented(name, g).double()
            o, d = a.shape
            k2, l2 = sizes_two(r, o, d, 2.0)
            k3, s3 = sizes_three(r, o, d)
            est = {
                "projection": projection(a, r, gen),
                "two 1:2 (default)": two_sketch(a, k2, l2, gen),
                "two 1:1": two_sketch(a, *sizes_two(r, o, d, 1.0), gen),
                "two 1:3": two_sketch(a, *sizes_two(r, o, d, 3.0), gen),
                "two l=k+6": two_sketch(a, *sizes_plus(r, o, d, 6), gen),
                "two l=k+12": two_sketch(a, *sizes_plus(r, o, d, 12), gen),
                "two l=1.5k": two_sketch(a, *sizes_two(r, o, d, 1.5), gen),
                "three-sketch": three_sketch(a, k3, s3, gen),
                "svd rank k2": truncated(a, k2),
                "svd rank k3": truncated(a, k3),
            }
            # warm start: the previous step's co-range (k2 rows from its estimate) as Omega
            prev = previous.get(name)
            omega = None
            if prev is not None and step - 1 in steps:
                omega = torch.linalg.svd(prev, full_matrices=False).Vh[:k2]
            est["warm two 1:2"] = two_sketch(a, k2, l2, gen, omega)
            half = None
            if omega is not None:
                half = torch.cat([omega[: k2 // 2], gaussian((k2 - k2 // 2, d), gen)])
            est["half-warm two 1:2"] = two_sketch(a, k2, l2, gen, half)
            oracle = None
            if step - 1 in steps and name in steps[step - 1]:
                before = oriented(name, steps[step - 1][name]).double()
                oracle = torch.linalg.svd(before, full_matrices=False).Vh[:k2]
            est["oracle-warm two 1:2"] = two_sketch(a, k2, l2, gen, oracle)
            previous[name] = est["warm two 1:2"]
            total = float(a.square().sum())
            for m, e in est.items():
                loss = float((a - e).square().sum())
                for c in ("all", kind(name)):
                    if (m, c) in err:
                        err[(m, c)][0] += loss
                        err[(m, c)][1] += total
                agree[m][0] += adam_first_cosine(a, e) * float(a.abs().sum())
                agree[m][1] += float(a.abs().sum())
            rows.append((step, name, o, d, k2, l2, k3, s3))
    print(f"# Recovery of MiniLM's accumulated gradients at rank {r}\n")
    print(f"Optimizer steps captured: {', '.join(map(str, steps))}; "
          f"{len({n for _, n, *_ in rows})} matrices (min side >= 16).\n")  # fmt: skip
    print(
        "| estimate | rel. error, all | attention | MLP | embeddings | |a|-weighted sign "
        "agreement |\n|---|---|---|---|---|---|"
    )
    for m in methods:
        cells = []
        for c in ("all", "attention", "mlp", "embeddings"):
            loss, total = err[(m, c)]
            cells.append(f"{math.sqrt(loss / total):.3f}" if total else "-")
        print(f"| {m} | " + " | ".join(cells) + f" | {agree[m][0] / agree[m][1]:.3f} |")
    print("\nSizes (kept x compressed: two-sketch k, l; three-sketch k, s):")
    seen = set()
    for _, _, o, d, k2, l2, k3, s3 in rows:
        if (o, d) not in seen:
            seen.add((o, d))
            print(f"- {o} x {d}: two ({k2}, {l2}), three ({k3}, {s3})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capture", help="comma-separated optimizer steps to keep")
    ap.add_argument("--out", type=Path, default=Path("/tmp/accumulation_error"))
    ap.add_argument("--load", type=Path)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=RANK)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.capture:
        capture([int(s) for s in args.capture.split(",")], args.out, args.lr, args.seed)
    if args.load:
        evaluate(args.load, args.rank)


if __name__ == "__main__":
    main()
