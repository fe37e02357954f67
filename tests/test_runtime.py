"""ONNX Runtime sessions (onnxgrow/runtime.py), with the CUDA paths mocked: no test here needs a GPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from onnxgrow import runtime
from onnxgrow.errors import OnnxgrowError

from conftest import DEFAULT_MODEL

REAL_SESSION = ort.InferenceSession


@pytest.fixture
def fake_cuda(monkeypatch):
    """An onnxruntime that lists CUDA but cannot start it (as with a missing driver or cuDNN)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    calls = []

    class Session(REAL_SESSION):
        def __init__(self, path, options=None, providers=None, **kwargs):
            calls.append((providers, kwargs))
            names = [p if isinstance(p, str) else p[0] for p in providers or []]
            if runtime.CUDA in names:
                raise RuntimeError("CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version")
            super().__init__(path, options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Session)
    return calls


@pytest.mark.parametrize("text, kind, device", [("auto", "auto", 0), ("cpu", "cpu", 0), ("cuda", "cuda", 0),
                                                ("cuda:1", "cuda", 1), ("CUDA:3", "cuda", 3)])
def test_provider_names(text, kind, device):
    assert runtime.parse_provider(text) == runtime.ProviderChoice(kind, device)


@pytest.mark.parametrize("text", ["gpu", "cpu:1", "cuda:", "cuda:x", "", "auto:0"])
def test_unknown_provider_is_one_line(text):
    with pytest.raises(OnnxgrowError, match="unknown provider"):
        runtime.parse_provider(text)


def test_provider_lists_with_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    assert runtime.resolve_providers("auto") == [(runtime.CUDA, {"use_tf32": "0", "device_id": "0"}), runtime.CPU]
    assert runtime.resolve_providers("cuda:2")[0] == (runtime.CUDA, {"use_tf32": "0", "device_id": "2"})
    assert runtime.resolve_providers("cpu") == [runtime.CPU]


def test_provider_lists_without_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CPU])
    assert runtime.resolve_providers("auto") == [runtime.CPU]
    with pytest.raises(OnnxgrowError, match="no CUDAExecutionProvider"):
        runtime.resolve_providers("cuda")


def test_auto_falls_back_to_cpu_in_one_line_on_stderr(fake_cuda, capsys):
    session = runtime.open_session(DEFAULT_MODEL, "auto")
    assert session.onnxgrow_provider == runtime.CPU
    captured = capsys.readouterr()
    assert captured.out == ""  # ORT's own fallback banner goes to stdout: it must be off
    assert len(captured.err.strip().splitlines()) == 1 and "running on the CPU" in captured.err
    assert all(kwargs.get("enable_fallback") == 0 for _, kwargs in fake_cuda)


def test_cuda_asked_for_fails_in_one_line(fake_cuda, capsys):
    with pytest.raises(OnnxgrowError, match="could not start CUDA") as e:
        runtime.open_session(DEFAULT_MODEL, "cuda")
    assert "\n" not in str(e.value)
    assert capsys.readouterr().out == ""


def test_cpu_session_runs_and_says_so():
    session = runtime.open_session(DEFAULT_MODEL, "cpu")
    assert session.onnxgrow_provider == runtime.CPU
    feeds = {i.name: np.ones((1, 4), dtype=np.int64) for i in session.get_inputs()}
    outputs = runtime.run_model(session, feeds)
    assert all(np.isfinite(v).all() for v in outputs.values())


def test_both_runtimes_installed_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "_runtime_checked", False)
    monkeypatch.setattr(runtime.metadata, "distribution", lambda name: object())  # both "installed"
    with caplog.at_level("WARNING", logger="onnxgrow.runtime"):
        runtime.check_single_runtime()
        runtime.check_single_runtime()
    warnings = [r for r in caplog.records if "onnxruntime-gpu" in r.getMessage()]
    assert len(warnings) == 1 and "pip uninstall" in warnings[0].getMessage()


def test_validate_json_survives_a_cuda_failure(fake_cuda):
    """ORT's own fallback would print its banner on stdout before the JSON; ours says so on stderr."""
    import json

    from typer.testing import CliRunner

    from onnxgrow.cli import app
    result = CliRunner().invoke(app, ["validate", str(DEFAULT_MODEL), str(DEFAULT_MODEL), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["provider"] == runtime.CPU and report["passed"]
    assert "running on the CPU" in result.stderr


# --- onnxgrow's own output: its failures are exit 3, and nothing is written ---------------------------


def run_cli(*args):
    from typer.testing import CliRunner

    from onnxgrow.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def test_widen_takes_a_provider(tmp_path):
    out = tmp_path / "wide.onnx"
    result = run_cli("widen", DEFAULT_MODEL, "--factor", "2", "--provider", "cpu", "-o", out)
    assert result.exit_code == 0, result.output and out.is_file()
    assert "CPUExecutionProvider" in result.output
    bad = run_cli("deepen", DEFAULT_MODEL, "--factor", "2", "--provider", "gpu", "-o", tmp_path / "d.onnx")
    assert bad.exit_code == 2 and "unknown provider 'gpu'" in bad.output
    assert not (tmp_path / "d.onnx").exists()


def test_a_written_model_failing_the_checker_is_an_internal_error(tmp_path, monkeypatch):
    """Injected defect: the checker refuses what onnxgrow wrote. That is onnxgrow's fault (exit 3),
    not the input's (exit 2), and nothing is written."""
    import onnx

    real = onnx.checker.check_model

    def refuse_ours(model, *args, **kwargs):
        if ".onnxgrow-" in str(model):  # the staged output (the input is checked as a proto)
            raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted")
        return real(model, *args, **kwargs)
    monkeypatch.setattr(onnx.checker, "check_model", refuse_ours)
    result = run_cli("widen", DEFAULT_MODEL, "--factor", "2", "-o", tmp_path / "wide.onnx")
    assert result.exit_code == 3, result.output
    assert "internal error" in result.output and "fails onnx.checker" in result.output
    assert list(tmp_path.iterdir()) == []


def test_onnx_runtime_refusing_our_output_is_an_internal_error(tmp_path, monkeypatch):
    """Injected defect: ONNX Runtime cannot load the model written (but loads the source)."""
    class Session(REAL_SESSION):
        def __init__(self, path, *args, **kwargs):
            if ".onnxgrow-" in str(path):  # the staged output, before it is moved into place
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Type Error: Type mismatch")
            super().__init__(path, *args, **kwargs)
    monkeypatch.setattr(ort, "InferenceSession", Session)
    result = run_cli("deepen", DEFAULT_MODEL, "--factor", "2", "-o", tmp_path / "deep.onnx")
    assert result.exit_code == 3, result.output
    assert "internal error" in result.output and "cannot run the model written" in result.output
    assert list(tmp_path.iterdir()) == []
