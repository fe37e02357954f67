"""The Python API at the top of the package, the pass registry, and errors at the CLI edge.

Everything here runs on the embedded tiny GPT-2 (models/default), no zoo needed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import DEFAULT_MODEL
from typer.testing import CliRunner

import onnxgrow
from onnxgrow import api
from onnxgrow.cli import app
from onnxgrow.errors import INTERNAL, OnnxgrowError
from onnxgrow.metadata import history
from onnxgrow.passes import DEPTH_PASSES, WIDTH_PASSES, DepthPass, WidthPass

runner = CliRunner()
KINDS = ["path", "proto", "ir"]


def given(kind: str):
    if kind == "path":
        return DEFAULT_MODEL
    if kind == "proto":
        return onnx.load(str(DEFAULT_MODEL))
    return ir.load(DEFAULT_MODEL)


def expected_type(kind: str):
    return ir.Model if kind == "ir" else onnx.ModelProto


def config_of(model) -> dict:
    return onnxgrow.inspect(model)


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_takes_every_kind(kind):
    assert onnxgrow.inspect(given(kind)) == onnxgrow.inspect(DEFAULT_MODEL)


@pytest.mark.parametrize("kind", KINDS)
def test_widen_returns_the_kind_given_and_leaves_it_alone(kind):
    model = given(kind)
    wide = onnxgrow.widen(model, 2)
    assert isinstance(wide, expected_type(kind))
    assert config_of(wide)["hidden_size"] == 128
    assert config_of(model)["hidden_size"] == 64  # the model given is unchanged
    entry = history(wide if kind == "ir" else ir.from_proto(wide))[-1]
    assert entry.startswith("widen:hypercloning:") and "hidden=128" in entry.split(":")[2].split(",")


@pytest.mark.parametrize("kind", KINDS)
def test_deepen_returns_the_kind_given(kind):
    deep = onnxgrow.deepen(given(kind), layers=3)
    assert isinstance(deep, expected_type(kind))
    assert config_of(deep)["num_layers"] == 3
    m = deep if kind == "ir" else ir.from_proto(deep)
    assert history(m)[-1] == "deepen:identity:layers=3"


@pytest.mark.parametrize("kind", KINDS)
def test_subclone_returns_the_kind_given(kind):
    ids = np.random.default_rng(0).integers(0, 512, 2000)
    small, details = onnxgrow.subclone(given(kind), ids, hidden=32, samples=8, seq=16, provider="cpu",
                                       return_details=True)
    assert isinstance(small, expected_type(kind))
    assert config_of(small)["hidden_size"] == 32
    assert len(details.kept_hidden) == 32 and details.held_out.shape[1] == 16
    assert details.label == "subclone-h32-l2"


def test_subclone_needs_calibration_data():
    with pytest.raises(OnnxgrowError, match="calibration data"):
        onnxgrow.subclone(DEFAULT_MODEL, hidden=32)


@pytest.mark.parametrize("kind", KINDS)
def test_validate_takes_every_kind_and_returns_a_report(kind):
    report = onnxgrow.validate(DEFAULT_MODEL, onnxgrow.widen(given(kind), 2), provider="cpu")
    assert report.passed and report.exit_code == 0 and report.to_dict()["outputs"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (the train extra)")
@pytest.mark.parametrize("kind", ["proto", "ir"])
def test_train_returns_the_kind_given(kind, tmp_path):
    data = tmp_path / "text.txt"
    data.write_bytes(bytes(range(256)) * 8)
    trained, summary = onnxgrow.train(given(kind), data, use_bytes=True, steps=2, batch=2, seq=16, device="cpu",
                                      checkpoint_every=0, return_summary=True)
    assert isinstance(trained, expected_type(kind))
    assert config_of(trained) == config_of(DEFAULT_MODEL)
    assert np.isfinite(summary["val_loss_end"])


def test_the_modules_behind_the_functions_still_work():
    from onnxgrow.subcloning import subclone_ir  # noqa: F401
    from onnxgrow.verify import Report
    assert onnxgrow.verify.Report is Report and callable(onnxgrow.validate) and callable(onnxgrow.subclone)


def test_registry_lists_every_pass_with_its_exactness():
    assert {n: p.exact for n, p in WIDTH_PASSES.items()} == {"hypercloning": True, "fpi": False, "aki": False,
                                                           "pad": False}
    assert {n: p.exact for n, p in DEPTH_PASSES.items()} == {"identity": True, "stack": False, "interleave": False}
    assert all(isinstance(p, WidthPass) for p in WIDTH_PASSES.values())
    assert all(isinstance(p, DepthPass) for p in DEPTH_PASSES.values())
    assert [r.name for r in DEPTH_PASSES["identity"].requires] == ["pre-norm blocks"]


@pytest.mark.parametrize("call, choices", [
    (lambda: onnxgrow.widen(DEFAULT_MODEL, 2, method="nope"), "hypercloning, fpi, aki, pad"),
    (lambda: onnxgrow.deepen(DEFAULT_MODEL, 3, method="nope"), "identity, stack, interleave"),
])
def test_unknown_method_is_one_line_naming_the_choices(call, choices):
    with pytest.raises(OnnxgrowError) as info:
        call()
    assert str(info.value) == f"unknown method 'nope'; choose one of {choices}"


def test_cli_unknown_method(tmp_path):
    result = runner.invoke(app, ["widen", str(DEFAULT_MODEL), "-k", "2", "--method", "nope",
                                 "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: unknown method 'nope'; choose one of hypercloning, fpi, aki, pad"]


def broken_inspect(model):
    raise TypeError("a bug\nsecond line")


def test_cli_reports_a_bug_as_internal_error_in_one_line(monkeypatch):
    monkeypatch.delenv("ONNXGROW_DEBUG", raising=False)
    monkeypatch.setattr(api, "inspect", broken_inspect)
    result = runner.invoke(app, ["inspect", str(DEFAULT_MODEL)])
    assert result.exit_code == INTERNAL == 3
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0] == ("error: internal error (TypeError): a bug — this is a bug in onnxgrow; please report it "
                        "(run with --verbose for the traceback)")


@pytest.mark.parametrize("how", ["--verbose", "-v", "ONNXGROW_DEBUG"])
def test_verbose_shows_the_traceback(monkeypatch, how):
    monkeypatch.delenv("ONNXGROW_DEBUG", raising=False)
    if how == "ONNXGROW_DEBUG":
        monkeypatch.setenv("ONNXGROW_DEBUG", "1")
    monkeypatch.setattr(api, "inspect", broken_inspect)
    args = ([] if how == "ONNXGROW_DEBUG" else [how]) + ["inspect", str(DEFAULT_MODEL)]
    result = runner.invoke(app, args)
    assert result.exit_code == 3
    assert result.output.startswith("error: internal error (TypeError): a bug")
    assert "Traceback" in result.output and "broken_inspect" in result.output


def test_user_errors_keep_their_exit_code(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2 and result.output.startswith("error: no such file")
