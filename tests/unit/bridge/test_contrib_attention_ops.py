"""ONNX Runtime's com.microsoft Attention and MultiHeadAttention: the torch bridge agrees with ONNX Runtime
(CPU) within 1e-4 on one-node graphs (key masks in each form, unidirectional or not, with and without a
past, batch 2), and the dataflow rule reads Attention's packed past [2, b, heads, past, head]."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrow import bridge
from onnxgrow.dims import same
from onnxgrow.errors import OnnxgrowError
from onnxgrow.shapeflow import analyse

MS = "com.microsoft"
B, S, P, N, HEAD = 2, 4, 3, 2, 8  # batch, new tokens, past tokens, heads, head size
HIDDEN = N * HEAD
RNG = np.random.default_rng(5)


def normal(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def masks(total: int) -> dict:
    """Each key-mask form, over `total` keys, with some keys of row 1 masked."""
    raw = np.ones((B, total), np.int32)
    raw[1, total - 2:] = 0
    raw[0, 0] = 0
    return {"none": None,
            "ends": np.array([total, total - 2], np.int32),
            "ends_starts": np.array([total, total - 1, 1, 0], np.int32),
            "raw_2d": raw,
            "raw_3d": np.broadcast_to(raw[:, None], (B, S, total)).copy() * (RNG.random((B, S, total)) > 0.2)}


def run_both(node, feeds: dict, inits: dict, nout: int):
    """(bridge outputs, ONNX Runtime outputs) of a one-node graph."""
    graph = helper.make_graph(
        [node], "one",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output[:nout]],
        [numpy_helper.from_array(v, n) for n, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    proto.ir_version = 8
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = [v.detach().numpy() for v in bridge.to_torch(proto)(**feeds).values()]
    return got, want


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("past", [False, True], ids=["no_past", "past"])
@pytest.mark.parametrize("unidirectional", [0, 1])
@pytest.mark.parametrize("mask", list(masks(1)))
def test_attention_matches_onnx_runtime(mask, unidirectional, past):
    total = S + (P if past else 0)
    mask_value = masks(total)[mask]
    inits = {"w": normal(HIDDEN, 3 * HIDDEN), "bias": normal(3 * HIDDEN)}
    feeds = {"x": normal(B, S, HIDDEN)}
    inputs = ["x", "w", "bias", "", ""]
    if mask_value is not None:
        feeds["mask_index"], inputs[3] = mask_value, "mask_index"
    if past:
        feeds["past"], inputs[4] = normal(2, B, N, P, HEAD), "past"
    node = helper.make_node("Attention", inputs, ["y", "present"], domain=MS, num_heads=N,
                            unidirectional=unidirectional)
    got, want = run_both(node, feeds, inits, 2)
    assert got[1].shape == (2, B, N, total, HEAD)
    assert_same(got, want)


def test_attention_with_qkv_hidden_sizes_scale_and_attention_bias():
    sizes = [HIDDEN, HIDDEN, 2 * HIDDEN]  # values twice as wide as queries and keys
    inits = {"w": normal(HIDDEN, sum(sizes)), "bias": normal(sum(sizes))}
    feeds = {"x": normal(B, S, HIDDEN), "mask_index": masks(S)["raw_2d"], "attention_bias": normal(1, N, S, S)}
    node = helper.make_node("Attention", ["x", "w", "bias", "mask_index", "", "attention_bias"], ["y"], domain=MS,
                            num_heads=N, qkv_hidden_sizes=sizes, scale=0.3, mask_filter_value=-300.0)
    got, want = run_both(node, feeds, inits, 1)
    assert got[0].shape == (B, S, 2 * HIDDEN)
    assert_same(got, want)


@pytest.mark.parametrize("past", [False, True], ids=["no_past", "past"])
@pytest.mark.parametrize("unidirectional", [0, 1])
@pytest.mark.parametrize("mask", [m for m in masks(1) if m != "ends_starts"])  # ONNX Runtime's CPU refuses [2b]
def test_multi_head_attention_matches_onnx_runtime(mask, unidirectional, past):
    total = S + (P if past else 0)
    mask_value = masks(total)[mask]
    feeds = {"q": normal(B, S, HIDDEN), "k": normal(B, S, HIDDEN), "v": normal(B, S, HIDDEN)}
    inputs = ["q", "k", "v", "bias", "", "", "", ""]
    if mask_value is not None:
        feeds["key_padding_mask"], inputs[4] = mask_value, "key_padding_mask"
    if past:
        feeds["past_key"], feeds["past_value"] = normal(B, N, P, HEAD), normal(B, N, P, HEAD)
        inputs[6:8] = ["past_key", "past_value"]
    node = helper.make_node("MultiHeadAttention", inputs, ["y", "present_key", "present_value"], domain=MS,
                            num_heads=N, unidirectional=unidirectional)
    got, want = run_both(node, feeds, {"bias": normal(3 * HIDDEN)}, 3)
    assert got[1].shape == (B, N, total, HEAD)
    assert_same(got, want)


def test_multi_head_attention_refuses_a_mask_of_ends_and_starts():
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "m"], ["y"], domain=MS, num_heads=N)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S, HIDDEN])
                                              for n in "qkv"] + [helper.make_tensor_value_info("m", TensorProto.INT32, [2 * B])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    feeds = {n: normal(B, S, HIDDEN) for n in "qkv"} | {"m": masks(S)["ends_starts"]}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    with pytest.raises(OnnxgrowError, match="key_padding_mask other than \\[batch\\]"):
        bridge.to_torch(model)(**feeds)


def test_multi_head_attention_with_split_key_value_and_attention_bias():
    """Cross attention: key and value already [b, heads, kv, head] (no bias on them, no past)."""
    kv = 6
    feeds = {"q": normal(B, S, HIDDEN), "k": normal(B, N, kv, HEAD), "v": normal(B, N, kv, HEAD),
             "attention_bias": normal(B, N, S, kv)}
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "attention_bias"], ["y"], domain=MS,
                            num_heads=N, scale=0.5)
    got, want = run_both(node, feeds, {}, 1)
    assert_same(got, want)


def test_dataflow_reads_the_packed_past_of_attention():
    node = helper.make_node("Attention", ["x", "w", "bias", "mask", "past"], ["y", "present"], domain=MS, num_heads=N)
    graph = helper.make_graph(
        [node], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HIDDEN]),
         helper.make_tensor_value_info("mask", TensorProto.INT32, ["b", "t"]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, "b", N, "p", HEAD])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "present")],
        [numpy_helper.from_array(normal(HIDDEN, 3 * HIDDEN), "w"), numpy_helper.from_array(normal(3 * HIDDEN), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    flow = analyse(ir.from_proto(model))
    assert not flow.problems
    values = {v.name: v for v in list(flow.graph.inputs) + [o for n in flow.graph for o in n.outputs]}
    x, past, present = (flow.dims[values[n]] for n in ("x", "past", "present"))
    heads, head = (d for d in present[2:5:2])
    assert (heads.size, head.size) == (N, HEAD)
    assert same(past[1], x[0]) and same(present[1], x[0])  # batch
    assert same(past[2], heads) and same(past[4], head)  # the past's heads and head size are the op's
