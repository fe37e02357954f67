"""Shared fixtures: the model zoo (built once per machine by models/build.py, then cached)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "models" / "zoo"
DEFAULT_MODEL = ROOT / "models" / "default" / "tiny-gpt2.onnx"
sys.path.insert(0, str(ROOT))


def load_builder():
    spec = importlib.util.spec_from_file_location("zoo_build", ROOT / "models" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def zoo() -> dict[str, dict]:
    """name -> manifest entry (with an absolute "file"), for every model that built."""
    entries = load_builder().build_zoo(ZOO)
    models = {}
    for e in entries:
        if "error" in e:
            continue
        e = dict(e, file=ZOO / e["path"])
        models[e["name"]] = e
    return models


def zoo_names() -> list[str]:
    """Names known to the builder, for parametrising tests before the zoo is built."""
    return [spec.name for spec in load_builder()._zoo()]


ZOO_NAMES = zoo_names()
SMALL_NAMES = [n for n in ZOO_NAMES if n != "minilm-ts17"]
