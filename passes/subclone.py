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
5. Un-cloning. A model grown by HyperCloning holds every unit (hidden dimension, head, FFN neuron)
   n times, with equal weights on the side that produces it and W/n on the side that sums over it.
   Ranking copies separately keeps the twins of strong units and drops weak ones, and the kept copy
   still carries W/n. So before ranking, the indices of a Dim whose slices are identical in every
   weight with an axis measuring it are grouped (they are copies: their activations are equal); a
   group is ranked as one unit (its mean score), one copy per group is kept first (more only once
   every group has one), and a group of m copies that keeps r of them gives each kept copy the
   factor m / r on every axis that sums over the Dim, since with x_j equal

       sum_{j in group} W[:, j] x_j = m W[:, i] x_i.

   Subcloning a cloned model back to the number of groups gives back the source's weights; on a
   model without copies every group has one member and nothing changes. A tied embedding cannot
   carry m (it is also looked up): the final norm's scale and shift do, as they carry
   HyperCloning's 1/n. Norm statistics and the sqrt rule count groups, not copies (see
   `norm_gain`, `rescale`).
6. Block removal: the paper observes that blocks in the middle of the network change the residual
   stream the least, and removes blocks there. We measure each block's relative update
   ||r_out - r_in|| / ||r_in|| on the calibration data and remove the blocks with the smallest
   update, never the first or the last block.
"""

from __future__ import annotations

import numpy as np

from onnxgrow.dims import factors
from onnxgrow.resize import Plan, WeightRule


def keep_top(scores: np.ndarray, k: int) -> Plan:
    """The k most important indices, in their original order."""
    return Plan(np.sort(np.argsort(-scores, kind="stable")[:k]))


def group_mean(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per index, the mean of `values` over its group (groups[i]: the first index of i's group)."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.bincount(groups, minlength=len(groups))
    sums = np.bincount(groups, weights=values, minlength=len(groups))
    return sums[groups] / counts[groups]


def keep_top_groups(scores: np.ndarray, k: int, groups: np.ndarray) -> tuple[Plan, np.ndarray]:
    """Un-cloning: the k most important indices, one copy of each group first, in original order.

    groups[i] is the first index of i's group of copies (i itself for a unit without copies);
    scores are per index (pass group means). Returns the plan and, per kept index, the factor
    m / r its summed-over slices take (m copies in its group, r of them kept). With no copies this
    is `keep_top` with factors 1.
    """
    firsts, size = np.unique(groups, return_counts=True)  # each group's first index, its size
    order = np.argsort(-scores[firsts], kind="stable")  # groups, best first (ties: lower index)
    by_group = np.argsort(np.searchsorted(firsts, groups), kind="stable")  # members in index order
    members = np.split(by_group, np.cumsum(size)[:-1])
    chosen: list[int] = []
    copy = 0
    while len(chosen) < k:  # round `copy`: the copy-th member of every group that has one
        chosen += [members[g][copy] for g in order if copy < size[g]][:k - len(chosen)]
        copy += 1
    kept = np.sort(np.array(chosen, dtype=np.int64))
    group_of = np.searchsorted(firsts, groups[kept])
    kept_per_group = np.bincount(group_of, minlength=len(firsts))
    return Plan(kept), size[group_of] / kept_per_group[group_of]


def axis_factors(d, per_atom: dict) -> np.ndarray:
    """Per new flat index of an axis measuring `d`, the product of its atoms' factors (1 where an
    atom has none): an outer product over a product Dim, a concatenation over a fused one."""
    r = d.root()
    if r.kind == "prod":
        out = np.ones(1)
        for p in r.parts:
            out = np.multiply.outer(out, axis_factors(p, per_atom)).reshape(-1)
        return out
    if r.kind == "cat":
        return np.concatenate([axis_factors(p, per_atom) for p in r.parts])
    f = per_atom.get(id(r))
    return f if f is not None else np.ones(r.size)


def distinct_count(d, per_atom: dict) -> int:
    """How many distinct units an axis measuring `d` holds, given per atom id how many distinct
    units it holds (atoms not listed count their size)."""
    r = d.root()
    if r.kind == "prod":
        return int(np.prod([distinct_count(p, per_atom) for p in r.parts]))
    if r.kind == "cat":
        return sum(distinct_count(p, per_atom) for p in r.parts)
    return per_atom.get(id(r), r.size)


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


def rescale(contracted: set[int], old: np.ndarray, new: np.ndarray, counts: dict | None = None) -> np.ndarray:
    """W' = W[kept] * sqrt(D / d) along each summed-over axis that shrank from D to d distinct units.

    counts: per axis, (D, d) counted in groups of copies (a cloned model's 2D copies are D units,
    and keeping one of each keeps all D: no rescale); by default the axis sizes."""
    for axis in contracted:
        before, after = counts[axis] if counts else (old.shape[axis], new.shape[axis])
        if after < before:
            new = (new * np.sqrt(before / after)).astype(old.dtype)
    return new


def norm_gain(mean_square: np.ndarray, kept: np.ndarray) -> float:
    """r = sqrt(mean_{kept} E[x^2] / mean_{all} E[x^2]): how much larger the kept part's RMS is.

    The new norm averages over its kept entries once each, the source's over all of them, so the
    plain means are right with copies too; pass statistics averaged over each group of copies, so
    keeping one copy of every group of equal size gives r = 1 up to float64 rounding."""
    return float(np.sqrt(mean_square[kept].mean() / max(mean_square.mean(), 1e-30)))


def blocks_to_remove(updates: list[float], target: int, removable: set[int]) -> list[int]:
    """The (L - target) blocks whose update of the stream is smallest: middle blocks first, then
    the first or last ones when the target asks for that many."""
    count = len(updates) - target
    middle = [i for i in range(1, len(updates) - 1) if i in removable]
    ends = [i for i in (0, len(updates) - 1) if i in removable and i not in middle]
    by_update = sorted(middle, key=lambda i: updates[i]) + sorted(ends, key=lambda i: updates[i])
    return sorted(by_update[:max(count, 0)])
