"""A fully fused BERT (#14): onnxruntime.transformers.optimizer with its default fusions, so the embeddings
and their norm are one EmbedLayerNormalization (word, position and segment tables, gamma, beta; its
mask_index output feeds the attentions), each attention one com.microsoft Attention (packed QKV weight),
each residual Add + LayerNorm a SkipLayerNormalization and each bias + GELU a BiasGelu.

Every command runs on the form; the exact ones stay exact, and the output keeps the fused ops.
"""

from __future__ import annotations

import collections
import io

import numpy as np
import onnx
import pytest
from rich.console import Console
from safetensors.numpy import load_file

import onnxgrow
from onnxgrow import modelio
from onnxgrow.bridge.ops import OPS
from onnxgrow.verify import plan_inputs, run_model, validate
from onnxgrow.weights import export_weights
from helpers import assert_close_to_scale, zoo_model

NAME = "bert-ortfused-ts17"
KEYS = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "vocab_size",
        "max_positions", "norm", "norm_position", "positional", "tied_embeddings", "parallel_residual"]
FUSED = {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}


def fused_ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node
                               if n.op_type in FUSED and n.domain == "com.microsoft")


def save_and_validate(model: onnx.ModelProto, source, out, tolerance=None):
    modelio.save(modelio.as_ir(model), out)
    return validate(source, out, tolerance=tolerance)


@pytest.fixture(scope="module")
def form(zoo):
    if NAME not in zoo:
        pytest.fail(f"{NAME} did not build (see models/zoo/manifest.json)")
    return zoo_model(zoo, NAME), zoo[NAME]["config"]


@pytest.fixture(scope="module")
def widened(form, tmp_path_factory):
    source, _ = form
    out = tmp_path_factory.mktemp("ortfused") / "wide.onnx"
    return out, save_and_validate(onnxgrow.widen(source, 2), source, out)


def test_the_optimizer_fused_everything(form):
    source, config = form
    layers = config["num_layers"]
    assert fused_ops(source) == {"EmbedLayerNormalization": 1, "Attention": layers,
                                 "SkipLayerNormalization": 2 * layers, "BiasGelu": layers}
    assert not {"Gather", "LayerNormalization", "Softmax"} & {n.op_type for n in onnx.load(str(source)).graph.node}


def test_inspect_gives_the_true_configuration(form):
    source, config = form
    got = onnxgrow.inspect(source)
    assert {k: got[k] for k in KEYS} == {k: config[k] for k in KEYS}
    assert (got["positional"], got["norm_position"], got["activation"]) == ("learned", "post", "gelu")
    assert got["num_parameters"] == config["num_parameters"]  # every table and the embedding norm counted


def test_hypercloning_x2_is_exact_and_stays_fused(form, widened):
    source, config = form
    out, report = widened
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    assert max(o.max_abs_diff for o in report.outputs) <= 1e-4
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_heads"]) == (2 * config["hidden_size"], 2 * config["num_heads"])
    assert fused_ops(out) == fused_ops(source)


def test_hypercloning_widens_every_embedding_table_and_the_embedding_norm(form, widened):
    source, config = form
    out, _ = widened
    embed = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "EmbedLayerNormalization")
    shapes = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
    hidden = 2 * config["hidden_size"]
    assert [shapes[embed.input[i]] for i in (2, 3, 4, 5, 6)] == [
        [config["vocab_size"], hidden], [config["max_positions"], hidden], [config["type_vocab_size"], hidden],
        [hidden], [hidden]]


def test_identity_deepen_is_refused_as_post_norm(form):
    with pytest.raises(onnxgrow.errors.OnnxgrowError, match="post-norm"):
        onnxgrow.deepen(form[0], factor=2)


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
def test_any_size_widening_runs_and_validates(form, tmp_path, method):
    source, c = form
    target = dict(hidden=c["hidden_size"] * 3 // 2, heads=c["num_heads"] * 3 // 2, ffn=c["ffn_size"] * 3 // 2)
    out = tmp_path / f"{method}.onnx"
    report = save_and_validate(onnxgrow.widen(source, method=method, **target), source, out, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) and o.cosine > 0.5 for o in report.outputs)
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_heads"]) == (target["hidden"], target["heads"])
    assert fused_ops(out) == fused_ops(source)


