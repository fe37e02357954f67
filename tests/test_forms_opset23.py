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
from onnxgrow.errors import OnnxgrowError, UnsupportedGraph
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


# --- the bridge's ops against ONNX Runtime ------------------------------------------------------------------

RNG = np.random.default_rng(23)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def one_node(node, feeds: dict, n_out: int) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output[:n_out]]
    proto = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 23)])
    proto.ir_version = 10
    return proto


def causal_bool(q_len, kv_len):
    return np.tril(np.ones((q_len, kv_len), bool), kv_len - q_len)


B, S, P = 2, 5, 3  # batch, new positions, past positions
BRIDGE_CASES = {
    "attention-4d": (dict(), dict(q=rand(B, 4, S, 8), k=rand(B, 4, S, 8), v=rand(B, 4, S, 8)), 1),
    "attention-4d-causal-scale-gqa": (dict(is_causal=1, scale=0.3),
                                      dict(q=rand(B, 4, S, 8), k=rand(B, 2, S, 8), v=rand(B, 2, S, 6)), 1),
    "attention-4d-bool-mask": (dict(), dict(q=rand(B, 4, S, 8), k=rand(B, 4, S, 8), v=rand(B, 4, S, 8),
                                             mask=np.broadcast_to(causal_bool(S, S), (B, 1, S, S)).copy()), 1),
    "attention-4d-float-mask-softcap": (dict(softcap=2.0), dict(q=rand(B, 4, S, 8), k=rand(B, 4, S, 8),
                                                                v=rand(B, 4, S, 8), mask=rand(S, S)), 1),
    "attention-4d-past-causal": (dict(is_causal=1),
                                 dict(q=rand(B, 4, S, 8), k=rand(B, 2, S, 8), v=rand(B, 2, S, 8),
                                      mask=None, past_key=rand(B, 2, P, 8), past_value=rand(B, 2, P, 8)), 3),
    "attention-3d-gqa-causal": (dict(q_num_heads=4, kv_num_heads=2, is_causal=1),
                                dict(q=rand(B, S, 32), k=rand(B, S, 16), v=rand(B, S, 12)), 1),
    "rotary-4d": (dict(), dict(x=rand(1, 4, S, 8), cos=rand(1, S, 4), sin=rand(1, S, 4)), 1),
    "rotary-3d-interleaved-position-ids": (dict(num_heads=4, interleaved=1),
                                           dict(x=rand(1, S, 32), cos=rand(16, 4), sin=rand(16, 4),
                                                position_ids=RNG.integers(0, 16, (1, S)).astype(np.int64)), 1),
    "rotary-4d-partial": (dict(rotary_embedding_dim=4), dict(x=rand(1, 4, S, 8), cos=rand(1, S, 2),
                                                             sin=rand(1, S, 2)), 1),
    "rmsnorm": (dict(axis=-1, epsilon=1e-5), dict(x=rand(B, S, 8), scale=rand(8)), 1),
}


