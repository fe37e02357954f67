"""com.microsoft Attention: the one-node attention onnxruntime.transformers.optimizer writes for BERT, with
the Q, K and V projections inside the op (a packed [hidden, q | k | v] weight and bias, num_heads).

Only attention fusion is switched on here (the fused norms and activations are another form's tests), so
the model differs from the zoo's BERT in that one place.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close_to_scale, zoo_model
from rich.console import Console

import onnxgrow
from onnxgrow import bridge, modelio, training
from onnxgrow.verify import plan_inputs, run_model, validate


def attention_fused_bert(zoo, folder, multi_head: bool = False):
    """(path, config) of the zoo's bert-ts17 after ORT's optimizer with only attention fusion on: into
    com.microsoft Attention, or with `multi_head` into MultiHeadAttention."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    from onnxruntime.transformers.fusion_options import FusionOptions
    options = FusionOptions("bert")
    options.use_multi_head_attention = multi_head
    for name in ("enable_embed_layer_norm", "enable_skip_layer_norm", "enable_bias_skip_layer_norm",
                 "enable_bias_gelu", "enable_gelu", "enable_layer_norm"):
        setattr(options, name, False)
    config = zoo["bert-ts17"]["config"]
    fused = optimizer.optimize_model(str(zoo_model(zoo, "bert-ts17")), model_type="bert", opt_level=0,
                                     num_heads=config["num_heads"], hidden_size=config["hidden_size"],
                                     optimization_options=options)
    path = folder / "bert-attention.onnx"
    fused.save_model_to_file(str(path))
    return path, config


@pytest.fixture(scope="module")
def fused_bert(zoo, tmp_path_factory):
    path, config = attention_fused_bert(zoo, tmp_path_factory.mktemp("fused"))
    attentions = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"]
    assert len(attentions) == config["num_layers"] and attentions[0].domain == "com.microsoft"
    return path, config


def test_inspect_gives_the_true_configuration(fused_bert):
    path, config = fused_bert
    got = onnxgrow.inspect(path)
    assert {k: got[k] for k in config if k in got} == {k: config[k] for k in config if k in got}


