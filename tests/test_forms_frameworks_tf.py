"""Transformers exported by TensorFlow's own tools (models/frameworks/, built by models/build_frameworks.py).

- tf2onnx 1.17 on transformers' TFGPT2LMHeadModel (opset 17): LayerNorm's moments are GlobalAveragePool
  over the hidden axis then Sub, Mul, Sqrt, Reciprocal (TensorFlow's batch-norm arithmetic); the tied
  head is a folded, transposed copy of the token table stored [1, hidden, vocab].
- Keras 3.15's model.export(format="onnx") (TensorFlow backend) of a Keras-layers GPT and a BERT-style
  encoder: int32 ids wrapped for negative indices before the Gather, MultiHeadAttention's einsums
  written as Gemm(transB) over reshaped kernels, the same LayerNorm moments.

Every command runs on each form; the exact methods are checked against the source in ONNX Runtime.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

import onnxgrow
from onnxgrow import modelio
from onnxgrow.cli import app
from onnxgrow.errors import OnnxgrowError
from onnxgrow.subcloning import subclone_ir
from onnxgrow.verify import make_inputs, run_model, validate
from helpers import assert_close_to_scale

FRAMEWORKS = Path(__file__).resolve().parents[1] / "models" / "frameworks"
# the true configuration of each form (models/build_frameworks.py)
CONFIGS = {
    # GPT-2: tables 256x32 + 64x32, per layer 2 norms, qkv 32x96+96, o 32x32+32, FFN 32x64+64 and 64x32+32; ln_f
    "tf2onnx-gpt2": dict(hidden_size=32, num_heads=4, num_layers=2, ffn_size=64, vocab_size=256,
                         num_parameters=27392),
    # Keras: the same tables, per layer q, k, v, o with biases, 2 norms, FFN; a norm and a head 32x256+256
    "keras-gpt": dict(hidden_size=32, num_heads=4, num_layers=2, ffn_size=64, vocab_size=256,
                      num_parameters=35584),
    "keras-bert": dict(hidden_size=32, num_heads=4, num_layers=2, ffn_size=64, vocab_size=256,
                       num_parameters=35584),
}
FORMS = sorted(CONFIGS)
PRE_NORM = ["keras-gpt", "tf2onnx-gpt2"]  # identity blocks exist for pre-norm models only
SHAPES = ((1, 5), (2, 9))
RTOL = 1e-4  # the bound: logits within 1e-4 relative to the source


def path(name: str) -> Path:
    return FRAMEWORKS / f"{name}.onnx"


def ops(p) -> set[str]:
    return {n.op_type for n in onnx.load(str(p)).graph.node}


@pytest.mark.parametrize("name", FORMS)
def test_inspect_gives_the_true_configuration(name):
    got = onnxgrow.inspect(path(name))
    assert {k: got[k] for k in CONFIGS[name]} == CONFIGS[name]
    assert got["norm"] == "layernorm" and got["positional"] == "learned"


def test_the_tf2onnx_form_writes_its_norms_as_global_average_pool():
    assert {"GlobalAveragePool", "Reciprocal"} <= ops(path("tf2onnx-gpt2"))
    assert "LayerNormalization" not in ops(path("tf2onnx-gpt2"))


@pytest.mark.parametrize("name", FORMS)
def test_hypercloning_x2_keeps_logits(tmp_path, name):
    out = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(path(name), 2), out)
    report = validate(path(name), out, shapes=SHAPES)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report, rtol=RTOL)
    got, src = onnxgrow.inspect(out), CONFIGS[name]
    assert (got["hidden_size"], got["num_heads"], got["ffn_size"]) == (
        2 * src["hidden_size"], 2 * src["num_heads"], 2 * src["ffn_size"])


@pytest.mark.parametrize("name", PRE_NORM)
def test_identity_deepen_x2_keeps_logits(tmp_path, name):
    out = tmp_path / "deep.onnx"
    onnx.save(onnxgrow.deepen(path(name), factor=2), out)
    report = validate(path(name), out, shapes=SHAPES)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report, rtol=RTOL)
    assert onnxgrow.inspect(out)["num_layers"] == 2 * CONFIGS[name]["num_layers"]


def test_identity_deepen_of_the_post_norm_encoder_is_refused_naming_the_exact_alternative():
    with pytest.raises(OnnxgrowError, match="identity blocks need pre-norm blocks"):
        onnxgrow.deepen(path("keras-bert"), factor=2)


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
@pytest.mark.parametrize("name", FORMS)
def test_other_widths_run_and_validate(tmp_path, name, method):
    out = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(path(name), 2, method=method), out)
    report = validate(path(name), out, shapes=SHAPES, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["hidden_size"] == 2 * CONFIGS[name]["hidden_size"]


@pytest.mark.parametrize("method", ["stack", "interleave"])
@pytest.mark.parametrize("name", FORMS)
def test_other_depths_run_and_validate(tmp_path, name, method):
    out = tmp_path / "deep.onnx"
    onnx.save(onnxgrow.deepen(path(name), factor=2, method=method), out)
    report = validate(path(name), out, shapes=SHAPES, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_layers"] == 2 * CONFIGS[name]["num_layers"]


@pytest.mark.parametrize("name", FORMS)
def test_subclone_half_width_half_depth(tmp_path, name):
    c = CONFIGS[name]
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], (2, 24))
    result = subclone_ir(modelio.load(path(name)), ids, hidden=c["hidden_size"] // 2, layers=c["num_layers"] // 2)
    out = modelio.save(result.model, tmp_path / "sub.onnx")
    report = validate(path(name), out, shapes=SHAPES, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"]) == (c["hidden_size"] // 2, c["num_layers"] // 2)


@pytest.mark.parametrize("name", FORMS)
def test_train_two_steps_writes_a_model_onnxruntime_runs(tmp_path, name):
    from rich.console import Console
    from onnxgrow import training
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "trained.onnx"
    summary = training.train(path(name), text, use_bytes=True, steps=2, batch=2, seq=16, lr=1e-3, output=out,
                             console=Console(file=io.StringIO()))
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    feeds = make_inputs(path(name), 1, 6)
    before = next(iter(run_model(path(name), feeds, "cpu").values()))
    after = next(iter(run_model(out, feeds, "cpu").values()))
    assert np.isfinite(after).all() and not np.allclose(before, after)


@pytest.mark.parametrize("name", FORMS)
def test_export_weights_writes_every_role(tmp_path, name):
    from safetensors.numpy import load_file
    out = tmp_path / "w.safetensors"
    result = CliRunner().invoke(app, ["export-weights", str(path(name)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    weights = load_file(out)
    assert weights["embed.tokens"].shape == (CONFIGS[name]["vocab_size"], CONFIGS[name]["hidden_size"])


def test_a_model_onnx_runtime_cannot_run_is_refused_in_one_line(tmp_path):
    """Keras' exact gelu goes through tf2onnx as a TensorFlow Erfc op no ONNX runtime has."""
    node = helper.make_node("Erfc", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    source = tmp_path / "erfc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), source)
    with pytest.raises(OnnxgrowError) as e:
        onnxgrow.inspect(source)
    assert "Erfc" in str(e.value) and "\n" not in str(e.value)


# --- the bridge's ops against ONNX Runtime ------------------------------------------------------------------

def one_node(node, feeds: dict, opset: int) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, v.shape) for k, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)]
    proto = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return proto


