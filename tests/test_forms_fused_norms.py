"""onnxruntime.transformers.optimizer's fused norms and activations (#14, item 2): GPT-2, BERT and a
Llama-family export after the optimizer with attention fusion off, so they carry SkipLayerNormalization
(output 3 is the residual stream), SkipSimplifiedLayerNormalization, SimplifiedLayerNormalization
(default domain), FastGelu and BiasGelu around a plain attention.

Every command runs on each form; the exact ones stay exact, and the output keeps the fused ops.
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
from onnxgrow.verify import plan_inputs, run_model
from onnxgrow.weights import export_weights
from onnxgrow.verify import validate
from helpers import assert_close_to_scale, zoo_model

FORMS = ["gpt2-ortopt-ts17", "bert-ortopt-ts17", "llama-gqa-ortopt-ts17"]
PRE_NORM = [n for n in FORMS if not n.startswith("bert")]
KEYS = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "vocab_size",
        "norm", "norm_position", "positional", "tied_embeddings", "parallel_residual"]
FUSED = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu", "BiasGelu"}
ACTIVATION = {"gpt2-ortopt-ts17": "gelu_new", "bert-ortopt-ts17": "gelu", "llama-gqa-ortopt-ts17": "silu"}


def fused_ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in FUSED)


def save_and_validate(model: onnx.ModelProto, source, out):
    """Save, check as onnxgrow checks what it writes (ONNX Runtime's default-domain
    SimplifiedLayerNormalization set aside), and validate against the source."""
    modelio.save(modelio.as_ir(model), out)
    return validate(source, out)


def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    return path


@pytest.mark.parametrize("name", FORMS)
def test_inspect_gives_the_true_configuration(zoo, name):
    got, expected = onnxgrow.inspect(zoo_model(zoo, name)), zoo[name]["config"]
    assert {k: got[k] for k in KEYS} == {k: expected[k] for k in KEYS}
    assert got["activation"] == ACTIVATION[name]
    assert fused_ops(zoo_model(zoo, name))  # the optimizer did fuse


@pytest.mark.parametrize("name", FORMS)
def test_hypercloning_x2_is_exact_and_stays_fused(zoo, tmp_path, name):
    source, out = zoo_model(zoo, name), tmp_path / "wide.onnx"
    report = save_and_validate(onnxgrow.widen(source, 2), source, out)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    assert onnxgrow.inspect(out)["hidden_size"] == 2 * zoo[name]["config"]["hidden_size"]
    assert fused_ops(out) == fused_ops(source)


@pytest.mark.parametrize("name", PRE_NORM)
def test_identity_deepen_x2_is_exact_and_stays_fused(zoo, tmp_path, name):
    source, out = zoo_model(zoo, name), tmp_path / "deep.onnx"
    report = save_and_validate(onnxgrow.deepen(source, factor=2), source, out)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    assert onnxgrow.inspect(out)["num_layers"] == 4
    # every block boundary fused again: twice the Skip norms of the source's blocks, and the final one
    before, after = fused_ops(source), fused_ops(out)
    assert {op: after[op] for op in after} == {op: 2 * n if "Gelu" in op else 2 * n for op, n in before.items()}


def test_post_norm_bert_refuses_identity_blocks(zoo):
    with pytest.raises(onnxgrow.errors.OnnxgrowError, match="post-norm"):
        onnxgrow.deepen(zoo_model(zoo, "bert-ortopt-ts17"), factor=2)


@pytest.mark.parametrize("name", FORMS)
def test_any_size_widening_runs_and_validates(zoo, tmp_path, name):
    c, source = zoo[name]["config"], zoo_model(zoo, name)
    target = dict(hidden=c["hidden_size"] * 3 // 2, heads=c["num_heads"] * 3 // 2,
                  kv_heads=c["num_kv_heads"] * 3 // 2, ffn=c["ffn_size"] * 3 // 2)
    for method in ("fpi", "aki", "pad"):
        out = tmp_path / f"{method}.onnx"
        report = save_and_validate(onnxgrow.widen(source, method=method, **target), source, out)
        assert all(np.isfinite(o.max_abs_diff) and o.cosine > 0.5 for o in report.outputs), method
        assert onnxgrow.inspect(out)["hidden_size"] == target["hidden"], method
        assert fused_ops(out) == fused_ops(source), method


@pytest.mark.parametrize("name", FORMS)
def test_stack_and_interleave_run_validate_and_stay_fused(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    for method in ("stack", "interleave"):
        out = tmp_path / f"{method}.onnx"
        report = save_and_validate(onnxgrow.deepen(source, 3, method=method), source, out)
        assert all(o.cosine is not None and np.isfinite(o.max_abs_diff) for o in report.outputs), method
        assert onnxgrow.inspect(out)["num_layers"] == 3
        assert {"LayerNormalization", "SimplifiedLayerNormalization"} & {n.op_type for n in onnx.load(str(out)).graph.node}
        assert sum(fused_ops(out).values()) > sum(fused_ops(source).values()), method


@pytest.mark.parametrize("name", FORMS)
def test_subclone_runs(zoo, tmp_path, name):
    c, source = zoo[name]["config"], zoo_model(zoo, name)
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], 4000)
    small = onnxgrow.subclone(source, ids, samples=6, seq=16, hidden=c["hidden_size"] // 2, layers=1, provider="cpu")
    out = tmp_path / "small.onnx"
    onnx.save(small, str(out))
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"]) == (c["hidden_size"] // 2, 1)
    assert all(np.isfinite(o.max_abs_diff) for o in onnxgrow.validate(source, out).outputs)


@pytest.mark.parametrize("name", FORMS)
def test_subclone_keeping_every_block_keeps_the_fused_form(zoo, tmp_path, name):
    c, source = zoo[name]["config"], zoo_model(zoo, name)
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], 4000)
    out = tmp_path / "small.onnx"
    onnx.save(onnxgrow.subclone(source, ids, samples=6, seq=16, hidden=c["hidden_size"] // 2, provider="cpu"), out)
    assert fused_ops(out) == fused_ops(source)
    assert onnxgrow.inspect(out)["hidden_size"] == c["hidden_size"] // 2


@pytest.mark.parametrize("name", FORMS)
def test_train_two_steps_writes_a_fused_model_ort_runs(zoo, tmp_path, name):
    out = tmp_path / "trained.onnx"
    onnxgrow.train(zoo_model(zoo, name), text_file(tmp_path), use_bytes=True, steps=2, device="cpu", seq=16,
                   batch=2, output=out, checkpoint_every=0, console=Console(file=io.StringIO()))
    outputs = run_model(out, plan_inputs(modelio.load(out)).make(2, 7), "cpu")
    assert all(np.isfinite(v).all() for v in outputs.values())
    assert fused_ops(out) == fused_ops(zoo_model(zoo, name))


@pytest.mark.parametrize("name", FORMS)
def test_export_weights_names_every_role(zoo, tmp_path, name):
    tensors = load_file(str(export_weights(zoo_model(zoo, name), tmp_path / "w.safetensors")))
    c = zoo[name]["config"]
    assert tensors["embed.tokens"].shape == (c["vocab_size"], c["hidden_size"])
    assert len([k for k in tensors if k.startswith("layers.")]) > 0
