"""Progress on stderr (issue 18, item 2): a bar on a terminal, plain lines for long tasks elsewhere,
nothing with --quiet, and never anything on stdout (it may hold --json)."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys

from onnxgrow import progress
from helpers import zoo_model


def run_on_a_terminal(*args) -> tuple[str, str, int]:
    """(what reached the terminal on stderr, stdout, exit code) of an onnxgrow command."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "onnxgrow", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    stdout = proc.stdout.read().decode()
    os.close(master)
    return b"".join(chunks).decode(errors="replace"), stdout, proc.wait()


def test_a_terminal_sees_each_stage_and_stdout_keeps_only_the_json(zoo, tmp_path):
    out = tmp_path / "wide.onnx"
    terminal, stdout, code = run_on_a_terminal("widen", zoo_model(zoo, "gpt2-ts17"), "--factor", "2", "-o", out,
                                               "--json")
    assert code == 0, terminal
    for stage in ("loading model.onnx", "analysing the graph", "writing wide.onnx", "verifying in ONNX Runtime"):
        assert stage in terminal, stage
    assert "MB" in terminal  # the writing bar counts bytes
    assert json.loads(stdout)["output"]["path"] == str(out)


def test_quiet_shows_nothing(zoo, tmp_path):
    terminal, _, code = run_on_a_terminal("--quiet", "widen", zoo_model(zoo, "gpt2-ts17"), "--factor", "2",
                                          "-o", tmp_path / "wide.onnx")
    assert code == 0 and "loading" not in terminal and "writing" not in terminal


def test_off_a_terminal_only_long_tasks_print_plain_lines(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress.task("quick", total=10) as advance:
        advance(10)
    assert stream.getvalue() == ""
    monkeypatch.setattr(progress, "PLAIN_AFTER_S", 0.0)
    with progress.task("writing x.onnx", total=4 * 2**20, unit="bytes") as advance:
        advance(2**20)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "writing x.onnx: 1.0 MB of 4.0 MB (25%)" and lines[-1].startswith("writing x.onnx: done in")


def test_blockwise_verification_shows_its_blocks_and_json_stays_clean(zoo, tmp_path):
    out = tmp_path / "wide.onnx"
    terminal, stdout, code = run_on_a_terminal("widen", zoo_model(zoo, "gpt2-ts17"), "--factor", "2", "-o", out,
                                               "--blockwise", "--json")
    assert code == 0, terminal
    assert "verifying model.onnx block by block" in terminal and "verifying wide.onnx block by block" in terminal
    assert "segments" in terminal  # counted: embeddings, each block, head
    result = json.loads(stdout)
    assert result["verification"]["mode"] == "blockwise" and result["verification"]["first_differing_block"] is None


def test_export_and_import_weights_show_progress(zoo, tmp_path):
    weights = tmp_path / "w.safetensors"
    terminal, _, code = run_on_a_terminal("export-weights", zoo_model(zoo, "gpt2-ts17"), "-o", weights)
    assert code == 0, terminal
    assert "reading the weights" in terminal and "writing w.safetensors" in terminal
    terminal, _, code = run_on_a_terminal("import-weights", zoo_model(zoo, "gpt2-ts17"), weights,
                                          "-o", tmp_path / "back.onnx")
    assert code == 0, terminal
    assert "reading w.safetensors" in terminal and "placing the weights" in terminal
