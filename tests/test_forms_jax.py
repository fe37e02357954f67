"""jax2onnx exports of a Flax NNX GPT: int32 ids, sequence static at 8 or dynamic.

models/frameworks/jax-gpt-*.onnx are written by models/build_jax.py (jax2onnx 0.17.1, opset 23), each
with a .json of its true configuration. What the exporter writes: one input `in_0` of int32 ids
([B, 8] or [B, S]) and one output `out_12`; projections as Reshape -> Gemm -> Reshape; LayerNorm as
ReduceMean moments with Sqrt and Div; positions counted by CumSum over the ids, read from a learned
table of 32 rows; the causal mask and Where before each Softmax.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxgrow
from onnxgrow import modelio
from onnxgrow.errors import OnnxgrowError
from onnxgrow.structure import load_structure
from onnxgrow.subcloning import calibration_windows, subclone_model
from onnxgrow.verify import run_model, validate
from helpers import assert_close_to_scale

FRAMEWORKS = Path(__file__).resolve().parents[1] / "models" / "frameworks"
FORMS = ["jax-gpt-static8", "jax-gpt-dynamic"]
SHAPES = {"jax-gpt-static8": ((1, 8), (3, 8)), "jax-gpt-dynamic": ((1, 5), (2, 9), (3, 16))}
SEQUENCE = {"jax-gpt-static8": 8, "jax-gpt-dynamic": None}


def model(name: str) -> Path:
    return FRAMEWORKS / f"{name}.onnx"


def true_config(name: str) -> dict:
    return json.loads((FRAMEWORKS / f"{name}.json").read_text())


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    return run_model(path, {"in_0": ids}, "cpu")["out_12"]


def ids32(batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (batch, seq)).astype(np.int32)


@pytest.mark.parametrize("name", FORMS)
def test_the_export_has_int32_ids_and_its_sequence_axis(name):
    ids = onnx.load(str(model(name))).graph.input[0].type.tensor_type
    assert ids.elem_type == onnx.TensorProto.INT32
    assert [d.dim_value or d.dim_param for d in ids.shape.dim] == ["B", SEQUENCE[name] or "S"]


@pytest.mark.parametrize("name", FORMS)
def test_inspect_gives_the_true_configuration(name):
    got, expected = onnxgrow.inspect(model(name)), true_config(name)
    assert {k: got[k] for k in expected} == expected
    assert (got["opset"], got["static_batch"], got["static_sequence"]) == (23, None, SEQUENCE[name])


@pytest.mark.parametrize("name", FORMS)
def test_hypercloning_x2_keeps_the_logits(tmp_path, name):
    source, out = model(name), tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(source, 2), out)
    report = validate(source, out, shapes=SHAPES[name])
    assert report.passed, report.to_dict()
    assert_close_to_scale(report, rtol=1e-4)
    got, src = onnxgrow.inspect(out), true_config(name)
    assert (got["hidden_size"], got["num_heads"], got["ffn_size"]) == \
        (2 * src["hidden_size"], 2 * src["num_heads"], 2 * src["ffn_size"])


@pytest.mark.parametrize("name", FORMS)
def test_identity_deepen_x2_keeps_the_logits(tmp_path, name):
    source, out = model(name), tmp_path / "deep.onnx"
    onnx.save(onnxgrow.deepen(source, factor=2), out)
    report = validate(source, out, shapes=SHAPES[name])
    assert report.passed, report.to_dict()
    assert_close_to_scale(report, rtol=1e-4)
    assert onnxgrow.inspect(out)["num_layers"] == 2 * true_config(name)["num_layers"]


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
@pytest.mark.parametrize("name", FORMS)
def test_other_widths_run_and_validate(tmp_path, name, method):
    source, out = model(name), tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(source, 2, method=method), out)
    report = validate(source, out, shapes=SHAPES[name], tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_heads"] == 2 * true_config(name)["num_heads"]


@pytest.mark.parametrize("method", ["stack", "interleave"])
@pytest.mark.parametrize("name", FORMS)
def test_other_depths_run_and_validate(tmp_path, name, method):
    source, out = model(name), tmp_path / "deep.onnx"
    onnx.save(onnxgrow.deepen(source, factor=2, method=method), out)
    report = validate(source, out, shapes=SHAPES[name], tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_layers"] == 2 * true_config(name)["num_layers"]


@pytest.mark.parametrize("name", FORMS)
def test_default_validation_feeds_int32_ids_at_shapes_the_model_runs(tmp_path, name):
    source, out = model(name), tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(source, 2), out)
    report = validate(source, out)
    assert report.passed, report.to_dict()
    if SEQUENCE[name]:
        assert {c["in_0"][1] for c in report.cases} == {SEQUENCE[name]}


@pytest.mark.parametrize("name, window", [("jax-gpt-static8", 8), ("jax-gpt-dynamic", 32)])
def test_calibration_windows_fit_the_static_sequence_or_the_position_table(name, window):
    """Subclone's default windows are 64 tokens: cut to the static 8, or to the 32 learned positions
    (a longer window reads past the table: ONNX Runtime fails in its Gather)."""
    spec = load_structure(modelio.load(model(name)))
    ranking, held_out = calibration_windows(spec, allow_random=True, samples=8)
    assert ranking.shape[1] == window and held_out.shape[1] == window


@pytest.mark.parametrize("name, seq, message", [("jax-gpt-static8", 64, "static sequence length of 8"),
                                                ("jax-gpt-dynamic", 64, "longer than the model's 32 learned")])
def test_a_calibration_window_that_does_not_fit_is_refused(name, seq, message):
    spec = load_structure(modelio.load(model(name)))
    with pytest.raises(OnnxgrowError, match=message):
        calibration_windows(spec, allow_random=True, samples=8, seq=seq)


@pytest.mark.parametrize("name", FORMS)
def test_subclone_half_width_half_depth(tmp_path, name):
    source, c = model(name), true_config(name)
    calib = np.random.default_rng(0).integers(0, 256, 4000).astype(np.int32)
    result = subclone_model(modelio.load(source), calib, samples=8, hidden=c["hidden_size"] // 2,
                            layers=c["num_layers"] // 2)
    out = modelio.save(result.model, tmp_path / "sub.onnx")
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_heads"], got["num_layers"]) == (32, 2, 1)
    assert np.isfinite(logits(out, ids32(2, SEQUENCE[name] or 12))).all()


@pytest.mark.parametrize("name", FORMS)
def test_train_two_steps_writes_a_model_onnxruntime_runs(tmp_path, name):
    import io
    from rich.console import Console
    from onnxgrow import training
    source, out = model(name), tmp_path / "trained.onnx"
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    summary = training.train(source, text, use_bytes=True, steps=2, batch=2, lr=1e-3, output=out,
                             console=Console(file=io.StringIO()))
    assert summary["output"] == str(out) and len(summary["losses"]) == 2
    ids = ids32(2, SEQUENCE[name] or 12)
    trained = logits(out, ids)
    assert trained.shape == (2, ids.shape[1], 256) and np.isfinite(trained).all()
    assert not np.array_equal(trained, logits(source, ids))


@pytest.mark.parametrize("name", FORMS)
def test_export_weights_names_the_roles(tmp_path, name):
    from safetensors.numpy import load_file
    from onnxgrow.weights import export_weights
    names = set(load_file(str(export_weights(model(name), tmp_path / "w.safetensors"))))
    assert any("attn" in n for n in names) and any("mlp" in n or "ffn" in n for n in names), sorted(names)


@pytest.mark.parametrize("name, said", [("jax-gpt-static8", "windows of 8 tokens: the model's static sequence"),
                                        ("jax-gpt-dynamic", "windows of 32 tokens: the model's learned positions")])
def test_subclone_command_says_how_long_its_windows_are(tmp_path, name, said):
    from typer.testing import CliRunner
    from onnxgrow.cli import app
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 80, encoding="utf-8")
    out = tmp_path / "sub.onnx"
    result = CliRunner().invoke(app, ["subclone", str(model(name)), "--hidden", "32", "--calib", str(text),
                                      "--bytes", "--samples", "8", "--no-report", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert said in " ".join(result.output.split()) and out.is_file()


def test_train_refuses_windows_longer_than_the_position_table_in_one_line(tmp_path):
    from typer.testing import CliRunner
    from onnxgrow.cli import app
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 80, encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(model("jax-gpt-dynamic")), "--data", str(text), "--bytes",
                                      "--steps", "1", "--seq", "40", "-o", str(tmp_path / "t.onnx")])
    assert result.exit_code == 2, result.output
    assert "--seq 40 is longer than the model's 32 learned positions" in result.output