@pytest.mark.parametrize("method", ["stack", "interleave"])
def test_deepening_by_copies_runs_and_validates(form, tmp_path, method):
    source, c = form
    out = tmp_path / f"{method}.onnx"
    report = save_and_validate(onnxgrow.deepen(source, 3, method=method), source, out, tolerance=1e9)
    assert all(o.cosine is not None and np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_layers"] == 3
    ops = fused_ops(out)
    assert (ops["EmbedLayerNormalization"], ops["Attention"]) == (1, 3)


def test_subclone_runs(form, tmp_path):
    source, c = form
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], 4000)
    small = onnxgrow.subclone(source, ids, samples=6, seq=16, hidden=c["hidden_size"] // 2, layers=1, provider="cpu")
    out = tmp_path / "small.onnx"
    onnx.save(small, str(out))
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"]) == (c["hidden_size"] // 2, 1)
    assert all(np.isfinite(o.max_abs_diff) for o in onnxgrow.validate(source, out).outputs)
    assert fused_ops(out)["EmbedLayerNormalization"] == 1


def test_export_weights_names_the_embedding_tables(form, tmp_path):
    source, c = form
    tensors = load_file(str(export_weights(source, tmp_path / "w.safetensors")))
    assert tensors["embed.tokens"].shape == (c["vocab_size"], c["hidden_size"])
    assert tensors["embed.positions"].shape == (c["max_positions"], c["hidden_size"])
    assert tensors["embed.token_types"].shape == (c["type_vocab_size"], c["hidden_size"])
    assert len([k for k in tensors if k.startswith("layers.")]) > 0


def test_train_two_steps_writes_a_fused_model_ort_runs(form, tmp_path):
    if ("com.microsoft", "Attention") not in OPS:
        pytest.skip("the torch bridge has no com.microsoft Attention yet")
    source, _ = form
    text, out = tmp_path / "text.txt", tmp_path / "trained.onnx"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    onnxgrow.train(source, text, use_bytes=True, steps=2, device="cpu", seq=16, batch=2, output=out,
                   checkpoint_every=0, console=Console(file=io.StringIO()))
    outputs = run_model(out, plan_inputs(modelio.load(out)).make(2, 7), "cpu")
    assert all(np.isfinite(v).all() for v in outputs.values())
    assert fused_ops(out) == fused_ops(source)


def test_validate_plans_the_same_inputs_as_for_the_unfused_export(zoo):
    """The ids read by EmbedLayerNormalization index its word and segment tables: validate draws them
    from those tables' rows, as it does for the Gathers of the unfused export."""
    from onnxgrow import modelio
    from onnxgrow.verify import plan_inputs
    plans = [[(s.name, s.kind, s.rows) for s in plan_inputs(modelio.load(zoo_model(zoo, name))).specs]
             for name in ("bert-ts17", "bert-ortfused-ts17")]
    assert plans[0] == plans[1]


def test_stacking_the_fused_export_gives_the_function_of_stacking_the_unfused_one(zoo, tmp_path):
    from onnxgrow import modelio
    from onnxgrow.verify import plan_inputs, run_model
    plain, fused = zoo_model(zoo, "bert-ts17"), zoo_model(zoo, "bert-ortfused-ts17")
    feeds = plan_inputs(modelio.load(plain)).make(2, 7)
    outputs = []
    for source in (plain, fused):
        out = tmp_path / f"{source.parent.name}.onnx"
        onnx.save(onnxgrow.deepen(source, factor=2, method="stack"), out)
        outputs.append(next(iter(run_model(out, feeds, "cpu").values())))
    assert np.abs(outputs[0] - outputs[1]).max() <= 1e-5 * np.abs(outputs[0]).max()
