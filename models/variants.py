"""Dtype variants of a float32 model, as half-precision exports write them.

- `to_half(model, to)`: float16 / bfloat16 everywhere: every float initializer, constant, Cast target
  and graph I/O type becomes the half type. An op whose schema at the model's opset has no such type
  (ConstantOfShape below opset 20, Cos/Sin below opset 22 for bfloat16) computes in float32 between
  Casts, as half-precision exports do.
- `cast_weights(model)`: the graph stays float32; every weight is a float16 initializer read through
  its own Cast(to=FLOAT) node (what mixed-precision exports and weight-compressing converters write).
- `rounded(model, to)`: the float32 model with the variant's weights (rounded through `to`): the
  reference a variant's rewrite is compared with.

Used by tests/test_dtypes.py, tests/test_train.py and bench/gpu_check.py.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HALF = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16, "cast16": TensorProto.FLOAT16}
NUMPY = {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}


def variant(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """name: float16 | bfloat16 | cast16, or ref-float16 / ref-bfloat16 (float32, rounded weights)."""
    if name == "cast16":
        return cast_weights(model)
    if name.startswith("ref-"):
        return rounded(model, HALF[name[4:]])
    return to_half(model, HALF[name])


def half_tensor(t: onnx.TensorProto, to: int) -> onnx.TensorProto:
    """`t` in the half type, saturated: float32's -3.4e38 mask fill would otherwise become -inf."""
    info = ml_dtypes.finfo(NUMPY[to])
    a = np.clip(numpy_helper.to_array(t), float(info.min), float(info.max)).astype(NUMPY[to])
    return numpy_helper.from_array(a, t.name)


def has_type(node: onnx.NodeProto, opset: int, to: int) -> bool:
    name = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}[to]
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    return any(name in c.allowed_type_strs for c in schema.type_constraints)


def to_half(model: onnx.ModelProto, to: int) -> onnx.ModelProto:
    """The model computing in `to` (float16 or bfloat16)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model).graph
    floats = {v.name for v in list(inferred.value_info) + list(g.input) + list(g.output)
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    floats |= {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(half_tensor(t, to))
    nodes, in_f32 = [], {}  # in_f32: value -> its float32 copy
    for n in g.node:
        if has_type(n, opset, to):
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = to
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(half_tensor(a.t, to))
            nodes.append(n)
            continue
        after = []  # no kernel type for `to` at this opset: float32 between Casts
        for k, x in enumerate(n.input):
            if x in floats:
                if x not in in_f32:
                    in_f32[x] = x + "__f32"
                    nodes.append(helper.make_node("Cast", [x], [in_f32[x]], to=TensorProto.FLOAT))
                n.input[k] = in_f32[x]
        for k, y in enumerate(n.output):
            if y in floats:
                n.output[k] = in_f32[y] = y + "__f32"
                after.append(helper.make_node("Cast", [n.output[k]], [y], to=to))
        nodes += [n] + after
    del g.node[:]
    g.node.extend(nodes)
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = to
    del g.value_info[:]
    return m


def is_weight(t: onnx.TensorProto) -> bool:
    return len(t.dims) >= 1 and int(np.prod(t.dims)) > 1


def cast_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """float32 graph, float16 weights: each weight W becomes W.fp16 -> Cast(to=FLOAT) -> W."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    casts = []
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT and is_weight(t):
            name = t.name
            g.initializer[i].CopyFrom(half_tensor(t, TensorProto.FLOAT16))
            g.initializer[i].name = name + ".fp16"
            casts.append(helper.make_node("Cast", [name + ".fp16"], [name], name=name + ".cast",
                                          to=TensorProto.FLOAT))
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return m


def rounded(model: onnx.ModelProto, to: int) -> onnx.ModelProto:
    """The float32 model with the variant's weights (rounded through `to`, saturated)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(half_tensor(t, to)).astype(np.float32)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    return m
