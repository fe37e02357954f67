"""--json on widen, deepen and subclone (issue 18, item 4): one JSON object on stdout, nothing else there,
with the paths and sizes written, the configurations before and after, the method and the verification."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import zoo_model


def run_json(*args) -> dict:
    run = subprocess.run([sys.executable, "-m", "onnxgrow", *map(str, args), "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)  # fails on anything else printed to stdout


@pytest.mark.parametrize("command, extra, method", [
    ("widen", ["--factor", "2"], "hypercloning"),
    ("deepen", ["--factor", "2"], "identity"),
])
def test_widen_and_deepen_print_one_json_object(zoo, tmp_path, command, extra, method):
    out = tmp_path / "out.onnx"
    result = run_json(command, zoo_model(zoo, "gpt2-ts17"), *extra, "-o", out)
    assert result["command"] == command and result["method"] == method
    assert result["output"]["path"] == str(out) and result["output"]["bytes"] == out.stat().st_size
    before, after = result["config_before"], result["config_after"]
    key = "hidden_size" if command == "widen" else "num_layers"
    assert after[key] == 2 * before[key]
    verification = result["verification"]
    assert verification["passed"] and verification["outputs"][0]["max_abs_diff"] <= 1e-4
    assert {"max_abs_diff", "max_rel_diff", "cosine"} <= set(verification["outputs"][0])


def test_subclone_prints_its_fidelity_in_json(zoo, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "small.onnx"
    result = run_json("subclone", zoo_model(zoo, "gpt2-ts17"), "--hidden", "32", "--layers", "1", "--calib", text,
                      "--bytes", "-o", out)
    assert result["config_after"]["hidden_size"] == 32 and result["config_after"]["num_layers"] == 1
    assert len(result["removed_blocks"]) == 1 and "subclone_loss" in result["fidelity"]["logits"]


def test_train_and_the_weight_files_print_json(zoo, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    source, trained = zoo_model(zoo, "gpt2-ts17"), tmp_path / "trained.onnx"
    result = run_json("train", source, "--data", text, "--bytes", "--steps", "2", "--batch", "2", "--seq", "16",
                      "--device", "cpu", "-o", trained)
    assert result["command"] == "train" and result["output"]["path"] == str(trained)
    assert result["steps"] == 2 and result["val_loss_end"] is not None
    weights = tmp_path / "w.safetensors"
    exported = run_json("export-weights", trained, "-o", weights)
    assert exported["output"]["bytes"] == weights.stat().st_size
    back = run_json("import-weights", source, weights, "-o", tmp_path / "back.onnx")
    assert back["config"]["hidden_size"] == 64 and back["output"]["path"] == str(tmp_path / "back.onnx")
