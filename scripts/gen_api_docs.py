"""Write docs/api.md from the public API's signatures and docstrings.

python scripts/gen_api_docs.py           # rewrite docs/api.md
python scripts/gen_api_docs.py --check   # exit 1 if docs/api.md is out of date
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "api.md"
OBJECTS = [
    "flora.Flora",
    "flora.FloraAdamW",
    "flora.GradientAccumulator",
    "flora.AccumulationMemory",
    "flora.Plan",
    "flora.PlanRow",
    "flora.Decision",
    "flora.decide",
    "flora.projection_matrix",
    "flora.parameter_key",
    "flora.down",
    "flora.up",
    "flora.transfer",
    "flora.momentum.compressed_ema_",
    "flora.optim.adafactor.flora_adafactor_update_",
    "flora.optim.adamw.flora_adamw_update_",
    "flora.integrations.hf.create_flora_optimizer",
    "flora.integrations.hf.FloraAccumulationCallback",
    "flora.integrations.hf.accelerate_sync",
    "flora.planner.plan_memory",
    "flora.distributed.FloraCommState",
    "flora.distributed.flora_comm_hook",
    "flora.planner.build_meta_model",
    "flora.gpt.GPT",
    "flora.gpt.GPTConfig",
    "flora.data.load_corpus",
    "flora.training.train",
    "flora.training.TrainConfig",
]


def resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def signature(obj, name: str) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def render() -> str:
    out = [
        "# API reference",
        "",
        "Generated from the docstrings by `python scripts/gen_api_docs.py`; a test fails when",
        "this file is out of date. The math and the deviations from the paper are in",
        "[algorithm.md](algorithm.md).",
        "",
    ]
    for path in OBJECTS:
        obj = resolve(path)
        out += [f"## `{path}`", "", "```python", signature(obj, path.rsplit(".", 1)[1]), "```", ""]
        out += [inspect.cleandoc(obj.__doc__ or "(no docstring)"), ""]
        if inspect.isclass(obj):
            members = {}
            for klass in reversed(obj.__mro__):  # own and inherited flora members
                members.update(vars(klass))
            for name, member in sorted(members.items()):
                if name.startswith("_") or not (callable(member) or isinstance(member, property)):
                    continue
                func = member.fget if isinstance(member, property) else member
                if not getattr(func, "__module__", "").startswith("flora") or not func.__doc__:
                    continue
                doc = inspect.cleandoc(func.__doc__)
                out += [f"### `{path.rsplit('.', 1)[1]}.{name}`", "", "```python"]
                out += [signature(func, name), "```", "", doc, ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
