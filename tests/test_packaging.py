"""The package installs as `onnxgrow` (with onnxgrow.passes) and nothing else at the top level.

tests/conftest.py puts the repository root on sys.path, where `passes/` would import as a top-level
package: these checks run Python in a subprocess from an empty folder, as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def python(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_passes_install_inside_the_package(tmp_path):
    assert python("import passes", tmp_path).returncode != 0
    done = python("import onnxgrow.passes as p; print(sorted(p.WIDTH_PASSES), sorted(p.DEPTH_PASSES))", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "['aki', 'fpi', 'hypercloning', 'pad'] ['identity', 'interleave', 'stack']"


def test_importing_onnxgrow_does_not_import_torch(tmp_path):
    done = python("import sys, onnxgrow; print('torch' in sys.modules, all(callable(getattr(onnxgrow, f)) "
                  "for f in ('inspect', 'widen', 'deepen', 'subclone', 'validate')))", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def test_nothing_imports_passes_bare():
    bare = re.compile(r"^\s*(from\s+passes[\s.]|import\s+passes\b)", re.MULTILINE)
    found = [str(p.relative_to(ROOT)) for folder in ("onnxgrow", "passes", "tests", "bench")
             for p in (ROOT / folder).rglob("*.py") if bare.search(p.read_text())]
    assert found == []


def test_every_subpackage_is_listed_in_pyproject():
    """A regular (non-editable) install ships only the listed packages: a new subpackage left out
    would import from the checkout and fail once installed."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "onnxgrow").rglob("__init__.py")}
    assert found | {"onnxgrow.passes"} == listed


def test_one_onnx_runtime_per_extra():
    """Both runtimes provide the `onnxruntime` module: the base install has none, `cpu` and `gpu` one
    each (resolved with pip: `pip install --dry-run --report r.json '.[gpu]'` lists onnxruntime-gpu and
    not onnxruntime)."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the packages that provide the `onnxruntime` module (onnxruntime-genai, in the `genai` extra, is
    # another module; it requires the CPU runtime, and the README says that extra is CPU-only)
    name = lambda r: r.split("[")[0].split(">")[0].split("=")[0].split("<")[0]  # noqa: E731
    runtimes = lambda reqs: sorted(name(r) for r in reqs if name(r) in ("onnxruntime", "onnxruntime-gpu"))  # noqa: E731
    extras = project["optional-dependencies"]
    assert runtimes(project["dependencies"]) == []
    assert runtimes(extras["cpu"]) == ["onnxruntime"] and runtimes(extras["gpu"]) == ["onnxruntime-gpu"]
    assert all(runtimes(reqs) == [] for name, reqs in extras.items() if name not in ("cpu", "gpu"))


def test_without_onnx_runtime_sessions_fail_in_one_line(monkeypatch):
    import pytest

    from onnxgrow import runtime
    from onnxgrow.errors import OnnxgrowError
    monkeypatch.setattr(runtime, "ort", None)
    with pytest.raises(OnnxgrowError, match=r"ONNX Runtime is not installed: pip install 'onnxgrow\[cpu\]'"):
        runtime.open_session(ROOT / "models" / "default" / "tiny-gpt2.onnx", "auto")
