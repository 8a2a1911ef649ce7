"""The evidence harness: the paper's experiments at small scale on real data, side by side
with the real peer libraries (``flora compare``).

Modules: :mod:`~flora.evidence.datasets` (real data, installed on first use from the
package registries), :mod:`~flora.evidence.memory` (exact state/parameter byte counts),
:mod:`~flora.evidence.report` (Markdown + JSON + plot with command, versions, seed and
machine), and one module per experiment (:mod:`~flora.evidence.pilot`,
:mod:`~flora.evidence.lm`, :mod:`~flora.evidence.vit`). Only torch is imported here; data
tools, matplotlib, transformers and the peers are imported where an experiment uses them.
"""
