"""The torch bridge's op registry on tiny hand-built graphs: no model zoo, a few seconds.

Checks that each node gets the implementation of its model's opset (an op whose axes moved from an
attribute to an input runs in both forms), that an op of another domain is refused with its domain,
and that a few ops agree with ONNX Runtime (CPU) on random inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrow import bridge
from onnxgrow.bridge.ops import shapes
from onnxgrow.errors import OnnxgrowError

RNG = np.random.default_rng(12)


def model(nodes, inputs: dict, outputs: list[str], opset: int, initializers: dict | None = None,
          extra_opsets: dict | None = None) -> onnx.ModelProto:
    """A one-graph model: float inputs of the given shapes, outputs of unknown shape."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in (initializers or {}).items()])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    return proto


def run_bridge(proto, feeds: dict) -> list[np.ndarray]:
    out = bridge.to_torch(proto)(**feeds)
    return [v.detach().numpy() for v in out.values()]


def run_ort(proto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# --- the implementation follows the model's opset -------------------------------------------------------


def test_lookup_picks_the_since_version_for_the_opset():
    assert bridge.OPS.lookup("", "Unsqueeze", 11) is shapes.unsqueeze_1
    assert bridge.OPS.lookup("", "Unsqueeze", 13) is shapes.unsqueeze_13
    assert bridge.OPS.lookup("ai.onnx", "Unsqueeze", 18) is shapes.unsqueeze_13
    assert bridge.OPS.lookup("", "Gelu", 18) is None  # a standard op from opset 20 on
    assert bridge.OPS.lookup("", "Gelu", 20) is not None


def test_unsqueeze_axes_attribute_at_opset_11_and_input_at_opset_13():
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    as_attribute = model([helper.make_node("Unsqueeze", ["x"], ["y"], axes=[0, -1])], {"x": [2, 3]}, ["y"], 11)
    as_input = model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], {"x": [2, 3]}, ["y"], 13,
                     {"axes": np.array([0, -1], np.int64)})
    for proto in (as_attribute, as_input):
        (out,) = run_bridge(proto, {"x": x})
        assert out.shape == (1, 2, 3, 1)
        np.testing.assert_array_equal(out, x[None, :, :, None])


def test_opset_13_unsqueeze_ignores_an_axes_attribute():
    """At opset 13 the axes are an input: the opset-11 form is not read there (ORT refuses it too).
    The module is built directly: the structure analysis in to_torch does not expect this graph."""
    proto = model([helper.make_node("Unsqueeze", ["x"], ["y"], axes=[0])], {"x": [2, 3]}, ["y"], 13)
    module = bridge.OnnxModule(ir.from_proto(proto), trainable=set(), ties={})
    with pytest.raises(OnnxgrowError, match="Unsqueeze axes must be a 1-D tensor of integers"):
        module(x=np.zeros((2, 3), np.float32))


# --- ops the bridge does not implement ----------------------------------------------------------------------


def test_unknown_microsoft_op_is_refused_with_its_domain():
    node = helper.make_node("SkipGroupNorm", ["x", "x", "g"], ["y"], domain="com.microsoft")
    proto = model([node], {"x": [1, 2, 4]}, ["y"], 17, {"g": np.ones(4, np.float32)}, {"com.microsoft": 1})
    with pytest.raises(OnnxgrowError, match="no torch implementation for com.microsoft:SkipGroupNorm"):
        bridge.to_torch(proto)


def test_standard_and_contrib_ops_are_refused_together():
    nodes = [helper.make_node("Resize", ["x", "", "s"], ["r"]),
             helper.make_node("GemmFastGelu", ["r"], ["y"], domain="com.microsoft")]
    proto = model(nodes, {"x": [1, 1, 2, 2]}, ["y"], 18, {"s": np.ones(4, np.float32)}, {"com.microsoft": 1})
    with pytest.raises(OnnxgrowError, match=r"does not implement these ops: Resize; "
                                            r"no torch implementation for com.microsoft:GemmFastGelu"):
        bridge.to_torch(proto)


# --- against ONNX Runtime -------------------------------------------------------------------------------------

X = RNG.standard_normal((2, 3, 5)).astype(np.float32)

# (id, nodes, initializers, opset): one runtime input "x" of X's shape
CASES = [
    ("softmax-opset11-2d", [helper.make_node("Softmax", ["x"], ["y"], axis=1)], {}, 11),
    ("logsoftmax-opset13-axis", [helper.make_node("LogSoftmax", ["x"], ["y"], axis=1)], {}, 13),
    ("slice-attributes-opset9", [helper.make_node("Slice", ["x"], ["y"], starts=[1, 0], ends=[3, -1], axes=[2, 0])],
     {}, 9),
    ("clip-attributes-opset6", [helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.25)], {}, 6),
    ("clip-inputs-opset13", [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
     {"lo": np.array(-0.5, np.float32), "hi": np.array(0.25, np.float32)}, 13),
    ("reducemean-axes-attribute-opset13", [helper.make_node("ReduceMean", ["x"], ["y"], axes=[-1], keepdims=1)], {}, 13),
    ("reducemean-axes-input-opset18", [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)],
     {"axes": np.array([0, 2], np.int64)}, 18),
    ("reducesum-axes-input-opset13", [helper.make_node("ReduceSum", ["x", "axes"], ["y"])],
     {"axes": np.array([1], np.int64)}, 13),
    ("split-attribute-opset11", [helper.make_node("Split", ["x"], ["y", "z"], axis=2, split=[2, 3])], {}, 11),
    ("split-input-opset13", [helper.make_node("Split", ["x", "sizes"], ["y", "z"], axis=2)],
     {"sizes": np.array([4, 1], np.int64)}, 13),
    ("squeeze-attribute-opset11", [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[1]),
                                   helper.make_node("Squeeze", ["u"], ["y"], axes=[1])], {}, 11),
    ("layernorm", [helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], epsilon=1e-5)],
     {"w": RNG.standard_normal(5).astype(np.float32), "b": RNG.standard_normal(5).astype(np.float32)}, 17),
    ("matmul-gelu-opset20", [helper.make_node("MatMul", ["x", "w"], ["h"]),
                             helper.make_node("Gelu", ["h"], ["y"], approximate="tanh")],
     {"w": RNG.standard_normal((5, 4)).astype(np.float32)}, 20),
    ("gemm", [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
              helper.make_node("Gemm", ["flat", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)],
     {"shape": np.array([6, 5], np.int64), "w": RNG.standard_normal((4, 5)).astype(np.float32),
      "c": RNG.standard_normal(4).astype(np.float32)}, 13),
]


@pytest.mark.parametrize("nodes, initializers, opset", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_op_matches_onnxruntime(nodes, initializers, opset):
    proto = model(nodes, {"x": list(X.shape)}, list(nodes[-1].output), opset, initializers)
    expected, got = run_ort(proto, {"x": X}), run_bridge(proto, {"x": X})
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
