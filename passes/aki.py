"""Advanced knowledge initialisation, AKI (bert2BERT, arXiv 2110.07143).

Like FPI, but a new neuron of layer l takes its incoming weights from layer l+1 instead of from
its own layer (the paper's observation: adjacent layers hold similar, complementary knowledge, and
the copies are no longer identical, which breaks FPI's symmetry):

    U^l[:, j] = W^l[:, g(j)]        for the original neurons (j < old)
    U^l[:, j] = W^{l+1}[:, g(j)]    for the new ones; the top layer keeps FPI

The in-dimension expansion divides by the copy counts as in FPI. Layer l+1's counterpart of a weight
is the initializer at the same place in the next block's subgraph.
"""

from __future__ import annotations

import numpy as np

from onnxgrow.blocks import block_graphs
from onnxgrow.fusednorms import fuse_split_norms
from onnxgrow.resize import set_tensor

from .fpi import FPI


class AKI(FPI):
    """FPI's copy maps and rule, then each new neuron borrows its incoming weights from layer l+1."""
    name = "aki"
    exact = False

    def after(self, spec, resizer) -> None:
        graph = spec.model.graph
        blocks = block_graphs(spec)
        lists = [block_weights(spec, resizer, b) for b in blocks]
        for lower, upper in zip(lists, lists[1:]):
            if len(lower) != len(upper):
                continue  # blocks differ in structure: keep FPI for this pair
            for name, above in zip(lower, upper):
                w, u = graph.initializers[name], graph.initializers[above]
                if w.const_value.shape != u.const_value.shape:
                    continue
                new = borrow_new_neurons(spec, resizer, name, w.const_value.numpy(), u.const_value.numpy())
                if new is not None:
                    set_tensor(w, new)
        fuse_split_norms(graph)  # block_graphs split the Skip norms at block boundaries


def block_weights(spec, resizer, block) -> list[str]:
    """The resized weights a block reads, in node order: the same list, position by position, in
    every block of one export."""
    names = []
    for node in block.nodes:
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.name not in names \
                    and any(resizer.touches(d) for d in spec.flow.dims[v]):
                names.append(v.name)
    return names


def borrow_new_neurons(spec, resizer, name, mine: np.ndarray, upper: np.ndarray):
    """Replace the slices of new (non-first) copies along each output axis with the upper layer's."""
    dims = spec.flow.dims[graph_value(spec, name)]
    contracted = spec.flow.contracted.get(name, set())
    result, changed = mine.copy(), False
    for axis, d in enumerate(dims):
        if axis in contracted or not resizer.touches(d):
            continue
        m = resizer.index_map(d)
        first = np.zeros(len(m), dtype=bool)
        _, first_idx = np.unique(m, return_index=True)
        first[first_idx] = True
        new_slots = np.nonzero(~first & (m >= 0))[0]
        if len(new_slots):
            index = [slice(None)] * result.ndim
            index[axis] = new_slots
            result[tuple(index)] = upper[tuple(index)]
            changed = True
    return result if changed else None


def graph_value(spec, name):
    return spec.model.graph.initializers[name]
