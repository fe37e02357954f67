"""subclone: smaller models chosen from a larger one's weights, ranked on calibration data."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import onnxgrow
from onnxgrow import modelio
from onnxgrow.cli import app
from onnxgrow.subclone import subclone_ir
from onnxgrow.validate import validate
from conftest import DEFAULT_MODEL, ROOT, SMALL_NAMES

runner = CliRunner()
IDS = np.random.default_rng(0).integers(0, 500, (16, 24))


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_half_width_half_depth(zoo, tmp_path, name):
    entry = zoo[name]
    c = entry["config"]
    result = subclone_ir(modelio.load(entry["file"]), IDS, hidden=c["hidden_size"] // 2,
                         layers=c["num_layers"] // 2)
    out = modelio.save(result.model, tmp_path / "sub.onnx")  # checked by onnx.checker
    report = validate(entry["file"], out)  # ORT runs both; outputs are compared at the kept dims
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    got = onnxgrow.inspect(out)
    assert got["hidden_size"] == c["hidden_size"] // 2
    assert got["num_heads"] == c["num_heads"] // 2 and got["head_dim"] == c["head_dim"]
    assert got["ffn_size"] == c["ffn_size"] // 2
    assert got["num_layers"] == c["num_layers"] // 2


@pytest.mark.parametrize("name", SMALL_NAMES + ["minilm-ts17"])
def test_same_size_reproduces_the_source(zoo, tmp_path, name):
    entry = zoo[name]
    result = subclone_ir(modelio.load(entry["file"]), IDS[:4])
    report = validate(entry["file"], modelio.save(result.model, tmp_path / "same.onnx"))
    assert report.passed


def test_kv_cache_block_removal_drops_its_cache(zoo, tmp_path):
    src = zoo["llama-gqa-optimum-kv"]["file"]
    result = subclone_ir(modelio.load(src), IDS, keep_layers=[1])
    names = [v.name for v in result.model.graph.inputs]
    assert "past_key_values.0.key" in names and "past_key_values.1.key" not in names
    report = validate(src, modelio.save(result.model, tmp_path / "s.onnx"))
    assert [o.name for o in report.outputs] == ["logits", "present.0.key", "present.0.value"]


def test_minilm_subclone_keeps_sentence_embeddings(zoo):
    sys.path.insert(0, str(ROOT / "bench"))
    import subclone_minilm
    for row in subclone_minilm.run(windows=32, held_out=100, targets=((192, 3), (384, 3))):
        assert row["subclone_cosine"] > row["random_cosine"] + 0.2, row
        assert row["subclone_sim_corr"] > row["random_sim_corr"], row


def test_cli_needs_calibration_data(tmp_path):
    result = runner.invoke(app, ["subclone", str(DEFAULT_MODEL), "--hidden", "32", "-o", str(tmp_path / "s.onnx")])
    assert result.exit_code == 2 and "--calib" in result.output
    assert not (tmp_path / "s.onnx").exists()


def test_cli_subclone_with_text_calibration(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text((ROOT / "onnxgrow" / "resize.py").read_text() * 3)
    out = tmp_path / "s.onnx"
    result = runner.invoke(app, ["subclone", str(DEFAULT_MODEL), "--hidden", "32", "--keep-layers", "0",
                                 "--calib", str(text), "--bytes", "--samples", "16", "--seq", "32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"]) == (32, 1)
    assert "subclone_loss" in result.output and "random_loss" in result.output
