"""bench/gpu_check.py runs on a CUDA machine; here its --dry-run checks that every command, script and
option it will call exists (no GPU needed), so the one GPU run a session gets is not lost to a typo."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_finds_everything_it_calls(zoo):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 problem(s)" in done.stdout


def test_gpu_check_dry_run_catches_a_missing_option():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    steps = [gpu_check.Step("widen", gpu_check.ONNXGROW + ["widen", "m.onnx", "--no-such-option", "1"])]
    assert gpu_check.dry_run(steps) == ["widen: " + " ".join(gpu_check.ONNXGROW[:3] + ["widen"])
                                        + " has no option --no-such-option"]
