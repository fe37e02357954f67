"""Quantized weights: found before any analysis, and refused, or turned into float (`--dequantize`).

onnxgrow grows float models: a grown model is meant to be trained, and it can be quantized again
afterwards (onnxruntime-genai's builder, ONNX Runtime's quantizer). The forms it turns into float:

    MatMulNBits (com.microsoft)   Y = A · W (+ bias),  W[k, n] = (q[n, k] - z[n, b]) · s[n, b],  b = k // block
    GatherBlockQuantized          Y = T[ids],          T = its block-quantized table, dequantized
    MatMulInteger after           Y = Cast(MatMulInteger(Q(x), W_q, z_x, z_W)) · (s_x · s_W)
      DynamicQuantizeLinear         = x · W  with W = (W_q - z_W) · s_W, up to x's rounding
    DequantizeLinear of a weight  W = (W_q - z) · s     (QDQ; the activation pairs Q -> DQ are dropped)

The two com.microsoft ops are dequantized by ONNX Runtime itself (MatMulNBits applied to an identity
matrix, GatherBlockQuantized to every row), so their packing and zero-point rules are the runtime's
own; the ONNX ones in numpy. What dequantizing changes is measured against the quantized source by
whoever verifies (see `onnxgrow.cli.write_checked`).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import OnnxgrowError, describe_node
from .normalize import unique_name

log = logging.getLogger(__name__)

MICROSOFT = "com.microsoft"
QUANTIZED_OPS = {(MICROSOFT, "MatMulNBits"), (MICROSOFT, "GatherBlockQuantized"), ("", "MatMulInteger")}


def quantized_nodes(model: ir.Model) -> list[ir.Node]:
    """The nodes that read quantized weights: the ops above, and DequantizeLinear of an initializer."""
    found = []
    for node in model.graph:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (domain, node.op_type) in QUANTIZED_OPS:
            found.append(node)
        elif node.op_type == "DequantizeLinear" and domain == "" and (
                node.inputs[0].is_initializer() or gathered_table(node) is not None):
            found.append(node)
    return found


def refuse_quantized(model: ir.Model) -> None:
    """A one-line refusal naming the first quantized op, before anything is analysed."""
    nodes = quantized_nodes(model)
    if not nodes:
        return
    counts = Counter(n.op_type for n in nodes)
    what = ", ".join(f"{op} x{n}" for op, n in counts.items())
    raise OnnxgrowError(f"quantized weights ({what}; first at {describe_node(nodes[0])}): onnxgrow grows float "
                        "models; pass --dequantize to turn them into float first (and quantize the grown model "
                        "again afterwards)")


def dequantize(model: ir.Model) -> Counter:
    """Turn every quantized weight of `model` into float, in place. Returns {op: how many} rewritten."""
    done: Counter = Counter()
    for node in list(model.graph):
        rewrite = REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx", MICROSOFT) else None
        if rewrite is not None and node.graph is model.graph and rewrite(model, node):
            done[node.op_type] += 1
    drop_activation_qdq(model.graph, done)
    left = quantized_nodes(model)
    if left:
        raise OnnxgrowError(f"cannot dequantize {describe_node(left[0])}: a form onnxgrow does not read")
    log.info("dequantized: %s", dict(done))
    return done


# --- the ONNX Runtime ops: let the runtime compute the float weights ----------------------------------------


def matmul_nbits(model: ir.Model, node: ir.Node) -> bool:
    """MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?) -> MatMul(A, W) (+ bias)."""
    attrs = {a.name: a.value for a in node.attributes.values()}
    k, n = attrs["K"], attrs["N"]
    weights = run_alone(model, node, {node.inputs[0].name: np.eye(k, dtype=float_type(model, node))},
                        bias_free=True)
    w = weights.reshape(k, n)
    g = model.graph
    w_value = new_initializer(g, f"{node.inputs[1].name}.dequantized", w)
    matmul = ir.Node("", "MatMul", [node.inputs[0], w_value], name=unique_name(g, f"{node.name}.dequantized"))
    out = matmul.outputs[0]
    bias = node.inputs[5] if len(node.inputs) > 5 else None
    nodes = [matmul]
    if bias is not None:
        add = ir.Node("", "Add", [out, bias], name=unique_name(g, f"{node.name}.bias"))
        nodes.append(add)
        out = add.outputs[0]
    replace_node(g, node, nodes, out)
    return True


def gather_block_quantized(model: ir.Model, node: ir.Node) -> bool:
    """GatherBlockQuantized(data, indices, scales, zero_points?) -> Gather(T, indices)."""
    gather_axis = next((a.value for a in node.attributes.values() if a.name == "gather_axis"), 0)
    data = node.inputs[0].const_value
    rows = data.shape[gather_axis]
    ids_type = node.inputs[1].dtype.numpy() if node.inputs[1].dtype is not None else np.int64
    table = run_alone(model, node, {node.inputs[1].name: np.arange(rows).astype(ids_type)})
    g = model.graph
    t_value = new_initializer(g, f"{node.inputs[0].name}.dequantized", table)
    gather = ir.Node("", "Gather", [t_value, node.inputs[1]], attributes=[ir.AttrInt64("axis", gather_axis)],
                     name=unique_name(g, f"{node.name}.dequantized"))
    replace_node(g, node, [gather], gather.outputs[0])
    return True


def run_alone(model: ir.Model, node: ir.Node, feeds: dict[str, np.ndarray], bias_free=False) -> np.ndarray:
    """Run `node` by itself in ONNX Runtime with its constant inputs and `feeds` for the others."""
    from .runtime import run_model
    inputs, graph_inputs, inits = [], [], []
    for i, v in enumerate(node.inputs):
        if v is None or (bias_free and node.op_type == "MatMulNBits" and i == 5):
            inputs.append(None)
        elif v.name in feeds:
            array = feeds[v.name]
            value = ir.Value(name=v.name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
            graph_inputs.append(value)
            inputs.append(value)
        elif v.const_value is not None:
            value = ir.Value(name=v.name, shape=ir.Shape(v.const_value.shape), type=ir.TensorType(v.const_value.dtype),
                             const_value=ir.tensor(v.const_value.numpy(), name=v.name))  # in memory: not the source's data file
            inits.append(value)
            inputs.append(value)
        else:
            raise OnnxgrowError(f"cannot dequantize {describe_node(node)}: input {v.name!r} is computed in the graph")
    while inputs and inputs[-1] is None:
        inputs.pop()
    alone = ir.Node(node.domain, node.op_type, inputs, [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                    name="alone")
    alone.outputs[0].name = "y"
    alone.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(np.dtype(float_type(model, node))))
    graph = ir.Graph(graph_inputs, [alone.outputs[0]], nodes=[alone], initializers=inits,
                     opset_imports=dict(model.graph.opset_imports))
    with tempfile.TemporaryDirectory(prefix="onnxgrow-dequantize-") as tmp:
        path = Path(tmp) / "alone.onnx"
        ir.save(ir.Model(graph, ir_version=model.ir_version), path)
        return run_model(path, feeds, "cpu")["y"]


# --- the ONNX forms, in numpy ---------------------------------------------------------------------------------


def matmul_integer(model: ir.Model, node: ir.Node) -> bool:
    """DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, z_x, z_W) -> Cast -> Mul(s_x * s_W) => x · W."""
    quantize = node.inputs[0].producer()
    w_q, z_w = node.inputs[1], node.inputs[3] if len(node.inputs) > 3 else None
    cast = only_consumer(node.outputs[0], "Cast")
    mul = only_consumer(cast.outputs[0], "Mul") if cast is not None else None
    if quantize is None or quantize.op_type != "DynamicQuantizeLinear" or mul is None or not w_q.is_initializer():
        raise OnnxgrowError(f"cannot dequantize {describe_node(node)}: not the dynamic-quantization pattern "
                            "(DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul)")
    scales = next(v for v in mul.inputs if v is not cast.outputs[0]).producer()
    w_scale = next((v for v in scales.inputs if v.is_initializer()), None) if scales is not None else None
    if w_scale is None:
        raise OnnxgrowError(f"cannot dequantize {describe_node(node)}: the weight's scale is not a constant")
    zero = z_w.const_value.numpy().astype(np.float64) if z_w is not None else 0.0
    w = (w_q.const_value.numpy().astype(np.float64) - zero) * w_scale.const_value.numpy().astype(np.float64)
    g = model.graph
    w_value = new_initializer(g, f"{w_q.name}.dequantized", w.astype(np.float32))
    matmul = ir.Node("", "MatMul", [quantize.inputs[0], w_value], name=unique_name(g, f"{node.name}.dequantized"))
    replace_node(g, mul, [matmul], matmul.outputs[0])
    return True


def gathered_table(node: ir.Node) -> ir.Node | None:
    """The Gather of an integer table whose rows this DequantizeLinear turns into float (ORT's dynamic
    quantizer writes embeddings this way), else None."""
    gather = node.inputs[0].producer()
    if gather is None or gather.op_type != "Gather" or not gather.inputs[0].is_initializer():
        return None
    return gather if not gather.inputs[0].const_value.dtype.is_floating_point() else None


def dequantize_linear(model: ir.Model, node: ir.Node) -> bool:
    """DequantizeLinear of a weight: the float weight, (W_q - z) · s along `axis`, as an initializer.
    Of rows gathered from an integer table: the table in float, and the Gather reads that."""
    if any(v is not None and v.const_value is None for v in node.inputs[1:]):
        return False  # scales computed at run time: an activation's pair (drop_activation_qdq)
    gather = gathered_table(node)
    if gather is not None:
        if node.inputs[1].const_value.size != 1:
            raise OnnxgrowError(f"cannot dequantize {describe_node(node)}: gathered rows with scales per axis")
        table = node_weights(node, gather.inputs[0].const_value.numpy())
        value = new_initializer(model.graph, f"{gather.inputs[0].name}.dequantized", table)
        gather.replace_input_with(0, value)
        gather.outputs[0].type, gather.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
        node.outputs[0].replace_all_uses_with(gather.outputs[0], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        return True
    if not node.inputs[0].is_initializer():
        return False  # an activation's pair: drop_activation_qdq
    w = node_weights(node, node.inputs[0].const_value.numpy())
    g = model.graph
    value = new_initializer(g, f"{node.inputs[0].name}.dequantized", w)
    node.outputs[0].replace_all_uses_with(value)
    g.remove(node, safe=True)
    return True


def node_weights(node: ir.Node, quantized: np.ndarray) -> np.ndarray:
    """(q - z) · s as DequantizeLinear `node` computes it, per tensor or along its axis."""
    q = quantized.astype(np.float64)
    scale = node.inputs[1].const_value.numpy().astype(np.float64)
    zero = node.inputs[2].const_value.numpy().astype(np.float64) if len(node.inputs) > 2 and node.inputs[2] else 0.0
    attrs = {a.name: a.value for a in node.attributes.values()}
    if attrs.get("block_size"):
        raise OnnxgrowError(f"cannot dequantize {describe_node(node)}: blocked DequantizeLinear")
    if np.ndim(scale) == 1 and q.ndim > 1:
        axis = attrs.get("axis", 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
    return ((q - zero) * scale).astype(scale_type(node))


def drop_activation_qdq(graph: ir.Graph, done: Counter) -> None:
    """QuantizeLinear -> DequantizeLinear on an activation: the float activation goes on as it is."""
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.inputs[0].is_initializer():
            continue
        quantize = node.inputs[0].producer()
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        out, value = node.outputs[0], quantize.inputs[0]
        if out.is_graph_output():  # the float value becomes the output, under the output's name
            if value.is_graph_output() or value.is_graph_input():
                continue
            name = out.name
            out.name = unique_name(graph, f"{name}.quantized")
            value.name = name
            value.type = value.type or out.type
            value.shape = value.shape or out.shape
        out.replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if not quantize.outputs[0].uses():
            graph.remove(quantize, safe=True)
        done["QuantizeLinear/DequantizeLinear"] += 1


REWRITES = {"MatMulNBits": matmul_nbits, "GatherBlockQuantized": gather_block_quantized,
            "MatMulInteger": matmul_integer, "DequantizeLinear": dequantize_linear}


# --- small helpers ----------------------------------------------------------------------------------------------


def float_type(model: ir.Model, node: ir.Node):
    """The float type the node computes in: that of its scales (input 2 of both contrib ops, 1 of DQ)."""
    scales = node.inputs[2] if node.op_type in ("MatMulNBits", "GatherBlockQuantized") else node.inputs[1]
    return scales.const_value.numpy().dtype if scales is not None and scales.const_value is not None else np.float32


def scale_type(node: ir.Node):
    return node.inputs[1].const_value.numpy().dtype


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=unique_name(graph, name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    users = list(value.consumers())
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def replace_node(graph: ir.Graph, old: ir.Node, new: list[ir.Node], out: ir.Value) -> None:
    """Put `new` where `old` was; `out` takes over `old`'s output (its name too, if a graph output).
    Nodes that only fed `old` and are left unused (a DynamicQuantizeLinear, scale products) go too."""
    graph.insert_after(old, new)
    old_out = old.outputs[0]
    for node in new:  # the float op computes what the quantized one did: same type and shape
        node.outputs[0].type, node.outputs[0].shape = old_out.type, old_out.shape
    if old_out.is_graph_output():
        name = old_out.name
        old_out.name = unique_name(graph, f"{name}.quantized")
        out.name = name
    old_out.replace_all_uses_with(out, replace_graph_outputs=True)
    remove_unused_from(graph, old)


def remove_unused_from(graph: ir.Graph, node: ir.Node) -> None:
    todo = [node]
    while todo:
        n = todo.pop()
        if n.graph is not graph or any(o.uses() or o.is_graph_output() for o in n.outputs):
            continue
        producers = [v.producer() for v in n.inputs if v is not None and v.producer() is not None]
        unused = [v for v in n.inputs if v is not None and v.is_initializer()]
        graph.remove(n, safe=True)
        for v in unused:
            if not v.uses() and v.name in graph.initializers:
                graph.initializers.pop(v.name)
        todo.extend(producers)
