"""Shared fixtures: the model zoo (built once per machine by models/build.py, then cached).

Under pytest-xdist (`-n auto`, as CI runs) three things keep the workers from slowing each other:
each worker gets one thread for torch and for ONNX Runtime; the controller builds the zoo in the
background while the workers run the tests that do not need it; and those tests, with the slow ones
first, are handed out before the rest (see pytest_collection_modifyitems)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "models" / "zoo"
DEFAULT_MODEL = ROOT / "models" / "default" / "tiny-gpt2.onnx"
sys.path.insert(0, str(ROOT))

XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in each xdist worker before this is imported
if XDIST_WORKER:
    # one worker per core: thread pools of two threads per worker would fight over the cores (and
    # spin-wait for each other). Read by torch when it is first imported; subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def load_builder():
    spec = importlib.util.spec_from_file_location("zoo_build", ROOT / "models" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def zoo() -> dict[str, dict]:
    """name -> manifest entry (with an absolute "file"), for every model that built."""
    # build_zoo holds a file lock: the first caller (a worker, or the controller's background build)
    # builds, and every later one finds the models built
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


# --- running under pytest-xdist ---------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """ONNX Runtime sizes its thread pool from os.cpu_count(), whatever the workers: one per worker."""
    if not XDIST_WORKER:
        yield
        return
    from onnxgrow import runtime
    options = runtime.session_options

    def one_thread():
        o = options()
        o.intra_op_num_threads = 1
        return o
    runtime.session_options = one_thread
    yield
    runtime.session_options = options


def pytest_sessionstart(session):
    # the xdist controller runs no tests: it builds the zoo (on one thread, like a worker) while the
    # workers start on the tests that do not need it, which come first
    if session.config.pluginmanager.hasplugin("dsession"):
        ZOO.mkdir(parents=True, exist_ok=True)
        with open(ZOO / "build.log", "w") as log:  # the build's errors are also in its manifest
            session.config.zoo_build = subprocess.Popen(
                [sys.executable, str(ROOT / "models" / "build.py"), "--out", str(ZOO)],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def pytest_sessionfinish(session):
    build = getattr(session.config, "zoo_build", None)
    if build is not None and build.poll() is None:
        # no test needed the zoo (a run of tests/unit): a later run continues from its manifest
        build.terminate()
        build.wait()


def uses_zoo(item) -> bool:
    return "zoo" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under xdist: tests without the zoo first (they run while it builds), and in each half the tests
    marked slow first, so that no long test is left for one worker at the end. Stable: otherwise in
    pytest's order."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: (uses_zoo(item), item.get_closest_marker("slow") is None))
