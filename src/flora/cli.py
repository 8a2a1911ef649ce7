"""The ``flora`` command line.

    flora train [FILES ...] [options]   train a small GPT with Flora (the main job)
    flora plan [options]                memory of optimizer state and accumulation buffers

Bad input gives one ``flora: error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flora.gpt import SIZES
from flora.training import OPTIMIZERS, TrainConfig, TrainError, train

__all__ = ["CommandError", "main", "positive_int"]


class CommandError(Exception):
    """Bad input to a subcommand: one ``flora: error:`` line on stderr, exit status 2.
    (A failed training run raises :class:`flora.training.TrainError`, printed the same way
    with its own exit status.)"""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CommandError(f"{self.prog.split()[-1]}: {message}")


def positive_int(text: str) -> int:
    """argparse type: a positive integer (shared with flora-experiments' command line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flora", description="Flora: optimizer states with sublinear memory.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train a small GPT on text with Flora",
        description="Train a byte-level GPT on text files (default: the Python stdlib "
        "source), with a progress bar, held-out loss, checkpoints, a memory breakdown and "
        "a loss plot.",
    )
    d = TrainConfig()
    t.add_argument("files", nargs="*", help="text files or folders (default: stdlib source)")
    t.add_argument("--size", default=d.size, choices=list(SIZES), help="model preset")
    for name in ("n-layer", "n-head", "n-embd", "block-size"):
        t.add_argument(f"--{name}", type=positive_int, default=None, help="override the preset")
    t.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    t.add_argument("--lr", type=float, default=None, help="default depends on the optimizer")
    t.add_argument("--rank", type=positive_int, default=d.rank)
    t.add_argument("--kappa", type=positive_int, default=d.kappa)
    t.add_argument("--accumulate", type=positive_int, default=d.accumulate,
                   help="micro-batches per step (compressed accumulation when > 1)")  # fmt: skip
    t.add_argument("--accumulate-rank", type=positive_int, default=None, help="default: --rank")
    t.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    t.add_argument("--steps", type=positive_int, default=d.steps)
    t.add_argument("--eval-every", type=int, default=None, help="default: 5 per run; 0: at the end")
    t.add_argument("--eval-batches", type=positive_int, default=d.eval_batches)
    t.add_argument("--corpus-mb", type=float, default=d.corpus_mb)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--device", default=d.device)
    t.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 (bfloat16 with --lean)")  # fmt: skip
    t.add_argument("--out", default=d.out, help="folder for checkpoint.pt and loss.png")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint in --out (a new run refuses otherwise)")  # fmt: skip
    t.add_argument("--save-every", type=int, default=d.save_every)
    t.add_argument("--stop-at", type=positive_int, default=None,
                   help="stop after this step with a checkpoint (split a run)")  # fmt: skip
    t.add_argument("--lean", action="store_true",
                   help="bf16 weights without float32 masters (stochastic rounding), bf16 "
                   "optimizer state, compressed accumulation and step-in-backward (--dtype "
                   "bfloat16 implied)")  # fmt: skip
    t.add_argument("--no-plot", action="store_true")
    t.add_argument("--no-progress", action="store_true")

    pl = sub.add_parser(
        "plan",
        help="optimizer-state and accumulation memory for a model, without its weights",
        description="Per-parameter compression plan and memory of optimizer state and "
        "accumulation buffers for Flora, FloraAdamW, AdamW, Adafactor, 8-bit AdamW and GaLore "
        "at the same rank. The model is built on the meta device (no weights, no memory).",
    )
    pl.add_argument("--model", default="gpt2", help="GPT size, llama-7b, t5-3b, config.json")
    pl.add_argument("--rank", type=positive_int, default=32)
    pl.add_argument("--kappa", type=positive_int, default=1000)
    pl.add_argument("--accumulate", type=positive_int, default=1)
    pl.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32 (bfloat16 with --lean)")  # fmt: skip
    pl.add_argument("--lean", action="store_true",
                    help="add the whole-training memory of flora train --lean")  # fmt: skip
    pl.add_argument("--exclude", action="append", default=None, help="regex of names to keep")
    pl.add_argument("--details", action="store_true", help="print the per-parameter plan")
    return parser


def _plan(args: argparse.Namespace) -> int:
    import re
    import warnings

    import torch

    from flora.model_memory import PlanError, build_meta_model, plan_memory

    for pattern in args.exclude or []:
        try:
            re.compile(pattern)
        except re.error as err:
            raise CommandError(f"--exclude {pattern!r} is not a valid regex: {err}") from err
    try:
        model, description = build_meta_model(args.model, lean=args.lean)
    except PlanError as err:
        raise CommandError(str(err)) from err
    dtype = args.dtype or ("bfloat16" if args.lean else "float32")
    if args.lean and dtype != "bfloat16":
        raise CommandError("--lean trains in bfloat16: leave --dtype out or pass bfloat16")
    model = model.to(getattr(torch, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan itself shows what is not compressed
        result = plan_memory(
            model,
            rank=args.rank,
            kappa=args.kappa,
            accumulate=args.accumulate,
            description=f"{description}, {dtype}",
            exclude=args.exclude,
            lean=args.lean,
        )
    if args.details:
        print(result.flora_plan)
        print()
    print(result)
    return 0


def _train(args: argparse.Namespace) -> int:
    d = TrainConfig()
    cfg = TrainConfig(
        files=list(args.files),
        size=args.size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block_size,
        optimizer=args.optimizer,
        lr=args.lr,
        rank=args.rank,
        kappa=args.kappa,
        accumulate=args.accumulate,
        accumulate_rank=args.accumulate_rank,
        batch_size=args.batch_size,
        steps=args.steps,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        corpus_mb=args.corpus_mb,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype or ("bfloat16" if args.lean else d.dtype),
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        save_every=args.save_every,
        stop_at=args.stop_at,
        plot=not args.no_plot,
        progress=not args.no_progress,
        lean=args.lean,
    )
    result = train(cfg, echo=lambda line: print(line, flush=True))
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "train":
            return _train(args)
        if args.command == "plan":
            return _plan(args)
        raise AssertionError(args.command)
    except CommandError as err:
        print(f"flora: error: {err}", file=sys.stderr)
        return 2
    except TrainError as err:
        print(f"flora: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("flora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
