"""The evidence harness: the paper's experiments at small scale on real data, side by side
with the real peer libraries (``flora-experiments``).

Modules: :mod:`~flora_experiments.datasets` (real data, installed on first use from the
package registries), :mod:`~flora_experiments.memory` (exact state/parameter byte counts),
:mod:`~flora_experiments.report` (Markdown + JSON + plot with command, versions, seed and
machine), and one module per experiment (:mod:`~flora_experiments.pilot`,
:mod:`~flora_experiments.lm`, :mod:`~flora_experiments.vit`). Only torch is imported here; data
tools, matplotlib, transformers and the peers are imported where an experiment uses them.
"""
