"""Weight subcloning (Samragh et al., arXiv 2312.09299): initialise a smaller model from a larger one.

1. Neuron importance is the mean magnitude of a neuron's activation over a calibration set,

       score(i) = E_{batch, tokens} |a_i|.

2. The residual connections carry the same embedding dimensions through every block, and the paper
   observes that the same dimensions are important in every layer; so one set of hidden dimensions
   is kept for the whole network, ranked by importance summed over the residual stream of all layers.
   FFN neurons are ranked per layer (on the input of the down projection), heads per layer on the
   input of the output projection (for grouped-query attention a key/value head is kept with its
   whole group of query heads).
3. Kept indices keep their original order, so each kept weight is a sub-matrix of the original.
4. Rescaling, so activations keep their magnitude. A norm over the hidden axis now divides by the
   root mean square of the d kept dimensions instead of all D; the kept dimensions are the large
   ones, so that is larger by

       r = sqrt( mean_{i in kept} E[x_i^2] / mean_{i} E[x_i^2] )      (measured on the calibration data)

   and the norm's scale becomes gamma' = r * gamma[kept] (mode "norm", the default). The paper's
   simpler alternative, mode "sqrt", multiplies every linear map that now sums over d of its D
   inputs by sqrt(D / d), which assumes inputs of comparable magnitude; on MiniLM it hurts
   (docs/BENCHMARKS.md), because the kept inputs are the large ones.
5. Block removal: the paper observes that blocks in the middle of the network change the residual
   stream the least, and removes blocks there. We measure each block's relative update
   ||r_out - r_in|| / ||r_in|| on the calibration data and remove the blocks with the smallest
   update, never the first or the last block.
"""

from __future__ import annotations

import numpy as np

from onnxgrow.dims import factors
from onnxgrow.resize import Plan, WeightRule

EXACT = False


def keep_top(scores: np.ndarray, k: int) -> Plan:
    """The k most important indices, in their original order."""
    return Plan(np.sort(np.argsort(-scores, kind="stable")[:k]))


def head_scores(attn_input: np.ndarray, dim, which) -> np.ndarray:
    """Importance of each index of one factor (kv heads or group) of the attention output axis."""
    sizes = [f.size for f in factors(dim)]
    roots = [f.root() for f in factors(dim)]
    if which.root() not in roots:  # a single (kv) head has no axis of its own to rank
        return np.ones(which.size)
    axis = roots.index(which.root())
    per_factor = attn_input.reshape(sizes)
    other = tuple(a for a in range(len(sizes)) if a != axis)
    return per_factor.sum(axis=other)


def rule() -> WeightRule:
    return WeightRule(divide_by_copies=False, noise=0.0, fill="zeros")


def rescale(contracted: set[int], old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """W' = W[kept] * sqrt(D / d) along each summed-over axis that shrank from D to d."""
    for axis in contracted:
        if new.shape[axis] < old.shape[axis]:
            new = (new * np.sqrt(old.shape[axis] / new.shape[axis])).astype(old.dtype)
    return new


def norm_gain(mean_square: np.ndarray, kept: np.ndarray) -> float:
    """r = sqrt(mean_{kept} E[x^2] / mean_{all} E[x^2]): how much larger the kept part's RMS is."""
    return float(np.sqrt(mean_square[kept].mean() / max(mean_square.mean(), 1e-30)))


def blocks_to_remove(updates: list[float], target: int, removable: set[int]) -> list[int]:
    """The (L - target) blocks whose update of the stream is smallest: middle blocks first, then
    the first or last ones when the target asks for that many."""
    count = len(updates) - target
    middle = [i for i in range(1, len(updates) - 1) if i in removable]
    ends = [i for i in (0, len(updates) - 1) if i in removable and i not in middle]
    by_update = sorted(middle, key=lambda i: updates[i]) + sorted(ends, key=lambda i: updates[i])
    return sorted(by_update[:max(count, 0)])
