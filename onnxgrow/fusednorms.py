"""ONNX Runtime's Skip norms at block boundaries: split for a block edit, fused again after it.

A SkipLayerNormalization (or SkipSimplifiedLayerNormalization) adds the residual update to the
stream and normalizes the sum in one node: output 3 is the stream, output 0 its norm. In a pre-norm
model the node at the end of block i is also the first norm of block i + 1, so no value separates the
two blocks. `split_skip_norms` rewrites such a node as Add (+ Add of the bias) and a plain norm, which
computes the same; block edits then work on the plain form, and `fuse_split_norms` puts every split
node (and every copy of one) back into its fused op, so the output keeps the source's form.

The split nodes carry a metadata mark (copied with a block's nodes); nothing else is fused back.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from .errors import UnsupportedGraph
from .normalize import unique_name
from .registry import MICROSOFT

log = logging.getLogger(__name__)

SKIP_NORMS = {"SkipLayerNormalization": "LayerNormalization",
              "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization"}
MARK = "onnxgrow.split_from"  # metadata on the nodes a split makes: the fused op, or its part
SKIP_EPSILON = 1e-12  # ONNX Runtime's default for the Skip norms


def is_skip_norm(node: ir.Node | None) -> bool:
    return node is not None and node.domain == MICROSOFT and node.op_type in SKIP_NORMS


def split_skip_norms(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Rewrite each Skip norm in `nodes` as input + skip (+ bias) and a plain norm of the sum."""
    for node in nodes:
        split_one(graph, node)
    graph.sort()


def split_one(graph: ir.Graph, node: ir.Node) -> None:
    x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    beta = None if simplified else optional(node, 3)
    bias = optional(node, 3 if simplified else 4)
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:3]):
        raise UnsupportedGraph("the mean or inverse deviation of a Skip norm is read", node)
    eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else SKIP_EPSILON
    parts = [mark(ir.Node("", "Add", [x, skip], name=unique_name(graph, f"{node.name}.sum")), "sum")]
    if bias is not None:
        parts.append(mark(ir.Node("", "Add", [parts[-1].outputs[0], bias],
                                  name=unique_name(graph, f"{node.name}.bias")), "bias"))
    total = parts[-1].outputs[0]
    norm_inputs = [total, gamma] + ([] if simplified or beta is None else [beta])
    norm = ir.Node("", SKIP_NORMS[node.op_type], norm_inputs,
                   [ir.AttrFloat32("epsilon", eps), ir.AttrInt64("axis", -1)], name=unique_name(graph, node.name))
    parts.append(mark(norm, node.op_type))
    for part in parts:
        part.outputs[0].name = unique_name(graph, f"{node.name}.{part.metadata_props[MARK]}")
    graph.insert_before(node, parts)
    move_uses(node.outputs[0], norm.outputs[0])
    if len(node.outputs) > 3:
        move_uses(node.outputs[3], total)
    graph.remove(node, safe=True)
    log.debug("split %s %r at a block boundary", node.op_type, node.name)


def mark_plain_norms(nodes: list[ir.Node | None], fused_op: str) -> None:
    """Mark plain norms of the kind `fused_op` fuses, so that their copies that read a split sum fuse."""
    for node in nodes:
        if node is not None and node.op_type == SKIP_NORMS[fused_op] and \
                (node.attributes["axis"].value if "axis" in node.attributes else -1) == -1:
            node.metadata_props[MARK] = fused_op


def fuse_split_norms(graph: ir.Graph) -> int:
    """Fuse every marked norm whose input is still a marked sum; returns how many were fused."""
    fused = 0
    for norm in [n for n in graph if n.metadata_props.get(MARK) in SKIP_NORMS]:
        op = norm.metadata_props.pop(MARK)  # fused or left as it is: done either way
        chain = sum_chain(norm.inputs[0])
        if chain is None:
            continue  # its block before was removed: a plain norm of the stream, which runs as it is
        fuse_one(graph, norm, op, *chain)
        fused += 1
    if fused:
        graph.sort()
    return fused


def sum_chain(value: ir.Value):
    """(sum node, bias node or None) of a marked input + skip (+ bias), else None."""
    node = value.producer()
    if node is None:
        return None
    if node.metadata_props.get(MARK) == "bias":
        first = node.inputs[0].producer()
        if first is None or first.metadata_props.get(MARK) != "sum" or len(node.inputs[0].uses()) != 1:
            return None
        return first, node
    return (node, None) if node.metadata_props.get(MARK) == "sum" else None


def fuse_one(graph: ir.Graph, norm: ir.Node, op: str, total: ir.Node, bias_add: ir.Node | None) -> None:
    bias = bias_add.inputs[1] if bias_add is not None else None
    beta = norm.inputs[2] if len(norm.inputs) > 2 else None
    params = [norm.inputs[1]] + ([bias] if op == "SkipSimplifiedLayerNormalization" else [beta, bias])
    while params and params[-1] is None:
        params.pop()
    stream = (bias_add or total).outputs[0]
    fused = ir.Node(MICROSOFT, op, [total.inputs[0], total.inputs[1], *params],
                    [ir.AttrFloat32("epsilon", epsilon_of(norm))], num_outputs=4,
                    name=unique_name(graph, norm.name))
    for i, suffix in enumerate(("out", "mean", "inv_std_var", "sum")):
        fused.outputs[i].name = unique_name(graph, f"{fused.name}.{suffix}")
    graph.insert_before(norm, fused)
    move_uses(norm.outputs[0], fused.outputs[0])
    readers = [u for u in stream.uses() if u.node is not norm]
    move_uses(stream, fused.outputs[3], readers)
    for node in (norm, bias_add, total):
        if node is not None:
            graph.remove(node, safe=True)


def epsilon_of(norm: ir.Node) -> float:
    return norm.attributes["epsilon"].value if "epsilon" in norm.attributes else 1e-5  # the plain norms' default


def move_uses(old: ir.Value, new: ir.Value, uses=None) -> None:
    for use in list(old.uses() if uses is None else uses):
        use.node.replace_input_with(use.idx, new)
    graph = old.graph
    if old.is_graph_output() and graph is not None:
        k = list(graph.outputs).index(old)
        name = old.name
        old.name = unique_name(graph, name + ".split")
        new.name, new.type, new.shape = name, old.type, old.shape
        graph.outputs[k] = new


def optional(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def mark(node: ir.Node, what: str) -> ir.Node:
    node.metadata_props[MARK] = what
    return node
