"""The growth benchmark's smoke setting: it runs end to end and writes its table, curves and JSON.
(Whether growth saves compute is the benchmark's question, not a test's: see docs/BENCHMARKS.md.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_growth_smoke_writes_its_table(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "growth.py"), "--setting", "smoke",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "growth.json").read_text())
    arms = [k for k in report["results"] if not k.endswith("/random")]
    assert sorted(arms) == sorted(["width/hypercloning x2", "width/fpi x2", "width/pad x2", "depth/identity x2",
                                   "depth/stack x2", "depth/interleave x2", "both/hypercloning x2 + stack x2",
                                   "subclone/subclone 1/2 width, 1/2 depth"])
    table = (tmp_path / "growth.md").read_text()
    for arm in arms:
        assert f"| {arm} |" in table
        row = report["results"][arm]
        assert math.isfinite(row["loss_at_0"]) and math.isfinite(row["final_loss"])
    # exact methods start where the trained source ended (on the report split, which the source's own
    # summary does not score): HyperCloning and identity deepening start at the same loss, up to fp32
    # round-off (observed 4.5e-8 on a loss of 3.56), so 1e-6 of the loss, not 1e-3
    identity = report["results"]["depth/identity x2"]["loss_at_0"]
    assert abs(report["results"]["width/hypercloning x2"]["loss_at_0"] - identity) <= 1e-6 * abs(identity)
    for arm in arms:
        assert len(report["results"][arm]["head_start"]) == report["config"]["seeds"]
    assert (tmp_path / "growth.png").stat().st_size > 10_000


def load_bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("growth_bench", ROOT / "bench" / "growth.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["growth_bench"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_tuning_and_report_windows_are_disjoint_and_unseen():
    import numpy as np
    bench = load_bench()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, 5000)
    val = rng.integers(0, 256, 2000)
    val[1500:1600] = train[100:200]  # a file that also occurs in the training split
    splits = bench.eval_splits(train, val, window=20, count=40)
    tune, report = splits["tune"], splits["report"]
    assert len(tune) == 40 and splits["report_dropped"] > 0
    assert max(tune) + 20 <= min(report)  # no tuning window overlaps a report window
    assert not any(1480 < s < 1600 for s in report)  # the duplicated span is not reported on
    assert bench.tuned({1e-3: {"tune": [(0, 5.0), (9, 2.0)]}, 2e-3: {"tune": [(0, 5.0), (9, 1.5)]}}) == 2e-3


def test_cache_returns_another_process_run_and_ignores_the_grown_arms_settings(tmp_path, monkeypatch):
    bench = load_bench()
    setting = bench.SETTINGS["smoke"]
    monkeypatch.setattr(bench, "CACHE", tmp_path)
    monkeypatch.setattr(bench, "race_arm", lambda *a, **k: {"trained": True})
    # a run stored under the same key (another process's random arm) comes back without training
    key = bench.cache_key(setting, "width", "random", 0, 3e-3)
    (tmp_path / f"{key}.json").write_text(json.dumps({"trained": "elsewhere"}))
    (tmp_path / f"{key}.pending").touch()
    assert bench.cached_race(setting, ("width", "random", 0, 3e-3)) == {"trained": "elsewhere"}
    # the grown arms' grid and recipes do not change the random arm's run; its own rate does
    other = bench.replace(setting, lrs_grown=(9e-3,), recipes=("none",))
    assert bench.cache_key(other, "width", "random", 0, 3e-3) == key
    assert bench.cache_key(setting, "width", "random", 0, 1e-3) != key
    assert bench.cached_race(setting, ("width", "random", 0, 1e-3)) == {"trained": True}


def test_warmup_lever_sets_the_grown_arms_warmup_only(monkeypatch):
    bench = load_bench()
    monkeypatch.setitem(bench.LEVERS, "warmup", 0)
    assert bench.warmup_steps(600) == 0
    assert bench.lever_suffix() == " [warmup 0]"
    monkeypatch.setitem(bench.LEVERS, "warmup", None)
    assert bench.warmup_steps(600) == 30  # onnxgrow.training.lr_at's own: 5 % of the steps
