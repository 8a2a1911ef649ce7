"""The rows of the paper's Tables 1 and 2 (``none``, ``naive``, ``lora-<r>``, ``flora-<r>``),
the momentum optimizer each row of Table 2 uses, and the step-size sweep bookkeeping shared by
the accumulation, translation and summarization experiments."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "best_of_sweep",
    "best_rows",
    "chosen_methods",
    "edge_note",
    "headline",
    "methods",
    "momentum_optimizer",
    "parse_method",
    "plot_sweeps",
    "ratios_to_naive",
    "sweep",
]


def parse_method(method: str) -> tuple[str, int]:
    """``"none"``, ``"naive"``, ``"lora-<r>"`` or ``"flora-<r>"`` -> (kind, rank or 0)."""
    kind, _, rank_text = method.partition("-")
    ranked = kind in ("lora", "flora")
    if kind not in ("none", "naive", "lora", "flora") or ranked != rank_text.isdigit():
        raise ValueError(f"method must be none, naive, lora-<r> or flora-<r>, got {method!r}")
    return kind, int(rank_text) if ranked else 0


def methods(ranks: tuple[int, ...]) -> list[str]:
    """Table 1/2's rows: none, naive, then LoRA and Flora at each rank."""
    return ["none", "naive", *(f"lora-{r}" for r in ranks), *(f"flora-{r}" for r in ranks)]


def chosen_methods(chosen: Iterable[str], ranks: tuple[int, ...]) -> list[str]:
    """The rows to run: ``chosen`` (checked) if any, else :func:`methods` of ``ranks``. The
    ratio columns are to ``naive``; without it they stay empty (to save a run whose naive
    row exists in another result of the same seed)."""
    names = list(chosen) or methods(ranks)
    for name in names:
        parse_method(name)
    return names


def momentum_optimizer(
    method: str, named: Iterable[tuple[str, torch.Tensor]], lr: float, kappa: int, seed: int
) -> torch.optim.Optimizer:
    """Table 2's optimizer for ``method``, all Adafactor-based as in the paper: ``none`` =
    ``Flora(beta1=0)`` (= ``torch.optim.Adafactor``); ``naive`` and ``lora-r`` =
    ``Flora(compress=False)`` (full-size momentum of what is trained); ``flora-r`` =
    ``Flora(rank=r)`` (compressed momentum)."""
    import flora

    kind, rank = parse_method(method)
    options: dict[str, Any] = {"lr": lr, "kappa": kappa, "seed": seed}
    if kind == "none":
        options["beta1"] = 0.0
    elif kind in ("naive", "lora"):
        options["compress"] = False
    else:
        options["rank"] = rank
    return flora.Flora(list(named), **options)


def ratios_to_naive(rows: list[dict[str, Any]], pairs: dict[str, str]) -> None:
    """Set ``row[new] = row[key] / naive_row[key]`` for each ``new: key`` of ``pairs`` (None
    without a naive row)."""
    naive = next((r for r in rows if r["method"] == "naive"), None)
    for row in rows:
        for new, key in pairs.items():
            row[new] = row[key] / naive[key] if naive is not None and naive[key] else None


def sweep(
    train: Callable[[float], dict[str, Any]],
    lrs: tuple[float, ...],
    key: str,
    *,
    lower: bool,
    extend: int = 2,
) -> list[dict[str, Any]]:
    """``train(lr)`` at each of ``lrs``, then, while the best by ``key`` sits on the smallest or
    largest step size tried, one more step size past that edge (at the ratio of the grid's two
    outermost points on that side), at most ``extend`` per side. Returns every point, by
    ascending step size. Ties go to the smaller step size, so a flat sweep extends downwards."""
    grid = sorted(lrs)
    points = [train(lr) for lr in grid]
    added = {0: 0, -1: 0}
    while len(grid) > 1:
        best = _best_index(points, key, lower)
        side = 0 if best == 0 else -1 if best == len(points) - 1 else None
        if side is None or added[side] >= extend:
            break
        added[side] += 1
        if side == 0:
            lr = points[0]["lr"] * grid[0] / grid[1]
            points.insert(0, train(lr))
        else:
            lr = points[-1]["lr"] * grid[-1] / grid[-2]
            points.append(train(lr))
    return points


