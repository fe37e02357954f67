"""inspect finds the true configuration of every exported model, by structure alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, TensorProto
from typer.testing import CliRunner

import onnxgrow
from onnxgrow.cli import app
from onnxgrow.errors import OnnxgrowError
from conftest import DEFAULT_MODEL, ZOO_NAMES

KEYS = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "vocab_size",
        "norm", "norm_position", "positional", "tied_embeddings", "activation", "parallel_residual",
        "num_parameters"]
runner = CliRunner()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_inspect_matches_the_config_the_model_was_built_from(zoo, name):
    entry = zoo[name]
    got = onnxgrow.inspect(entry["file"])
    expected = entry["config"]
    assert {k: got[k] for k in KEYS} == {k: expected[k] for k in KEYS}
    if expected["positional"] == "learned":
        assert got["max_positions"] == expected["max_positions"] + expected.get("position_offset", 0)
    assert got["opset"] == entry["opset"]


def test_cli_inspect_json():
    result = runner.invoke(app, ["inspect", str(DEFAULT_MODEL), "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.output)
    assert config["hidden_size"] == 64 and config["num_layers"] == 2 and config["tied_embeddings"]


def conv_model() -> onnx.ModelProto:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108, np.float32))
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bad_inputs(tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(DEFAULT_MODEL.read_bytes()[:5000])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a model" * 50)
    conv = tmp_path / "conv.onnx"
    onnx.save(conv_model(), conv)
    return {"missing": tmp_path / "missing.onnx", "truncated": truncated, "garbage": garbage, "conv": conv}


@pytest.mark.parametrize("case", ["missing", "truncated", "garbage", "conv"])
@pytest.mark.parametrize("command", [["inspect"], ["widen", "--factor", "2"], ["deepen", "--factor", "2"]])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case, command):
    path = bad_inputs(tmp_path)[case]
    before = set(tmp_path.iterdir())
    result = runner.invoke(app, [command[0], str(path), *command[1:]])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    assert set(tmp_path.iterdir()) == before


def test_non_transformer_error_lists_what_did_not_match(tmp_path):
    path = bad_inputs(tmp_path)["conv"]
    with pytest.raises(OnnxgrowError, match="no token embedding"):
        onnxgrow.inspect(path)