@pytest.mark.parametrize("case", list(BRIDGE_CASES))
def test_bridge_op_matches_onnxruntime(case):
    import onnxruntime as ort
    from onnxgrow import bridge
    attrs, feeds, n_out = BRIDGE_CASES[case]
    op = {"attention": "Attention", "rotary": "RotaryEmbedding", "rmsnorm": "RMSNormalization"}[case.split("-")[0]]
    names = [k if v is not None else "" for k, v in feeds.items()]
    outputs = ["y", "present_key", "present_value"][:n_out]
    node = helper.make_node(op, names, outputs, **attrs)
    feeds = {k: v for k, v in feeds.items() if v is not None}
    proto = one_node(node, feeds, n_out)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    import torch
    got = bridge.to_torch(proto)(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    for g, e in zip(got.values(), expected):
        g = g.detach().numpy()
        assert g.shape == e.shape
        assert np.abs(g - e).max() <= 1e-4 * np.abs(e).max()


@pytest.mark.parametrize("name", FORMS)
def test_train_two_steps_writes_a_model_onnxruntime_runs(zoo, tmp_path, name):
    import io
    from rich.console import Console
    from onnxgrow import training
    from onnxgrow.verify import run_model
    source = zoo_model(zoo, name)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "trained.onnx"
    summary = training.train(source, text, use_bytes=True, steps=2, batch=1, seq=16, lr=1e-3, output=out,
                             console=Console(file=io.StringIO()))
    assert summary["output"] == str(out) and len(summary["losses"]) == 2
    ids = np.frombuffer(b"the lazy dog", np.uint8).astype(np.int64)[None]
    logits = run_model(out, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, "cpu")["logits"]
    assert logits.shape == (1, ids.shape[1], 1000) and np.isfinite(logits).all()
    assert not np.array_equal(logits, run_model(source, {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                                                "cpu")["logits"])


@pytest.mark.parametrize("name", FORMS)
def test_export_weights_names_the_attention_projections(zoo, tmp_path, name):
    from safetensors.numpy import load_file
    from onnxgrow.weights import export_weights
    names = set(load_file(str(export_weights(zoo_model(zoo, name), tmp_path / "w.safetensors"))))
    assert any("attn" in n or "attention" in n for n in names), sorted(names)


def attention_4d_with_cache() -> onnx.ModelProto:
    """ids -> embedding -> q/k/v -> [b, heads, s, d] -> causal 4-D Attention with a past (4 query heads,
    2 key/value heads, no repeat in the graph) -> present key/value outputs and logits."""
    rng = np.random.default_rng(1)
    hidden, vocab, d = 8, 11, 2

    def w(name, *shape):
        return onnx.numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    def ints(name, values):
        return onnx.numpy_helper.from_array(np.array(values, np.int64), name)
    heads = [helper.make_node("Reshape", [f"{p}", f"{p}_shape"], [f"{p}4"]) for p in "qkv"] + [
        helper.make_node("Transpose", [f"{p}4"], [f"{p}h"], perm=[0, 2, 1, 3]) for p in "qkv"]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"])] + [
        helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"] + heads + [
        helper.make_node("Attention", ["qh", "kh", "vh", "", "past_key_values.0.key", "past_key_values.0.value"],
                         ["ah", "present.0.key", "present.0.value"], is_causal=1),
        helper.make_node("Transpose", ["ah"], ["a4"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["a4", "a_shape"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["o"]), helper.make_node("Add", ["x", "o"], ["r"]),
        helper.make_node("MatMul", ["r", "wu"], ["u"]), helper.make_node("Relu", ["u"], ["g"]),
        helper.make_node("MatMul", ["g", "wd"], ["dn"]), helper.make_node("Add", ["r", "dn"], ["r2"]),
        helper.make_node("MatMul", ["r2", "wh"], ["logits"])]
    inits = [w("emb", vocab, hidden), w("wq", hidden, 4 * d), w("wk", hidden, 2 * d), w("wv", hidden, 2 * d),
             w("wo", 4 * d, hidden), w("wu", hidden, 16), w("wd", 16, hidden), w("wh", hidden, vocab),
             ints("q_shape", [0, 0, 4, d]), ints("k_shape", [0, 0, 2, d]), ints("v_shape", [0, 0, 2, d]),
             ints("a_shape", [0, 0, 4 * d])]
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    cache = ["batch", 2, "past_sequence_length", d]
    present = ["batch", 2, "past_sequence_length + sequence_length", d]
    graph = helper.make_graph(
        nodes, "att4d", [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence_length"]),
                         helper.make_tensor_value_info("past_key_values.0.key", f, cache),
                         helper.make_tensor_value_info("past_key_values.0.value", f, cache)],
        [helper.make_tensor_value_info("logits", f, ["batch", "sequence_length", vocab]),
         helper.make_tensor_value_info("present.0.key", f, present),
         helper.make_tensor_value_info("present.0.value", f, present)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_4d_attention_with_a_cache_widens_exactly(tmp_path):
    source, out = tmp_path / "src.onnx", tmp_path / "wide.onnx"
    onnx.save(attention_4d_with_cache(), source)
    config = onnxgrow.inspect(source)
    assert (config["num_heads"], config["num_kv_heads"], config["head_dim"]) == (4, 2, 2)
    onnx.save(onnxgrow.widen(source, 2), out)
    report = validate(source, out, shapes=((1, 5), (2, 7)))
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    wide = onnxgrow.inspect(out)
    assert (wide["num_heads"], wide["num_kv_heads"]) == (8, 4)


def test_default_validation_compares_where_onnx_runtime_runs_the_source(zoo, tmp_path):
    """ONNX Runtime 1.32 runs the Llama form at batch 1 only: widen's own check (validate's default
    shapes, batch 1 to 3) compares at the batch-1 shape and says so, instead of failing on the source."""
    source, out = zoo_model(zoo, "llama-gqa-dynamo23"), tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(source, 2), out)
    report = validate(source, out)
    assert report.passed and [c["input_ids"][0] for c in report.cases] == [1]
    with pytest.raises(OnnxgrowError, match="cannot run .* at any of the shapes asked"):
        validate(source, out, shapes=((2, 5), (3, 7)))
