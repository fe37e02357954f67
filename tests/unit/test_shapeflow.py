"""The dataflow analysis on tiny hand-built graphs: one or more tests per family of rules."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrow.dims import factors, same, segments
from onnxgrow.shapeflow import RULES, ShapeFlow, analyse
from onnxgrow.shapeflow.rules import shape, slicing

# --- graph building ---------------------------------------------------------------------------------


def build(nodes, inputs, inits=(), opset=17, domains=()) -> ShapeFlow:
    """Analyse a graph of `nodes`; inputs are (name, shape) float tensors, inits (name, array)."""
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in inputs],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(a), name) for name, a in inits])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return analyse(ir.from_proto(helper.make_model(graph, opset_imports=opsets)))


def ints(*values):
    return np.array(values, dtype=np.int64)


def weight(*dims):
    return np.zeros(dims, dtype=np.float32)


def value(flow: ShapeFlow, name: str) -> ir.Value:
    g = flow.graph
    if name in g.initializers:
        return g.initializers[name]
    found = [v for v in g.inputs if v.name == name] + [o for n in g for o in n.outputs if o.name == name]
    return found[0]


def dims(flow: ShapeFlow, name: str):
    return flow.dims[value(flow, name)]


def node(op, inputs, outputs, **kw):
    return helper.make_node(op, inputs, outputs, **kw)


# --- linear -----------------------------------------------------------------------------------------


def test_matmul_unifies_the_contraction_and_marks_the_weight_axis():
    flow = build([node("MatMul", ["x", "w"], ["y"])], [("x", ["b", "s", 8])], [("w", weight(8, 16))])
    x, w, y = dims(flow, "x"), dims(flow, "w"), dims(flow, "y")
    assert same(x[2], w[0])
    assert [d.size for d in y] == [None, None, 16] and same(y[0], x[0]) and same(y[2], w[1])
    assert flow.contracted == {"w": {0}}
    assert flow.problems == []


def test_matmul_through_a_transposed_weight_marks_the_original_axis():
    flow = build([node("Transpose", ["w"], ["wt"], perm=[1, 0]), node("MatMul", ["x", "wt"], ["y"])],
                 [("x", ["b", 8])], [("w", weight(16, 8))])
    assert same(dims(flow, "x")[1], dims(flow, "w")[1])
    assert flow.contracted == {"w": {1}}


def test_gemm_with_trans_b():
    flow = build([node("Gemm", ["x", "w", "c"], ["y"], transB=1)], [("x", ["b", 8])],
                 [("w", weight(16, 8)), ("c", weight(16))])
    assert same(dims(flow, "x")[1], dims(flow, "w")[1])
    assert same(dims(flow, "y")[1], dims(flow, "c")[0])
    assert flow.contracted == {"w": {1}}


# --- elementwise ------------------------------------------------------------------------------------


def test_broadcast_add_unifies_the_trailing_axes():
    flow = build([node("Add", ["x", "bias"], ["y"])], [("x", ["b", "s", 8]), ("bias", [None])])
    x, bias, y = dims(flow, "x"), dims(flow, "bias"), dims(flow, "y")
    assert same(x[2], bias[0]) and same(y[2], x[2]) and same(y[0], x[0])
    assert bias[0].size == 8


def test_broadcast_axis_of_size_one_stretches():
    flow = build([node("Mul", ["x", "m"], ["y"])], [("x", ["b", "s", 8]), ("m", ["b", 1, 1])])
    y = dims(flow, "y")
    assert same(y[1], dims(flow, "x")[1]) and same(y[2], dims(flow, "x")[2])


def test_unary_keeps_the_axes():
    flow = build([node("Relu", ["x"], ["y"])], [("x", ["b", 8])])
    assert dims(flow, "y") == dims(flow, "x")


def test_reduce_with_axes_attribute_and_axes_input():
    flow = build([node("ReduceMean", ["x"], ["y"], axes=[-1])], [("x", ["b", 8])])
    assert dims(flow, "y")[1].size == 1 and same(dims(flow, "y")[0], dims(flow, "x")[0])
    flow = build([node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)], [("x", ["b", 8])],
                 [("axes", ints(-1))], opset=18)
    assert len(dims(flow, "y")) == 1 and same(dims(flow, "y")[0], dims(flow, "x")[0])


def test_size_times_literal_is_a_product_and_the_literal_a_new_dim():
    flow = build([node("Shape", ["x"], ["shape"]), node("Mul", ["shape", "n"], ["m"])],
                 [("x", ["b", 8])], [("n", ints(2))])
    b, hidden = dims(flow, "x")
    doubled = flow.vals[value(flow, "m")]
    assert [f.size for f in factors(doubled[1].dim)] == [8, 2]
    assert same(factors(doubled[0].dim)[0], b)
    assert flow.meanings[("n", 0)].dims[0].size == 2


def test_size_divided_by_a_leading_factor():
    # hidden (4 x 16) // 4 -> head_dim, the literal 4 means heads
    flow = build([node("Reshape", ["x", "t"], ["r"]), node("Shape", ["x"], ["shape"]),
                  node("Div", ["shape", "heads"], ["q"])],
                 [("x", ["b", 64])], [("t", ints(0, 4, 16)), ("heads", ints(4))])
    heads, head_dim = factors(dims(flow, "x")[1])
    quotient = flow.vals[value(flow, "q")]
    assert same(quotient[1].dim, head_dim)
    assert same(flow.meanings[("heads", 0)].dims[0], heads)


# --- shape ------------------------------------------------------------------------------------------


def test_reshape_refines_hidden_into_a_product_and_gives_the_literal_a_meaning():
    flow = build([node("Reshape", ["x", "t"], ["y"])], [("x", ["b", "s", 64])], [("t", ints(0, 0, 4, 16))])
    x, y = dims(flow, "x"), dims(flow, "y")
    heads, head_dim = factors(x[2])
    assert (heads.size, head_dim.size) == (4, 16)
    assert same(y[0], x[0]) and same(y[1], x[1]) and same(y[2], heads) and same(y[3], head_dim)
    four = flow.meanings[("t", 2)]
    assert four.kind == "size" and same(four.dims[0], heads)
    assert ("t", 0) not in flow.meanings  # a 0 copies the input axis, it means no size of its own


def test_reshape_back_with_minus_one_is_the_same_product():
    flow = build([node("Reshape", ["x", "t"], ["y"]), node("Reshape", ["y", "back"], ["z"])],
                 [("x", ["b", 64])], [("t", ints(0, 4, 16)), ("back", ints(0, -1))])
    z, x = dims(flow, "z")[1], dims(flow, "x")[1]
    assert [same(a, b) for a, b in zip(factors(z), factors(x))] == [True, True]  # the factors of hidden


def test_shape_gather_concat_reshape_tracks_the_dim_at_run_time():
    nodes = [node("Shape", ["x"], ["shape"]),
             node("Gather", ["shape", "zero"], ["batch"], axis=0),
             node("Unsqueeze", ["batch", "axes"], ["batch1"]),
             node("Concat", ["batch1", "rest"], ["target"], axis=0),
             node("Reshape", ["x", "target"], ["y"])]
    flow = build(nodes, [("x", ["b", 64])], [("zero", np.array(0, dtype=np.int64)), ("axes", ints(0)),
                                              ("rest", ints(4, 16))], opset=13)
    target = flow.vals[value(flow, "target")]
    assert same(target[0].dim, dims(flow, "x")[0])
    y = dims(flow, "y")
    assert same(y[0], dims(flow, "x")[0])
    assert [f.size for f in factors(dims(flow, "x")[1])] == [4, 16]
    assert same(flow.meanings[("rest", 0)].dims[0], y[1])


def test_expand_to_a_literal_size_gives_it_a_meaning():
    flow = build([node("Expand", ["x", "t"], ["y"])], [("x", ["b", 1, 8])], [("t", ints(1, 5, 1))])
    y = dims(flow, "y")
    assert y[1].size == 5 and same(flow.meanings[("t", 1)].dims[0], y[1])
    assert same(y[2], dims(flow, "x")[2])


def expand_through_folded_where(cond):
    """x [b, 2, 1, 16] expanded to Where(cond, 1s, [Shape(x)[0], 2, 3, 16]), as onnxslim leaves the
    repeat of K/V: the Equal(target, -1) that chose between the two is folded into a bool constant."""
    nodes = [node("Shape", ["x"], ["shape"]),
             node("Gather", ["shape", "zero"], ["batch"], axis=0),
             node("Unsqueeze", ["batch", "axes"], ["batch1"]),
             node("Concat", ["batch1", "kv", "rep", "hd"], ["target"], axis=0),
             node("Where", ["cond", "ones", "target"], ["resolved"]),
             node("Expand", ["x", "resolved"], ["y"])]
    return build(nodes, [("x", ["b", 2, 1, 16])],
                 [("zero", np.array(0, dtype=np.int64)), ("axes", ints(0)), ("kv", ints(2)), ("rep", ints(3)),
                  ("hd", ints(16)), ("cond", np.array(cond)), ("ones", ints(1, 1, 1, 1))], opset=13)


def test_where_with_a_folded_condition_resolves_an_expand_target():
    flow = expand_through_folded_where([False] * 4)
    assert flow.problems == []
    x, y = dims(flow, "x"), dims(flow, "y")
    assert same(y[0], x[0]) and same(y[1], x[1]) and same(y[3], x[3])
    assert y[2].size == 3 and same(flow.meanings[("rep", 0)].dims[0], y[2])
    # the condition is not a size: nothing may rewrite it
    assert not [leaf for leaf in flow.meanings if leaf[0] == "cond"]


def test_where_with_a_folded_condition_picks_per_element():
    flow = expand_through_folded_where([False, False, True, False])
    resolved = flow.vals[value(flow, "resolved")]
    assert [e.value for e in resolved[1:]] == [2, 1, 16] and same(resolved[0].dim, dims(flow, "x")[0])
    assert dims(flow, "y")[2].size == 1


def test_transpose_and_flatten():
    flow = build([node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), node("Flatten", ["t"], ["f"], axis=1)],
                 [("x", ["b", 4, 16])])
    x, t, f = dims(flow, "x"), dims(flow, "t"), dims(flow, "f")
    assert same(t[1], x[2]) and same(t[2], x[1])
    assert [d.size for d in factors(f[1])] == [16, 4]


def test_range_up_to_a_size_measures_that_axis():
    flow = build([node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "one"], ["n"], axis=0),
                  node("Range", ["zero", "n", "step"], ["pos"])],
                 [("x", ["b", "s"])], [("one", np.array(1, dtype=np.int64)),
                                       ("zero", np.array(0, dtype=np.int64)),
                                       ("step", np.array(1, dtype=np.int64))])
    assert same(dims(flow, "pos")[0], dims(flow, "x")[1])


# --- slicing ----------------------------------------------------------------------------------------


def test_split_of_a_fused_qkv_gives_segments_with_meanings():
    flow = build([node("Split", ["x", "sizes"], ["q", "k", "v"], axis=-1)], [("x", ["b", 24])],
                 [("sizes", ints(8, 8, 8))], opset=13)
    qkv = dims(flow, "x")[1]
    q, k, v = segments(qkv)
    assert [s.size for s in (q, k, v)] == [8, 8, 8]
    assert same(dims(flow, "q")[1], q) and same(dims(flow, "v")[1], v)
    assert same(dims(flow, "q")[0], dims(flow, "x")[0])
    assert [same(flow.meanings[("sizes", i)].dims[0], s) for i, s in enumerate((q, k, v))] == [True] * 3


def test_slice_cuts_segments_and_its_bounds_are_offsets():
    flow = build([node("Slice", ["x", "starts", "ends", "axes"], ["k"])], [("x", ["b", 24])],
                 [("starts", ints(8)), ("ends", ints(16)), ("axes", ints(1))])
    q, k, v = segments(dims(flow, "x")[1])
    assert same(dims(flow, "k")[1], k)
    start, end = flow.meanings[("starts", 0)], flow.meanings[("ends", 0)]
    assert start.kind == end.kind == "offset"
    assert [same(a, b) for a, b in zip(start.dims, [q])] == [True]
    assert [same(a, b) for a, b in zip(end.dims, [q, k])] == [True, True]


def test_slice_of_a_shape_vector_picks_its_elements():
    flow = build([node("Shape", ["x"], ["shape"]), node("Slice", ["shape", "starts", "ends"], ["tail"])],
                 [("x", ["b", "s", 8])], [("starts", ints(1)), ("ends", ints(3))])
    tail = flow.vals[value(flow, "tail")]
    assert [same(e.dim, d) for e, d in zip(tail, dims(flow, "x")[1:])] == [True, True]


def test_concat_joins_segments_and_unifies_the_other_axes():
    flow = build([node("Concat", ["a", "b"], ["y"], axis=1)], [("a", ["n", 8]), ("b", [None, 16])])
    y = dims(flow, "y")
    assert [s.size for s in segments(y[1])] == [8, 16]
    assert same(dims(flow, "b")[0], dims(flow, "a")[0])


def test_a_constant_index_into_a_model_axis_is_a_soft_problem():
    flow = build([node("Gather", ["x", "i"], ["y"], axis=1)], [("x", ["b", 3, 8])],
                 [("i", np.array(0, dtype=np.int64))])
    assert [p.reason for p in flow.problems] == ["constant index into this axis"]
    assert same(flow.problems[0].dims[0], dims(flow, "x")[1])


# --- norms ------------------------------------------------------------------------------------------


def test_layer_norm_scale_measures_the_normalized_axis():
    flow = build([node("LayerNormalization", ["x", "g", "beta"], ["y"], axis=-1)], [("x", ["b", "s", 8])],
                 [("g", weight(8)), ("beta", weight(8))])
    assert same(dims(flow, "g")[0], dims(flow, "x")[2]) and same(dims(flow, "beta")[0], dims(flow, "x")[2])
    assert dims(flow, "y") == dims(flow, "x")


def test_simplified_layer_norm_is_accepted_in_both_domains():
    for domain in ("", "com.microsoft"):
        flow = build([node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1, domain=domain)],
                     [("x", ["b", 8])], [("g", weight(8))], domains=["com.microsoft"])
        assert flow.problems == [] and same(dims(flow, "g")[0], dims(flow, "x")[1])


# --- the registry: domains and versions -------------------------------------------------------------


def test_an_unknown_microsoft_op_is_a_problem_naming_its_domain():
    flow = build([node("SkipGroupNorm", ["x", "x", "g"], ["y"], domain="com.microsoft")],
                 [("x", ["b", 8])], [("g", weight(8))], domains=["com.microsoft"])
    assert [p.reason for p in flow.problems] == ["no dataflow rule for com.microsoft:SkipGroupNorm"]
    assert "SkipGroupNorm" in str(flow.problems[0])


def test_an_unknown_custom_domain_is_refused_even_for_a_standard_op_name():
    flow = build([node("Relu", ["x"], ["y"], domain="com.example")], [("x", ["b", 8])], domains=["com.example"])
    assert [p.reason for p in flow.problems] == ["no dataflow rule for com.example:Relu"]


def test_an_unknown_standard_op_is_a_problem():
    flow = build([node("Frobnicate", ["x"], ["y"])], [("x", ["b", 8])])
    assert [p.reason for p in flow.problems] == ["no dataflow rule for Frobnicate"]


def test_microsoft_contrib_activations_keep_the_shape():
    flow = build([node("FastGelu", ["x"], ["y"], domain="com.microsoft")], [("x", ["b", 8])],
                 domains=["com.microsoft"])
    assert flow.problems == [] and dims(flow, "y") == dims(flow, "x")


def test_constant_nodes_and_einsum_with_an_ellipsis_are_problems():
    flow = build([node("Einsum", ["x", "x"], ["y"], equation="...j,...j->...j")], [("x", ["b", 8])])
    assert ["ellipsis" in p.reason for p in flow.problems] == [True]
    flow = build([node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij")], [("x", ["b", 8])])
    assert flow.problems == [] and same(dims(flow, "y")[1], dims(flow, "x")[1])
    flow = build([node("Constant", [], ["c"], value_ints=[1, 2]), node("Relu", ["x"], ["y"])],
                 [("x", ["b", 8])])
    assert ["lifted" in p.reason for p in flow.problems] == [True]


@pytest.mark.parametrize("opset, rule", [(11, slicing.split_1), (13, slicing.split_13), (18, slicing.split_13)])
def test_the_rule_for_the_models_opset_is_chosen(opset, rule):
    assert RULES.lookup("", "Split", opset) is rule
    assert RULES.lookup("ai.onnx", "Split", opset) is rule


def test_split_sizes_as_an_attribute_before_opset_13():
    flow = build([node("Split", ["x"], ["a", "b"], axis=1, split=[8, 16])], [("x", ["n", 24])], opset=11)
    assert flow.problems == []
    assert [s.size for s in segments(dims(flow, "x")[1])] == [8, 16]
    assert same(dims(flow, "b")[1], segments(dims(flow, "x")[1])[1])


def test_squeeze_and_unsqueeze_axes_follow_the_opset():
    assert RULES.lookup("", "Squeeze", 11) is shape.squeeze_1
    assert RULES.lookup("", "Unsqueeze", 13) is shape.unsqueeze_13
    old = build([node("Unsqueeze", ["x"], ["y"], axes=[1])], [("x", ["b", 8])], opset=11)
    new = build([node("Unsqueeze", ["x", "axes"], ["y"])], [("x", ["b", 8])], [("axes", ints(1))], opset=13)
    for flow in (old, new):
        y = dims(flow, "y")
        assert [d.size for d in y] == [None, 1, 8] and same(y[2], dims(flow, "x")[1])


def test_slice_bounds_as_attributes_before_opset_10():
    flow = build([node("Slice", ["x"], ["y"], starts=[0], ends=[8], axes=[1])], [("x", ["b", 24])], opset=9)
    assert flow.problems == []
    assert same(dims(flow, "y")[1], segments(dims(flow, "x")[1])[0])
