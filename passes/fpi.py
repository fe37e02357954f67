"""Function-preserving initialisation, FPI (bert2BERT, arXiv 2110.07143; Net2WiderNet).

Any target size: new neuron j copies a randomly chosen existing neuron g(j) (the first `old`
neurons map to themselves), so a layer's incoming weights are copied,

    U[:, j] = W[:, g(j)]                         (out-dimension expansion)

and the next layer divides what it reads from each copy by the number of copies,

    U[j, :] = W[g(j), :] / |{j' : g(j') = g(j)}|  (in-dimension expansion),

which keeps sums over the copies unchanged. With unequal copy counts the mean and variance that a
LayerNorm computes over the hidden axis change, so FPI is close to, not exactly, function-preserving;
`validate` measures by how much.
"""

from __future__ import annotations

import numpy as np

from onnxgrow.resize import Plan, WeightRule

from .base import WidthPass


def choose(old: int, new: int, rng: np.random.Generator) -> Plan:
    return Plan(np.concatenate([np.arange(old), rng.integers(0, old, new - old)]))


class FPI(WidthPass):
    name = "fpi"
    exact = False

    def plans(self, spec, sizes: dict, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        return {dim: choose(dim.size, new, rng) for dim, new in sizes.items() if new != dim.size}

    def rule(self, noise: float = 0.0, seed: int = 0) -> WeightRule:
        return WeightRule(divide_by_copies=True, noise=noise, fill="zeros", seed=seed)


rule = FPI().rule  # the weight rule alone, for callers that build their own plans
