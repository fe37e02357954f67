"""Put a graph in the form the analysis expects, without changing what it computes.

- Constant nodes become initializers, so every literal has a name the rewrite can replace.
- Parameters the exporter deduplicated through Identity nodes get their own initializers again.
- So do parameters an optimizer merged by value (the dynamo exporter reads one all-ones tensor in
  every LayerNorm of a fresh model): one copy per structural role, while a truly tied table (the
  token embedding read by its Gather and by the LM head) stays one tensor.
- Each use of a small integer constant gets its own copy: exporters share one `[2]` between a
  kv-head count, a group size and an Unsqueeze axis, and those must be free to change separately.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from .shapeflow import SMALL_INT_TENSOR

log = logging.getLogger(__name__)

INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


def lift_constants(graph: ir.Graph) -> None:
    for node in list(graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        name = next(iter(node.attributes))
        a = node.attributes[name].value
        if name == "value":
            tensor = a
        elif name in ("value_int", "value_float"):
            tensor = ir.tensor(np.array(a, dtype=np.int64 if name == "value_int" else np.float32))
        elif name in ("value_ints", "value_floats"):
            tensor = ir.tensor(np.array(list(a), dtype=np.int64 if name == "value_ints" else np.float32))
        else:
            continue  # sparse or string constants stay as they are
        value = ir.Value(name=unique_name(graph, out.name or "const"), shape=ir.Shape(tensor.shape),
                         type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        if out.is_graph_output():
            continue  # keep the node: a graph output must be produced by a node
        graph.remove(node, safe=True)


def unique_name(graph: ir.Graph, base: str) -> str:
    taken = graph.meta.setdefault("onnxgrow_names", None)
    if taken is None:
        taken = {v.name for n in graph for v in n.outputs} | set(graph.initializers) | {
            v.name for v in graph.inputs}
        graph.meta["onnxgrow_names"] = taken
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}__{i}"
    taken.add(name)
    return name


def unshare_small_ints(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        t = value.const_value
        if t.dtype not in INT_TYPES or t.size > SMALL_INT_TENSOR or value.is_graph_input():
            continue
        uses = list(value.uses())
        for node, index in uses[1:]:
            copy = ir.Value(name=unique_name(graph, name), shape=ir.Shape(t.shape),
                            type=ir.TensorType(t.dtype), const_value=ir.tensor(t.numpy().copy()))
            graph.register_initializer(copy)
            node.replace_input_with(index, copy)


def inline_identity_params(graph: ir.Graph) -> None:
    """The TorchScript exporter deduplicates equal parameters (every LayerNorm weight of a fresh model
    is ones) by feeding copies through Identity nodes. They are separate parameters that happen to
    be equal: give each its own initializer so a rewrite of one does not change the others."""
    for node in list(graph):
        if node.op_type != "Identity" or not node.inputs[0].is_initializer():
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        source = node.inputs[0]
        own = ir.Value(name=unique_name(graph, out.name or source.name), shape=source.shape,
                       type=source.type, const_value=source.const_value)
        graph.register_initializer(own)
        # where the weight lives in the graph as exported (export/import-weights map roles back)
        graph.meta.setdefault("onnxgrow_aliases", {})[own.name] = source.name
        out.replace_all_uses_with(own)
        graph.remove(node, safe=True)


# Ops through which a weight reaches a projection unchanged (a tied head reads Transpose(table)).
WEIGHT_VIEWS = frozenset({"Transpose", "Cast", "CastLike", "Identity"})


def tied_table_use(node: ir.Node, index: int) -> bool:
    """Whether this use reads a 2-D table as an embedding lookup or a projection weight: the uses
    by which a tied embedding and LM head share one tensor (directly or through a Transpose)."""
    while node.op_type in WEIGHT_VIEWS:
        uses = list(node.outputs[0].uses())
        if len(uses) != 1:
            return False
        node, index = uses[0]
    if node.op_type == "Gather":
        return index == 0
    return node.op_type in ("MatMul", "Gemm")


def unshare_params(graph: ir.Graph) -> None:
    """Give every node that reads a float parameter directly its own copy, unless the uses are
    lookups and projections of one 2-D table (a tied embedding: one parameter in two roles that
    must stay equal). A merged tensor is a coincidence of values, not a tie: a rewrite that scales
    the final norm for a tied head must not scale every other norm with it."""
    for name, value in list(graph.initializers.items()):
        t = value.const_value
        if t is None or not t.dtype.is_floating_point() or t.size <= 1 or value.is_graph_input():
            continue
        users = list(dict.fromkeys(node for node, _ in value.uses()))  # a node reading it twice: one role
        if len(users) < 2:
            continue
        if len(t.shape) == 2 and all(tied_table_use(node, i) for node, i in value.uses()):
            continue
        log.debug("parameter %r is read by %d nodes in different roles: one copy each", name, len(users))
        for node in users[1:]:
            own = ir.Value(name=unique_name(graph, name), shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype),
                           const_value=ir.tensor(t.numpy().copy()))
            graph.register_initializer(own)
            # the weight as exported is the shared tensor: export/import-weights map roles back to it
            graph.meta.setdefault("onnxgrow_aliases", {})[own.name] = name
            for i, v in enumerate(node.inputs):
                if v is value:
                    node.replace_input_with(i, own)


# Ops that pass on or pick from a shape vector; folded when their inputs are weights' shapes
SHAPE_PICKS = frozenset({"Gather", "ReduceProd", "Concat", "Squeeze", "Unsqueeze", "Cast", "Slice"})


def fold_weight_shapes(graph: ir.Graph) -> None:
    """Keras' MultiHeadAttention (through tf2onnx) reshapes its kernels [hidden, heads, head_dim] at
    run time, to targets computed from Shape nodes of the kernels themselves. A weight's shape is a
    constant: such a chain (Shape of an initializer, picks from it, the Reshape of a weight by it) is
    folded into initializers, so the reshaped kernel is a weight like any other and the picked sizes
    are literals the analysis gives a meaning (and a resize rewrites)."""
    from onnx.reference import ReferenceEvaluator
    folded: set[str] = set()
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or not node.inputs or len(node.outputs) != 1:
            continue
        inputs = [v for v in node.inputs if v is not None]
        if not all(v.is_initializer() for v in inputs):
            continue
        is_weight_shape = node.op_type == "Shape"
        picks = node.op_type in SHAPE_PICKS and any(v.name in folded for v in inputs)
        reshaped = node.op_type == "Reshape" and inputs[1].name in folded
        if not (is_weight_shape or picks or reshaped):
            continue
        proto = ir.serde.serialize_node(node)
        arrays = {v.name: v.const_value.numpy() for v in inputs}
        result = ReferenceEvaluator(onnx_node_model(proto, arrays)).run(None, arrays)[0]
        out = node.outputs[0]
        value = ir.Value(name=unique_name(graph, out.name or "folded"), shape=ir.Shape(result.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(result.dtype)), const_value=ir.tensor(result))
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        folded.add(value.name)
        if reshaped:  # the weight as exported is the kernel: export/import-weights keep its layout
            graph.meta.setdefault("onnxgrow_aliases", {})[value.name] = inputs[0].name
            graph.meta.setdefault("onnxgrow_relaid", set()).add(inputs[0].name)
        graph.remove(node, safe=True)
        for v in inputs:  # a kernel read only for its shape is no weight of the model
            if not v.uses() and not v.is_graph_input() and not v.is_graph_output():
                graph.initializers.pop(v.name, None)


def onnx_node_model(node_proto, arrays: dict):
    import onnx
    from onnx import helper
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for k, a in arrays.items()]
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node_proto.output]
    return helper.make_model(helper.make_graph([node_proto], "fold", inputs, outputs))


def normalize(model: ir.Model) -> ir.Model:
    lift_constants(model.graph)
    fold_weight_shapes(model.graph)
    inline_identity_params(model.graph)
    unshare_params(model.graph)
    unshare_small_ints(model.graph)
    return model