def _best_index(points: list[dict[str, Any]], key: str, lower: bool) -> int:
    """Index of the best point by ``key``, the first of equals; NaN (diverged) is the worst."""
    worst = math.inf if lower else -math.inf
    values = [worst if math.isnan(p[key]) else p[key] for p in points]
    return values.index(min(values) if lower else max(values))


def best_of_sweep(
    points: list[dict[str, Any]], key: str, *, lower: bool, describe: Callable[[dict], str]
) -> dict[str, Any]:
    """The best of ``points`` (one per step size, ascending) by ``key`` (the first of equals,
    i.e. the smaller step size), with ``"sweep"`` listing ``"<lr>: <describe(point)>"`` for
    all, ``"points"`` the numbers of every point, and ``"lr_at_edge"`` whether the best is the
    smallest or largest step size tried."""
    index = _best_index(points, key, lower)
    best = dict(points[index])
    best["sweep"] = ", ".join(f"{r['lr']:.3g}: {describe(r)}" for r in points)
    best["points"] = [
        {k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for r in points
    ]
    best["lr_at_edge"] = len(points) > 1 and index in (0, len(points) - 1)
    return best


def best_rows(
    names: Iterable[str],
    lrs: Callable[[str], tuple[float, ...]],
    train: Callable[[str, float], dict[str, Any]],
    key: str,
    *,
    lower: bool,
    describe: Callable[[dict], str],
    extend: int = 2,
) -> list[dict[str, Any]]:
    """One row per method of ``names``: ``train(method, lr)`` over
    :func:`sweep` from ``lrs(method)``, the best by ``key`` kept with every point
    (:func:`best_of_sweep`)."""
    return [
        best_of_sweep(
            sweep(lambda lr, m=m: train(m, lr), lrs(m), key, lower=lower, extend=extend),
            key,
            lower=lower,
            describe=describe,
        )
        for m in names
    ]


def headline(rows: list[dict[str, Any]], key: str, *, lower: bool) -> list[tuple[str, dict]]:
    """``(label, row)`` for ``none`` and ``naive`` and the best Flora and LoRA rows by ``key``,
    those of them that were run: the comparison the paper's Tables 1 and 2 make."""
    out = [(r["method"], r) for m in ("none", "naive") for r in rows if r["method"] == m]
    for kind, label in (("flora", "best Flora"), ("lora", "best LoRA")):
        group = [r for r in rows if r["method"].startswith(f"{kind}-")]
        if group:
            out.append((label, group[_best_index(group, key, lower)]))
    return out


def edge_note(rows: list[dict[str, Any]], extend: int = 2, label: str = "method") -> str:
    """One sentence on how the sweeps were widened and which best step sizes (rows named by
    ``row[label]``) still sit on an edge of what was tried: the optimum may lie further out."""
    edged = [f"{r[label]} ({r['lr']:.3g})" for r in rows if r.get("lr_at_edge")]
    return (
        f"Each sweep is widened by up to {extend} step sizes past an edge while its best sits "
        "there; "
        + (
            f"best still on an edge of what was tried: {', '.join(edged)}."
            if edged
            else "every best step size is inside its sweep."
        )
    )


def plot_sweeps(
    res: Any, rows: list[dict[str, Any]], key: str, label: str, memory_key: str, memory: str
) -> None:
    """Plot ``key`` against the step size for every method's sweep (left) and each method's
    best ``key`` against ``row[memory_key]`` (right) on :class:`~flora_experiments.report.Results`
    ``res``."""
    for row in rows:
        res.curves[row["method"]] = [(p["lr"], p[key]) for p in row["points"]]
        if row.get(memory_key) is not None:
            res.points[row["method"]] = (row[memory_key], row[key])
    res.curve_axes = ("step size", label)
    res.curve_log_x = True
    res.point_axes = (memory, label)
