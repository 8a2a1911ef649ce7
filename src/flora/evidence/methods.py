"""The rows of the paper's Tables 1 and 2 (``none``, ``naive``, ``lora-<r>``, ``flora-<r>``),
the momentum optimizer each row of Table 2 uses, and the step-size sweep bookkeeping shared by
the accumulation, translation and summarization experiments."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "best_of_sweep",
    "best_rows",
    "methods",
    "momentum_optimizer",
    "parse_method",
    "ratios_to_naive",
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
    """Set ``row[new] = row[key] / naive_row[key]`` for each ``new: key`` of ``pairs``."""
    naive = next(r for r in rows if r["method"] == "naive")
    for row in rows:
        for new, key in pairs.items():
            row[new] = row[key] / naive[key] if naive[key] else None


def best_of_sweep(
    points: list[dict[str, Any]], key: str, *, lower: bool, describe: Callable[[dict], str]
) -> dict[str, Any]:
    """The best of ``points`` (one per step size) by ``key`` (the first of equals, i.e. the
    smaller step size), with ``"sweep"`` listing ``"<lr>: <describe(point)>"`` for all."""
    best = dict((min if lower else max)(points, key=lambda r: r[key]))
    best["sweep"] = ", ".join(f"{r['lr']:g}: {describe(r)}" for r in points)
    return best


def best_rows(
    ranks: tuple[int, ...],
    lrs: Callable[[str], tuple[float, ...]],
    train: Callable[[str, float], dict[str, Any]],
    key: str,
    *,
    lower: bool,
    describe: Callable[[dict], str],
) -> list[dict[str, Any]]:
    """One row per method of :func:`methods` (``ranks``): ``train(method, lr)`` at each of
    ``lrs(method)``, the best by ``key`` kept with the whole sweep (:func:`best_of_sweep`)."""
    return [
        best_of_sweep([train(m, lr) for lr in lrs(m)], key, lower=lower, describe=describe)
        for m in methods(ranks)
    ]