RNG = np.random.default_rng(19)
BRIDGE_CASES = {
    "global-average-pool-3d": (helper.make_node("GlobalAveragePool", ["x"], ["y"]),
                               dict(x=RNG.standard_normal((2, 5, 32)).astype(np.float32))),
    "global-average-pool-4d": (helper.make_node("GlobalAveragePool", ["x"], ["y"]),
                               dict(x=RNG.standard_normal((2, 3, 4, 8)).astype(np.float32))),
    "einsum-projection-3d-kernel": (helper.make_node("Einsum", ["x", "w"], ["y"], equation="abc,cde->abde"),
                                    dict(x=RNG.standard_normal((2, 5, 32)).astype(np.float32),
                                         w=RNG.standard_normal((32, 4, 8)).astype(np.float32))),
}


@pytest.mark.parametrize("case", sorted(BRIDGE_CASES))
def test_bridge_op_matches_onnxruntime(case):
    import onnxruntime as ort
    from onnxgrow.bridge import to_torch
    node, feeds = BRIDGE_CASES[case]
    proto = one_node(node, feeds, 17)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    import torch
    got = next(iter(to_torch(proto)(**{k: torch.from_numpy(v) for k, v in feeds.items()}).values()))
    got = got.detach().numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_einsum_projection_by_a_3d_kernel_is_followed():
    """Keras' MultiHeadAttention projects with einsum "abc,cde->abde" by a [hidden, heads, head_dim]
    kernel: the dataflow gives the output the kernel's heads and head_dim, and hidden is summed over."""
    import onnx_ir as ir
    from onnxgrow.dims import same
    from onnxgrow.shapeflow import analyse
    kernel = onnx.numpy_helper.from_array(RNG.standard_normal((32, 4, 8)).astype(np.float32), "kernel")
    node = helper.make_node("Einsum", ["x", "kernel"], ["y"], equation="abc,cde->abde")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", "s", 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [kernel])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    flow = analyse(model)
    assert not flow.problems
    x, w, y = (flow.dims[v] for v in (model.graph.inputs[0], model.graph.initializers["kernel"], model.graph.outputs[0]))
    assert same(x[2], w[0]) and same(y[2], w[1]) and same(y[3], w[2]) and same(y[0], x[0])
    assert flow.contracted["kernel"] == {0}


# --- MultiHeadAttention's einsums kept as Einsum: 3-D kernels [hidden, heads, head_dim], biases [heads, head_dim]

