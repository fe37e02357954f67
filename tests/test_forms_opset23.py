"""Opset-23 dynamo exports: SDPA as the ONNX Attention op, RMSNormalization and RotaryEmbedding.

`torch.onnx.export(..., dynamo=True, opset_version=23)` writes one Attention node per layer, so the
attention is one node, not a Softmax between two MatMuls; head counts live in node attributes
(RotaryEmbedding's num_heads here). ONNX Runtime 1.32's RotaryEmbedding kernel runs these exports at
batch 1 only, so every run here is at batch 1.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import onnxgrow
from onnxgrow import modelio
from onnxgrow.errors import UnsupportedGraph
from onnxgrow.subcloning import subclone_ir
from onnxgrow.verify import validate
from helpers import assert_close_to_scale, zoo_model

FORMS = ["gpt2-dynamo23", "llama-gqa-dynamo23"]
BATCH_1 = ((1, 5), (1, 9), (1, 16))  # ORT's RotaryEmbedding kernel: batch 1 only
KEYS = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "vocab_size",
        "norm", "norm_position", "positional", "tied_embeddings", "activation", "parallel_residual",
        "num_parameters"]


def ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def head_attributes(path) -> list[tuple[str, str, int]]:
    return [(n.op_type, a.name, a.i) for n in onnx.load(str(path)).graph.node for a in n.attribute
            if a.name in ("q_num_heads", "kv_num_heads", "num_heads")]


@pytest.mark.parametrize("name", FORMS)
def test_inspect_gives_the_true_configuration(zoo, name):
    source = zoo_model(zoo, name)
    assert "Attention" in ops(source)
    got, expected = onnxgrow.inspect(source), zoo[name]["config"]
    assert {k: got[k] for k in KEYS} == {k: expected[k] for k in KEYS}
    assert got["opset"] == 23


def test_the_llama_form_has_the_fused_ops(zoo):
    assert {"RMSNormalization", "RotaryEmbedding", "Attention"} <= ops(zoo_model(zoo, "llama-gqa-dynamo23"))


@pytest.mark.parametrize("name", FORMS)
def test_hypercloning_x2_is_exact_and_doubles_head_attributes(zoo, tmp_path, name):
    source, out = zoo_model(zoo, name), tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(source, 2), out)
    report = validate(source, out, shapes=BATCH_1)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    got, src = onnxgrow.inspect(out), zoo[name]["config"]
    assert got["num_heads"] == 2 * src["num_heads"] and got["num_kv_heads"] == 2 * src["num_kv_heads"]
    assert got["hidden_size"] == 2 * src["hidden_size"] and got["head_dim"] == src["head_dim"]
    before = head_attributes(source)
    assert [(op, a, 2 * n) for op, a, n in before] == head_attributes(out)


@pytest.mark.parametrize("name", FORMS)
def test_identity_deepen_x2_is_bit_exact(zoo, tmp_path, name):
    source, out = zoo_model(zoo, name), tmp_path / "deep.onnx"
    onnx.save(onnxgrow.deepen(source, factor=2), out)
    report = validate(source, out, shapes=BATCH_1)
    assert report.passed and all(o.max_abs_diff == 0.0 for o in report.outputs), report.to_dict()
    assert onnxgrow.inspect(out)["num_layers"] == 2 * zoo[name]["config"]["num_layers"]


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
@pytest.mark.parametrize("name", FORMS)
def test_other_widths_run_and_validate(zoo, tmp_path, name, method):
    source, out = zoo_model(zoo, name), tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(source, 2, method=method), out)
    report = validate(source, out, shapes=BATCH_1, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_heads"] == 2 * zoo[name]["config"]["num_heads"]


@pytest.mark.parametrize("method", ["stack", "interleave"])
@pytest.mark.parametrize("name", FORMS)
def test_other_depths_run_and_validate(zoo, tmp_path, name, method):
    source, out = zoo_model(zoo, name), tmp_path / "deep.onnx"
    onnx.save(onnxgrow.deepen(source, factor=2, method=method), out)
    report = validate(source, out, shapes=BATCH_1, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_layers"] == 2 * zoo[name]["config"]["num_layers"]


@pytest.mark.parametrize("name", FORMS)
def test_subclone_half_width_half_depth(zoo, tmp_path, name):
    source, c = zoo_model(zoo, name), zoo[name]["config"]
    ids = np.random.default_rng(0).integers(0, 500, (1, 24))  # one window: calibration runs at batch 1
    result = subclone_ir(modelio.load(source), ids, hidden=c["hidden_size"] // 2, layers=c["num_layers"] // 2)
    out = modelio.save(result.model, tmp_path / "sub.onnx")
    report = validate(source, out, shapes=BATCH_1, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    got = onnxgrow.inspect(out)
    assert got["hidden_size"] == c["hidden_size"] // 2 and got["num_heads"] == c["num_heads"] // 2
    assert [(op, a, n // 2) for op, a, n in head_attributes(source)][:len(head_attributes(out))] == \
        head_attributes(out)


# --- hand-made graphs: the 3-D form and its messages -------------------------------------------------------

def attention_3d(with_heads: bool = True) -> onnx.ModelProto:
    """ids -> embedding -> q/k/v projections -> 3-D Attention (4 query heads, 2 kv heads) -> o -> head."""
    rng = np.random.default_rng(0)
    hidden, vocab, head_dim = 8, 11, 2

    def w(name, *shape):
        return onnx.numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
    heads = dict(q_num_heads=4, kv_num_heads=2) if with_heads else {}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]),
             helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("Attention", ["q", "k", "v"], ["a"], is_causal=1, **heads),
             helper.make_node("MatMul", ["a", "wo"], ["o"]), helper.make_node("Add", ["x", "o"], ["r"]),
             helper.make_node("MatMul", ["r", "wu"], ["u"]), helper.make_node("Relu", ["u"], ["g"]),
             helper.make_node("MatMul", ["g", "wd"], ["d"]), helper.make_node("Add", ["r", "d"], ["r2"]),
             helper.make_node("MatMul", ["r2", "wh"], ["logits"])]
    inits = [w("emb", vocab, hidden), w("wq", hidden, 4 * head_dim), w("wk", hidden, 2 * head_dim),
             w("wv", hidden, 2 * head_dim), w("wo", 4 * head_dim, hidden), w("wu", hidden, 16),
             w("wd", 16, hidden), w("wh", hidden, vocab)]
    graph = helper.make_graph(nodes, "att3d", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64,
                                                                             ["batch", "sequence"])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                                             ["batch", "sequence", vocab])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_3d_attention_gives_its_head_geometry():
    config = onnxgrow.inspect(attention_3d())
    assert (config["num_heads"], config["num_kv_heads"], config["head_dim"]) == (4, 2, 2)


def test_3d_attention_widens_exactly(tmp_path):
    source, out = tmp_path / "src.onnx", tmp_path / "wide.onnx"
    onnx.save(attention_3d(), source)
    onnx.save(onnxgrow.widen(source, 2), out)
    report = validate(source, out, shapes=((1, 5), (2, 7)))
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    assert [(a.name, a.i) for n in onnx.load(str(out)).graph.node for a in n.attribute
            if n.op_type == "Attention" and a.name.endswith("heads")] == [("kv_num_heads", 4), ("q_num_heads", 8)]


def test_3d_attention_without_head_counts_is_named():
    with pytest.raises(UnsupportedGraph, match="3-D inputs and no q_num_heads attribute"):
        onnxgrow.inspect(attention_3d(with_heads=False))
