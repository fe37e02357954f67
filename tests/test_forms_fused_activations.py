"""onnxruntime.transformers.optimizer's other activation fusions, each in a whole BERT (#14): with BiasGelu
fusion off the erf GELU becomes com.microsoft Gelu after a plain bias Add (bert-gelu-ortopt-ts17); a
CLIP-style quick_gelu, x * sigmoid(1.702 x), becomes com.microsoft QuickGelu (bert-quickgelu-ortopt-ts17).
Both also carry SkipLayerNormalization.

Every command runs on each form; the exact ones stay exact, and the output keeps the fused activation.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from rich.console import Console

import onnxgrow
from onnxgrow import modelio
from onnxgrow.verify import plan_inputs, run_model, validate
from helpers import assert_close_to_scale, zoo_model

FORMS = {"bert-gelu-ortopt-ts17": ("Gelu", "gelu"), "bert-quickgelu-ortopt-ts17": ("QuickGelu", "quick_gelu")}
KEYS = ["hidden_size", "num_layers", "num_heads", "head_dim", "ffn_size", "vocab_size", "max_positions",
        "norm", "norm_position", "positional", "num_parameters"]


def count(path, op: str) -> int:
    return sum(n.op_type == op and n.domain == "com.microsoft" for n in onnx.load(str(path)).graph.node)


def save_and_validate(model: onnx.ModelProto, source, out, tolerance=None):
    modelio.save(modelio.as_ir(model), out)
    return validate(source, out, tolerance=tolerance)


@pytest.mark.parametrize("name", FORMS)
def test_inspect_gives_the_true_configuration(zoo, name):
    source, config = zoo_model(zoo, name), zoo[name]["config"]
    op, activation = FORMS[name]
    assert count(source, op) == config["num_layers"]  # the optimizer did fuse, once per layer
    got = onnxgrow.inspect(source)
    assert {k: got[k] for k in KEYS} == {k: config[k] for k in KEYS}
    assert got["activation"] == activation == config["activation"]


@pytest.mark.parametrize("name", FORMS)
def test_hypercloning_x2_is_exact_and_keeps_the_op(zoo, name, tmp_path):
    source, config = zoo_model(zoo, name), zoo[name]["config"]
    out = tmp_path / "wide.onnx"
    report = save_and_validate(onnxgrow.widen(source, 2), source, out)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report, rtol=1e-4)
    assert onnxgrow.inspect(out)["ffn_size"] == 2 * config["ffn_size"]
    assert count(out, FORMS[name][0]) == config["num_layers"]


@pytest.mark.parametrize("name", FORMS)
def test_identity_deepen_is_refused_as_post_norm(zoo, name):
    with pytest.raises(onnxgrow.errors.OnnxgrowError, match="post-norm"):
        onnxgrow.deepen(zoo_model(zoo, name), factor=2)


@pytest.mark.parametrize("name", FORMS)
def test_other_widenings_and_deepenings_run_and_validate(zoo, name, tmp_path):
    source, config = zoo_model(zoo, name), zoo[name]["config"]
    op = FORMS[name][0]
    for method in ("fpi", "aki", "pad"):
        out = tmp_path / f"{method}.onnx"
        report = save_and_validate(onnxgrow.widen(source, method=method, hidden=96, heads=6, ffn=240), source, out,
                                   tolerance=1e9)
        assert all(np.isfinite(o.max_abs_diff) and o.cosine > 0.5 for o in report.outputs), method
        assert (onnxgrow.inspect(out)["ffn_size"], count(out, op)) == (240, config["num_layers"])
    for method in ("stack", "interleave"):
        out = tmp_path / f"{method}.onnx"
        report = save_and_validate(onnxgrow.deepen(source, 3, method=method), source, out, tolerance=1e9)
        assert all(np.isfinite(o.max_abs_diff) for o in report.outputs), method
        assert (onnxgrow.inspect(out)["num_layers"], count(out, op)) == (3, 3)


@pytest.mark.parametrize("name", FORMS)
def test_subclone_and_train_run(zoo, name, tmp_path):
    source, config = zoo_model(zoo, name), zoo[name]["config"]
    op = FORMS[name][0]
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], 4000)
    small = tmp_path / "small.onnx"
    onnx.save(onnxgrow.subclone(source, ids, samples=6, seq=16, hidden=32, layers=1, provider="cpu"), small)
    assert (onnxgrow.inspect(small)["hidden_size"], count(small, op)) == (32, 1)
    assert all(np.isfinite(o.max_abs_diff) for o in validate(source, small).outputs)

    text, trained = tmp_path / "text.txt", tmp_path / "trained.onnx"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    onnxgrow.train(source, text, use_bytes=True, steps=2, device="cpu", seq=16, batch=2, output=trained,
                   checkpoint_every=0, console=Console(file=io.StringIO()))
    feeds = plan_inputs(modelio.load(trained)).make(2, 7)
    after, before = run_model(trained, feeds, "cpu"), run_model(source, feeds, "cpu")
    assert all(np.isfinite(v).all() for v in after.values())
    assert any(not np.allclose(after[k], before[k]) for k in before)  # the weights moved
    assert count(trained, op) == config["num_layers"]
