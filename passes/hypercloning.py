"""HyperCloning (Samragh et al., arXiv 2409.12903): widen by an integer factor, exactly.

Every hidden unit, head and FFN neuron is repeated n times (head_dim stays). A linear map then becomes

    both sides grow:   W' = (1/n) [[W ... W] ... [W ... W]]      (n x n blocks)
    only input grows:  W' = (1/n) [W ... W]
    only output grows: W' = [W; ...; W]

so every activation of the wide model is n copies of the small model's activation. LayerNorm and
RMSNorm see a repeated vector, whose mean and variance equal the original's, so norms are exact too;
the 1/sqrt(head_dim) scale and rotary tables are untouched because head_dim is. The 1/n is applied to
the axis a weight sums over, which the dataflow analysis marks, and the shared resize engine applies
the same copy map to every weight, bias, norm and shape constant.

`noise` breaks the symmetry between copies without changing the function: the copies of an input
unit see equal activations, so noise that sums to zero over them cancels exactly.
"""

from __future__ import annotations

import numpy as np

from onnxgrow.errors import OnnxgrowError
from onnxgrow.resize import Plan, WeightRule

from .base import WidthPass


def tile(old: int, new: int) -> Plan:
    if new % old:
        raise OnnxgrowError(f"hypercloning needs integer factors: {old} -> {new} is not one")
    return Plan(np.arange(new) % old)


class HyperCloning(WidthPass):
    name = "hypercloning"
    exact = True
    # The copies start identical; symmetric noise (it cancels: the function is unchanged) lets them learn
    # different things. On the growth benchmark (docs/BENCHMARKS.md, issue #16), drawn for each output
    # copy, s = 0.5 kept 0.96 of the head start at 4H, against 0.71 at s = 0.3 and 0.30 at s = 0.15;
    # s = 0.5 and 0.8 tied on the tuning split, and 0.5 is the smaller change.
    default_noise = 0.5

    def plans(self, spec, sizes: dict, seed: int = 0) -> dict:
        return {dim: tile(dim.size, new) for dim, new in sizes.items() if new != dim.size}

    def rule(self, noise: float = 0.0, seed: int = 0) -> WeightRule:
        return WeightRule(divide_by_copies=True, noise=noise, fill="zeros", seed=seed)
