"""The dataflow rules of ONNX Runtime's fused attentions (GroupQueryAttention, MultiHeadAttention) on
one-node graphs, and a one-node GroupQueryAttention model widened in ONNX Runtime."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxgrow.dims import factors, same, segments
from onnxgrow.shapeflow import analyse

MS = "com.microsoft"


def element_type(name, dims):
    """Position ids are int64, the scalar counts int32, the rest float."""
    return TensorProto.INT64 if name == "pos" else TensorProto.FLOAT if dims else TensorProto.INT32


def flow_of(node, inputs, outputs=1):
    graph = helper.make_graph(
        [node], "one",
        [helper.make_tensor_value_info(name, element_type(name, dims), dims) for name, dims in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output[:outputs]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    return analyse(ir.from_proto(model))


def shape(flow, name):
    g = flow.graph
    v = next(x for x in list(g.inputs) + [o for n in g for o in n.outputs] if x.name == name)
    return flow.dims[v]


def gqa(inputs, **attrs):
    names = [name for name, _ in inputs]
    return helper.make_node("GroupQueryAttention", names, ["out", "present_key", "present_value"], domain=MS, **attrs)


PACKED = [("qkv", ["b", "s", 128]), ("", None), ("", None), ("past_key", ["b", 2, "p", "kvdim"]),
          ("past_value", ["b", 2, "p", "kvdim"])]


def test_packed_query_is_q_then_k_then_v_each_heads_by_head_dim():
    flow = flow_of(gqa(PACKED, num_heads=4, kv_num_heads=2), [i for i in PACKED if i[0]], outputs=3)
    assert not flow.problems
    q, k, v = segments(shape(flow, "qkv")[-1])
    assert (q.size, k.size, v.size) == (64, 32, 32)
    kv_heads, head_dim = factors(k)
    assert (kv_heads.size, head_dim.size) == (2, 16)
    assert [f.size for f in factors(q)] == [2, 2, 16]  # kv heads x group x head_dim
    assert same(factors(q)[0], kv_heads) and same(factors(v)[0], kv_heads)
    out = shape(flow, "out")
    assert out[-1].size == 64 and same(out[0], shape(flow, "qkv")[0])
    present = shape(flow, "present_key")
    assert same(present[1], kv_heads) and same(present[3], head_dim)
    assert same(shape(flow, "past_key")[3], head_dim)  # the named kv_cache_dim is head_dim
    meanings = {name: m.dims[0] for (_, name), m in flow.attribute_meanings.items()}
    assert meanings["num_heads"].size == 4 and same(meanings["kv_num_heads"], kv_heads)


def test_separate_query_key_value():
    inputs = [("q", ["b", "s", 64]), ("k", ["b", "s", 32]), ("v", ["b", "s", 32])]
    flow = flow_of(gqa(inputs, num_heads=4, kv_num_heads=2), inputs)
    assert not flow.problems
    kv_heads, head_dim = factors(shape(flow, "k")[-1])
    assert same(factors(shape(flow, "q")[-1])[0], kv_heads) and same(factors(shape(flow, "v")[-1])[1], head_dim)


def test_rotary_caches_block_resizing_head_dim_only():
    inputs = PACKED + [("seqlens_k", ["b"]), ("total_sequence_length", [])]
    names = [n for n, _ in inputs] + ["cos", "sin"]
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_key", "present_value"], domain=MS,
                            num_heads=4, kv_num_heads=2, do_rotary=1)
    declared = [i for i in PACKED if i[0]] + [("cos", [128, 8]), ("sin", [128, 8])]
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in declared]
                              + [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
                                 helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    flow = analyse(ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                                         helper.make_opsetid(MS, 1)])))
    head_dim = factors(segments(shape(flow, "qkv")[-1])[1])[1]
    assert {p.reason for p in flow.problems} == {"the rotary caches measure half of head_dim"}
    assert any(same(d, head_dim) for p in flow.problems for d in p.dims)


def test_a_width_that_is_not_the_heads_is_a_problem():
    inputs = [("qkv", ["b", "s", 100])]
    flow = flow_of(gqa(inputs, num_heads=4, kv_num_heads=2), inputs)
    assert flow.problems and "not 4 + 2 x 2 heads wide" in flow.problems[0].reason


def test_multi_head_attention_separate_3d():
    inputs = [("q", ["b", "s", 64]), ("k", ["b", "t", 64]), ("v", ["b", "t", 64])]
    node = helper.make_node("MultiHeadAttention", [n for n, _ in inputs], ["out"], domain=MS, num_heads=4)
    flow = flow_of(node, inputs)
    assert not flow.problems
    heads, head_dim = factors(shape(flow, "q")[-1])
    assert (heads.size, head_dim.size) == (4, 16) and same(factors(shape(flow, "out")[-1])[0], heads)
    assert same(shape(flow, "k")[1], shape(flow, "v")[1])


@pytest.mark.parametrize("factor", [2])
def test_one_node_gqa_model_widens_exactly_in_onnxruntime(tmp_path, factor):
    """ids -> embedding -> packed qkv -> GroupQueryAttention -> o -> head: hypercloning keeps its logits."""
    import onnxgrow
    from onnxgrow.verify import validate
    rng = np.random.default_rng(0)
    w = lambda name, *s: helper.make_tensor(name, TensorProto.FLOAT, s, rng.normal(0, 0.3, s).astype(np.float32).ravel())
    hidden, vocab = 16, 11
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"]),
        helper.make_node("SimplifiedLayerNormalization", ["x", "g1"], ["n1"], axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["n1", "wqkv"], ["qkv"]),
        helper.make_node("ReduceSum", ["mask", "one"], ["total_m"], keepdims=0),
        helper.make_node("Sub", ["total_m", "one"], ["seqlens64"]),
        helper.make_node("Cast", ["seqlens64"], ["seqlens"], to=TensorProto.INT32),
        helper.make_node("Shape", ["mask"], ["mshape"]), helper.make_node("Gather", ["mshape", "one"], ["total64"]),
        helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention", ["qkv", "", "", "", "", "seqlens", "total"], ["a"], domain=MS,
                         num_heads=4, kv_num_heads=2),
        helper.make_node("MatMul", ["a", "wo"], ["o"]), helper.make_node("Add", ["x", "o"], ["r"]),
        helper.make_node("SimplifiedLayerNormalization", ["r", "g2"], ["n2"], axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["n2", "wu"], ["u"]), helper.make_node("Relu", ["u"], ["h"]),
        helper.make_node("MatMul", ["h", "wd"], ["d"]), helper.make_node("Add", ["r", "d"], ["r2"]),
        helper.make_node("SimplifiedLayerNormalization", ["r2", "g3"], ["n3"], axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["n3", "wh"], ["logits"])]
    inits = [w("emb", vocab, hidden), w("wqkv", hidden, 64), w("wo", 32, hidden), w("wu", hidden, 24),
             w("wd", 24, hidden), w("wh", hidden, vocab),
             helper.make_tensor("g1", TensorProto.FLOAT, [hidden], np.ones(hidden)),
             helper.make_tensor("g2", TensorProto.FLOAT, [hidden], np.ones(hidden)),
             helper.make_tensor("g3", TensorProto.FLOAT, [hidden], np.ones(hidden)),
             helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(
        nodes, "gqa", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"]),
                       helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "total_sequence_length"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    source, out = tmp_path / "src.onnx", tmp_path / "wide.onnx"
    import onnx
    onnx.save(model, source)
    config = onnxgrow.inspect(source)
    assert (config["num_heads"], config["num_kv_heads"], config["head_dim"]) == (4, 2, 8)  # ORT: head_size a multiple of 8
    onnx.save(onnxgrow.widen(source, factor), out)
    report = validate(source, out, shapes=((1, 5), (2, 7)))
    assert report.passed and report.outputs[0].max_abs_diff <= 1e-4, report.to_dict()
    heads = [(a.name, a.i) for n in onnx.load(str(out)).graph.node for a in n.attribute if a.name.endswith("heads")]
    assert sorted(heads) == [("kv_num_heads", 2 * factor), ("num_heads", 4 * factor)]


def test_contrib_rotary_tells_heads_from_the_caches():
    inputs = [("x", ["b", "s", 64]), ("pos", ["b", "s"]), ("cos", [128, 8]), ("sin", [128, 8])]
    node = helper.make_node("RotaryEmbedding", [n for n, _ in inputs], ["y"], domain=MS)
    flow = flow_of(node, inputs)
    heads, head_dim = factors(shape(flow, "x")[-1])
    assert (heads.size, head_dim.size) == (4, 16) and same(shape(flow, "y")[-1], shape(flow, "x")[-1])
    assert {p.reason for p in flow.problems} == {"the rotary caches measure half of head_dim"}
