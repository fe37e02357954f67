"""Padding (Zhang et al., arXiv 2104.11390; Incr-Pretrain, SIGHAN 2024): the source in the corner.

The source weights fill the top-left block of each grown matrix; new rows and columns are zero,
or small random values N(0, (noise * std(W))^2) with `--noise`. New neurons then start silent (with
zeros) and the old ones keep their weights, but norms now average over more hidden units, so outputs
change; `validate` measures by how much.
"""

from __future__ import annotations

import numpy as np

from onnxgrow.resize import Plan, WeightRule

from .base import WidthPass


class Pad(WidthPass):
    name = "pad"
    exact = False

    def plans(self, spec, sizes: dict, seed: int = 0) -> dict:
        # -1: a new index with no source, filled by the rule
        return {dim: Plan(np.concatenate([np.arange(dim.size), -np.ones(new - dim.size, dtype=np.int64)]))
                for dim, new in sizes.items() if new != dim.size}

    def rule(self, noise: float = 0.0, seed: int = 0) -> WeightRule:
        return WeightRule(divide_by_copies=False, noise=noise, fill="noise" if noise > 0 else "zeros", seed=seed)
