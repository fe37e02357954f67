"""Small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import onnx

from onnxgrow.verify import validate


def save_and_validate(model: onnx.ModelProto, source: Path, out: Path, tolerance: float | None = None):
    onnx.save(model, out)
    onnx.checker.check_model(str(out))
    return validate(source, out, tolerance=tolerance)


def worst(report) -> float:
    return max(max(o.max_abs_diff, o.copies_max_abs or 0.0) for o in report.outputs)