def test_hypercloning_x2_is_exact_and_doubles_num_heads(fused_bert, tmp_path):
    path, config = fused_bert
    out = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(path, 2), out)
    report = validate(path, out)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    assert max(o.max_abs_diff for o in report.outputs) <= 1e-4
    heads = [a.i for n in onnx.load(str(out)).graph.node if n.op_type == "Attention" for a in n.attribute
             if a.name == "num_heads"]
    assert heads == [2 * config["num_heads"]] * config["num_layers"]


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
def test_other_widths_run(fused_bert, tmp_path, method):
    path, config = fused_bert
    out = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(path, 2, method=method), out)
    report = validate(path, out, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_heads"] == 2 * config["num_heads"]


@pytest.mark.parametrize("method", ["stack", "interleave"])
def test_post_norm_deepens_by_copies(fused_bert, tmp_path, method):
    path, config = fused_bert
    out = tmp_path / "deep.onnx"
    onnx.save(onnxgrow.deepen(path, factor=2, method=method), out)
    report = validate(path, out, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_layers"] == 2 * config["num_layers"]


def test_train_two_steps_keeps_the_fused_attention_and_onnxruntime_runs_it(fused_bert, tmp_path):
    """train runs com.microsoft Attention in the torch bridge (whose forward agrees with ONNX Runtime on a
    right-padded batch, the [batch] mask_index the fusion writes) and writes the trained model fused."""
    path, config = fused_bert
    feeds = plan_inputs(modelio.load(path)).make(2, 12)
    feeds["attention_mask"][1, 8:] = 0  # right padding: mask_index is each row's length
    with torch.no_grad():
        got = bridge.to_torch(onnx.load(str(path)))(**feeds)
    want = run_model(path, feeds, "cpu")
    for name, g in got.items():
        assert np.abs(g.numpy() - want[name]).max() <= 1e-4 * max(1.0, np.abs(want[name]).max())

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    out = tmp_path / "trained.onnx"
    summary = training.train(path, text, use_bytes=True, steps=2, batch=2, seq=16, device="cpu", output=out,
                             checkpoint_every=0, console=Console(file=io.StringIO()))
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    attentions = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Attention"]
    assert len(attentions) == config["num_layers"] and all(n.domain == "com.microsoft" for n in attentions)
    trained, before = run_model(out, feeds, "cpu"), run_model(path, feeds, "cpu")
    assert all(np.isfinite(v).all() for v in trained.values())
    assert any(not np.allclose(trained[k], before[k]) for k in before)  # the weights moved


def test_qkv_hidden_sizes_are_rewritten_with_the_widths(fused_bert, tmp_path):
    """An Attention that names its q, k and v widths (qkv_hidden_sizes) widens exactly, and the list
    follows: [64, 64, 64] -> [128, 128, 128]."""
    path, config = fused_bert
    model = onnx.load(str(path))
    hidden = config["hidden_size"]
    for node in model.graph.node:
        if node.op_type == "Attention":
            node.attribute.append(onnx.helper.make_attribute("qkv_hidden_sizes", [hidden] * 3))
    source, out = tmp_path / "named.onnx", tmp_path / "wide.onnx"
    onnx.save(model, source)
    onnx.save(onnxgrow.widen(source, 2), out)
    report = validate(source, out)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    sizes = [list(a.ints) for n in onnx.load(str(out)).graph.node if n.op_type == "Attention" for a in n.attribute
             if a.name == "qkv_hidden_sizes"]
    assert sizes == [[2 * hidden] * 3] * config["num_layers"]


# --- MultiHeadAttention: the same fusion with use_multi_head_attention -------------------------------------
# The projections stay MatMuls; their biases move into the op as one [q | k | v] bias.


@pytest.fixture(scope="module")
def mha_bert(zoo, tmp_path_factory):
    path, config = attention_fused_bert(zoo, tmp_path_factory.mktemp("mha"), multi_head=True)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MultiHeadAttention"]
    assert len(nodes) == config["num_layers"] and len(nodes[0].input) > 3 and nodes[0].input[3]  # with its bias
    return path, config


def test_multi_head_attention_every_command(mha_bert, tmp_path):
    """inspect, hypercloning x2 (exact: the [q | k | v] bias inside the op is widened with q, k and v),
    fpi/aki/pad/stack/interleave, subclone and train on a BERT whose attention is MultiHeadAttention."""
    path, config = mha_bert
    got = onnxgrow.inspect(path)
    assert {k: got[k] for k in ("hidden_size", "num_heads", "num_layers", "ffn_size", "vocab_size")} == \
        {k: config[k] for k in ("hidden_size", "num_heads", "num_layers", "ffn_size", "vocab_size")}
    wide = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(path, 2), wide)
    report = validate(path, wide)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    for method in ("fpi", "aki", "pad"):
        onnx.save(onnxgrow.widen(path, method=method, hidden=96, heads=6, ffn=240), tmp_path / f"{method}.onnx")
        assert all(np.isfinite(o.max_abs_diff) for o in validate(path, tmp_path / f"{method}.onnx").outputs)
    for method in ("stack", "interleave"):
        onnx.save(onnxgrow.deepen(path, factor=2, method=method), tmp_path / f"{method}.onnx")
        assert onnxgrow.inspect(tmp_path / f"{method}.onnx")["num_layers"] == 2 * config["num_layers"]
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], 3000)
    small = tmp_path / "small.onnx"
    onnx.save(onnxgrow.subclone(path, ids, samples=6, seq=16, hidden=32, layers=1, provider="cpu"), small)
    assert onnxgrow.inspect(small)["hidden_size"] == 32
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    summary = training.train(path, text, use_bytes=True, steps=2, batch=2, seq=16, device="cpu",
                             output=tmp_path / "trained.onnx", checkpoint_every=0, console=Console(file=io.StringIO()))
    assert all(np.isfinite(summary["losses"]))
    assert [n.op_type for n in onnx.load(str(tmp_path / "trained.onnx")).graph.node].count("MultiHeadAttention") == \
        config["num_layers"]
