"""ONNX Runtime's fused norms and activations: the torch bridge agrees with ONNX Runtime (CPU) within
1e-4 on one-node graphs, and the dataflow rules tie each parameter vector to the axis it scales."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrow import bridge
from onnxgrow.shapeflow import analyse

RNG = np.random.default_rng(3)
B, S, H, V = 2, 5, 8, 11
MS = "com.microsoft"


def vec(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# op, domain, float inputs {name: shape} (fed), initializers, int inputs, attributes, outputs
CASES = {
    "SkipLayerNormalization": (MS, ["x", "skip", "gamma", "beta", "bias"], {"gamma": vec(H), "beta": vec(H), "bias": vec(H)},
                               {"epsilon": 1e-5}, 4),
    "SkipSimplifiedLayerNormalization": (MS, ["x", "skip", "gamma", "bias"], {"gamma": vec(H), "bias": vec(H)},
                                         {"epsilon": 1e-6}, 4),
    "SimplifiedLayerNormalization": ("", ["x", "gamma"], {"gamma": vec(H)}, {"epsilon": 1e-6, "axis": -1}, 1),
    "FastGelu": (MS, ["x", "bias"], {"bias": vec(H)}, {}, 1),
    "BiasGelu": (MS, ["x", "bias"], {"bias": vec(H)}, {}, 1),
    "Gelu": (MS, ["x"], {}, {}, 1),
    "QuickGelu": (MS, ["x"], {}, {"alpha": 1.5}, 1),
}
BIAS_ADD = (MS, ["x", "bias", "skip"], {"bias": vec(H)}, {}, 1)  # ONNX Runtime runs it on CUDA only


def one_node(op, domain, inputs, inits, attrs, nout, int_inputs=()):
    outs = [f"y{i}" for i in range(nout)]
    feeds = [n for n in inputs if n and n not in inits and n not in int_inputs]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, outs, domain=domain, **attrs)], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S, H]) for n in feeds]
        + [helper.make_tensor_value_info(n, TensorProto.INT32, [B, S]) for n in int_inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT if o != "y1" or op != "EmbedLayerNormalization"
                                       else TensorProto.INT32, None) for o in outs],
        [numpy_helper.from_array(v, n) for n, v in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    return proto


def compare(proto, feeds):
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = [v.detach().numpy() for v in bridge.to_torch(proto)(**feeds).values()]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.reshape(g.shape) if w.size == g.size else w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", list(CASES))
def test_bridge_matches_onnx_runtime(op):
    domain, inputs, inits, attrs, nout = CASES[op]
    proto = one_node(op, domain, inputs, inits, attrs, nout)
    feeds = {n: vec(B, S, H) for n in inputs if n not in inits}
    compare(proto, feeds)


def test_embed_layer_norm_matches_onnx_runtime():
    inits = {"word": vec(V, H), "pos": vec(16, H), "seg": vec(2, H), "gamma": vec(H), "beta": vec(H)}
    proto = one_node("EmbedLayerNormalization", MS, ["ids", "segs", "word", "pos", "seg", "gamma", "beta", "mask"],
                     inits, {"epsilon": 1e-12}, 3, int_inputs=("ids", "segs", "mask"))
    mask = np.ones((B, S), np.int32)
    mask[1, 3:] = 0
    feeds = {"ids": RNG.integers(0, V, (B, S)).astype(np.int32), "segs": RNG.integers(0, 2, (B, S)).astype(np.int32),
             "mask": mask}
    compare(proto, feeds)


def test_bias_add_is_x_plus_bias_plus_skip():
    proto = one_node("BiasAdd", *BIAS_ADD)
    x, skip = vec(B, S, H), vec(B, S, H)
    got = bridge.to_torch(proto)(x=x, skip=skip)["y0"].detach().numpy()
    np.testing.assert_allclose(got, x + BIAS_ADD[2]["bias"] + skip, atol=1e-6)


@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu", "BiasAdd"])
def test_rules_tie_each_parameter_to_the_hidden_axis(op):
    domain, inputs, inits, attrs, nout = BIAS_ADD if op == "BiasAdd" else CASES[op]
    model = ir.serde.deserialize_model(one_node(op, domain, inputs, inits, attrs, nout))
    flow = analyse(model)
    x = flow.dims[model.graph.inputs[0]]
    for name in inits:
        assert flow.dims[model.graph.initializers[name]][-1].root() is x[-1].root(), name
    outs = [flow.dims[o] for o in model.graph.node(0).outputs]
    assert [d.root() for d in outs[0]] == [d.root() for d in x]
    if nout == 4:  # the residual sum has the input's axes; mean and inverse std end in 1
        assert [d.root() for d in outs[3]] == [d.root() for d in x] and outs[1][-1].size == 1


def test_embed_rule_gives_batch_seq_hidden():
    inits = {"word": vec(V, H), "pos": vec(16, H), "gamma": vec(H), "beta": vec(H)}
    model = ir.serde.deserialize_model(one_node("EmbedLayerNormalization", MS, ["ids", "", "word", "pos", "", "gamma", "beta"],
                                                inits, {}, 2, int_inputs=("ids",)))
    flow = analyse(model)
    ids, word = flow.dims[model.graph.inputs[0]], flow.dims[model.graph.initializers["word"]]
    out = flow.dims[model.graph.node(0).outputs[0]]
    assert [d.root() for d in out] == [ids[0].root(), ids[1].root(), word[1].root()]
    assert flow.dims[model.graph.initializers["gamma"]][0].root() is word[1].root()