def einsum_gpt(path: Path) -> Path:
    """One pre-norm block as Keras' MultiHeadAttention computes it, with its einsums left as Einsum nodes
    (tf2onnx rewrote them to Gemm over reshaped kernels in the exports above): hidden 16, 4 heads of 4."""
    rng = np.random.default_rng(7)
    hidden, heads, head_dim, ffn, vocab = 16, 4, 4, 32, 256

    def w(name, *shape, scale=0.3, offset=0.0):
        return onnx.numpy_helper.from_array((offset + rng.normal(0, scale, shape)).astype(np.float32), name)
    make = helper.make_node
    nodes = [make("Cast", ["ids"], ["ids64"], to=onnx.TensorProto.INT64), make("Gather", ["emb", "ids64"], ["x"]),
             make("LayerNormalization", ["x", "g1", "b1"], ["h"], axis=-1)]
    for name in "qkv":
        nodes += [make("Einsum", ["h", f"w{name}"], [f"{name}0"], equation="abc,cde->abde"),
                  make("Add", [f"{name}0", f"b{name}"], [name])]
    nodes += [make("Transpose", ["q"], ["qt"], perm=[0, 2, 1, 3]), make("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1]),
              make("Transpose", ["v"], ["vt"], perm=[0, 2, 1, 3]), make("MatMul", ["qt", "kt"], ["s0"]),
              make("Mul", ["s0", "scale"], ["s"]), make("Softmax", ["s"], ["p"], axis=-1),
              make("MatMul", ["p", "vt"], ["c"]), make("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
              make("Einsum", ["ct", "wo"], ["o0"], equation="abcd,cde->abe"), make("Add", ["o0", "bo"], ["o"]),
              make("Add", ["x", "o"], ["r"]), make("LayerNormalization", ["r", "g2", "b2"], ["h2"], axis=-1),
              make("MatMul", ["h2", "wu"], ["u0"]), make("Add", ["u0", "bu"], ["u"]), make("Relu", ["u"], ["a"]),
              make("MatMul", ["a", "wd"], ["d0"]), make("Add", ["d0", "bd"], ["d"]), make("Add", ["r", "d"], ["r2"]),
              make("LayerNormalization", ["r2", "gf", "bf"], ["hf"], axis=-1), make("MatMul", ["hf", "wh"], ["logits"])]
    inits = [w("emb", vocab, hidden), w("g1", hidden, offset=1.0, scale=0.1), w("b1", hidden, scale=0.1),
             *[w(f"w{n}", hidden, heads, head_dim) for n in "qkv"], *[w(f"b{n}", heads, head_dim, scale=0.1) for n in "qkv"],
             onnx.numpy_helper.from_array(np.array(head_dim ** -0.5, np.float32), "scale"),
             w("wo", heads, head_dim, hidden), w("bo", hidden, scale=0.1), w("g2", hidden, offset=1.0, scale=0.1),
             w("b2", hidden, scale=0.1), w("wu", hidden, ffn), w("bu", ffn, scale=0.1), w("wd", ffn, hidden),
             w("bd", hidden, scale=0.1), w("gf", hidden, offset=1.0, scale=0.1), w("bf", hidden, scale=0.1),
             w("wh", hidden, vocab)]
    graph = helper.make_graph(nodes, "einsum-gpt",
                              [helper.make_tensor_value_info("ids", onnx.TensorProto.INT32, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "sequence", vocab])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_einsum_form_gives_its_configuration(tmp_path):
    got = onnxgrow.inspect(einsum_gpt(tmp_path / "einsum.onnx"))
    assert (got["hidden_size"], got["num_heads"], got["head_dim"], got["ffn_size"], got["vocab_size"]) == (16, 4, 4, 32, 256)


def test_einsum_form_hypercloning_resizes_the_3d_kernels_on_their_heads_and_hidden_axes(tmp_path):
    source, out = einsum_gpt(tmp_path / "einsum.onnx"), tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(source, 2), out)
    report = validate(source, out, shapes=SHAPES)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report, rtol=RTOL)
    shapes = {t.name: list(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert shapes["wq"] == [32, 8, 4] and shapes["bq"] == [8, 4] and shapes["wo"] == [8, 4, 32]


def test_einsum_form_deepens_exactly_and_trains(tmp_path):
    from rich.console import Console
    from onnxgrow import training
    source, deep = einsum_gpt(tmp_path / "einsum.onnx"), tmp_path / "deep.onnx"
    onnx.save(onnxgrow.deepen(source, factor=2), deep)
    report = validate(source, deep, shapes=SHAPES)
    assert report.passed and all(o.max_abs_diff == 0.0 for o in report.outputs), report.to_dict()
    text = tmp_path / "text.txt"
    text.write_text("abcdefghij" * 40, encoding="utf-8")
    trained = tmp_path / "trained.onnx"
    summary = training.train(source, text, use_bytes=True, steps=2, batch=2, seq=8, lr=1e-2, output=trained,
                             console=Console(file=io.StringIO()))
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    feeds = make_inputs(source, 1, 6)
    assert not np.allclose(run_model(source, feeds, "cpu")["logits"], run_model(trained, feeds, "cpu")["logits"])
