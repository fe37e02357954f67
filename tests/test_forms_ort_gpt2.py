"""GPT-2 in the form ONNX Runtime's GPT-2 tooling writes (#14): a com.microsoft Attention per layer with
unidirectional=1 and the KV cache as one past_i / present_i per layer in the packed [2, batch, heads,
sequence, head] layout, SkipLayerNormalization and FastGelu around it (models/ort_gpt2.py writes it from a
transformers GPT-2's weights; build.verify checks it against PyTorch with and without a past).

Every command runs on the form; the exact ones stay exact within 1e-4 of the logits' scale, and the output
keeps the fused ops and the packed cache.
"""

from __future__ import annotations

import collections
import io

import numpy as np
import onnx
import pytest
from rich.console import Console

import onnxgrow
from onnxgrow import modelio
from onnxgrow.verify import plan_inputs, run_model, validate
from helpers import assert_close_to_scale, zoo_model

NAME = "gpt2-ortattention"
KEYS = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "vocab_size",
        "max_positions", "norm", "norm_position", "positional", "tied_embeddings", "parallel_residual",
        "num_parameters"]
FUSED = {"Attention", "SkipLayerNormalization", "FastGelu"}


def fused_ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node
                               if n.op_type in FUSED and n.domain == "com.microsoft")


def caches(path) -> list[list]:
    """The shapes of the cache inputs and outputs, as [2, batch, heads, seq, head] with names or sizes."""
    graph = onnx.load(str(path)).graph
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output) if v.name.startswith(("past", "present"))]


def save_and_validate(model: onnx.ModelProto, source, out, tolerance=None):
    modelio.save(modelio.as_ir(model), out)
    return validate(source, out, tolerance=tolerance)


@pytest.fixture(scope="module")
def form(zoo):
    return zoo_model(zoo, NAME), zoo[NAME]["config"]


def test_the_form_is_ort_fused_gpt2_with_a_packed_cache(form):
    source, config = form
    layers = config["num_layers"]
    assert fused_ops(source) == {"Attention": layers, "SkipLayerNormalization": 2 * layers + 1, "FastGelu": layers}
    attention = next(n for n in onnx.load(str(source)).graph.node if n.op_type == "Attention")
    assert {a.name: a.i for a in attention.attribute} == {"num_heads": config["num_heads"], "unidirectional": 1}
    assert caches(source)[0][0] == 2 and len(caches(source)) == 2 * layers


def test_inspect_gives_the_true_configuration(form):
    source, config = form
    got = onnxgrow.inspect(source)
    assert {k: got[k] for k in KEYS} == {k: config[k] for k in KEYS}
    assert got["activation"] == "gelu_new"


def test_hypercloning_x2_is_exact_with_a_past(form, tmp_path):
    """validate feeds a past of 3 tokens: the widened presents hold the source's keys and values in each
    copy, and the logits agree within 1e-4 of their scale."""
    source, config = form
    out = tmp_path / "wide.onnx"
    report = save_and_validate(onnxgrow.widen(source, 2), source, out)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report, rtol=1e-4)
    assert {o.name for o in report.outputs} >= {"logits", "present_0"}
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_heads"], got["head_dim"]) == (128, 8, 16)
    assert fused_ops(out) == fused_ops(source)
    assert all(shape[2] == 2 * config["num_heads"] for shape in caches(out))


def test_identity_deepen_x2_is_exact_and_adds_caches(form, tmp_path):
    source, config = form
    out = tmp_path / "deep.onnx"
    report = save_and_validate(onnxgrow.deepen(source, factor=2), source, out)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report, rtol=1e-4)
    assert onnxgrow.inspect(out)["num_layers"] == 2 * config["num_layers"]
    assert fused_ops(out)["Attention"] == 2 * config["num_layers"]
    assert len(caches(out)) == 4 * config["num_layers"]
    # every new layer reads and writes a cache ONNX Runtime accepts: run it with a past of 5
    feeds = plan_inputs(modelio.load(out)).make(2, 4, past_length=5)
    outputs = run_model(out, feeds, "cpu")
    assert all(v.shape[3] == 9 for k, v in outputs.items() if k.startswith("present"))


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
def test_any_size_widening_runs_and_validates(form, tmp_path, method):
    source, c = form
    out = tmp_path / f"{method}.onnx"
    report = save_and_validate(onnxgrow.widen(source, method=method, hidden=96, heads=6, ffn=240), source, out,
                               tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_heads"]) == (96, 6)
    assert all(shape[2] == 6 for shape in caches(out))


@pytest.mark.parametrize("method", ["stack", "interleave"])
def test_deepening_by_copies_runs_and_validates(form, tmp_path, method):
    source, c = form
    out = tmp_path / f"{method}.onnx"
    report = save_and_validate(onnxgrow.deepen(source, 5, method=method), source, out, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_layers"] == 5
    assert fused_ops(out)["Attention"] == 5 and len(caches(out)) == 10


def test_subclone_runs(form, tmp_path):
    source, c = form
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], 4000)
    small = onnxgrow.subclone(source, ids, samples=6, seq=16, hidden=32, layers=2, provider="cpu")
    out = tmp_path / "small.onnx"
    onnx.save(small, str(out))
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"]) == (32, 2)
    assert all(np.isfinite(o.max_abs_diff) for o in onnxgrow.validate(source, out).outputs)
    assert fused_ops(out)["Attention"] == 2


def test_train_two_steps_writes_a_model_ort_runs(form, tmp_path):
    source, _ = form
    text, out = tmp_path / "text.txt", tmp_path / "trained.onnx"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    _, summary = onnxgrow.train(source, text, use_bytes=True, steps=2, device="cpu", seq=16, batch=2, output=out,
                                checkpoint_every=0, return_summary=True, console=Console(file=io.StringIO()))
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    feeds = plan_inputs(modelio.load(out)).make(2, 7)
    trained, before = run_model(out, feeds, "cpu"), run_model(source, feeds, "cpu")
    assert all(np.isfinite(v).all() for v in trained.values())
    assert not np.allclose(trained["logits"], before["logits"])  # the weights moved
    assert fused_ops(out) == fused_ops(source)
