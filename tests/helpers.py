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


# fp32 "exact": the rewrite only reorders sums, so the error scales with the outputs' size
RTOL_FP32 = 1e-5
ATOL_FP32 = 1e-6


def assert_close_to_scale(report, rtol: float = RTOL_FP32, atol: float = ATOL_FP32) -> None:
    """Every output of a validate report within max|Δ| <= rtol * max|ref| + atol, where max|ref| is the
    largest magnitude of the source output it is compared with (an absolute bound means nothing on
    logits of 0.5 or of 30). Duplicated slices (`copies_max_abs`) count as differences too."""
    if all(hasattr(o, "scale") for o in report.outputs):  # validate records max|ref| itself
        scale = {o.name: o.scale for o in report.outputs}
    else:
        scale = reference_scale(report)
    for o in report.outputs:
        diff = max(o.max_abs_diff, o.copies_max_abs or 0.0)
        bound = rtol * scale[o.name] + atol
        assert diff <= bound, f"{o.name}: max|Δ| {diff:.3g} > {rtol:g} * {scale[o.name]:.3g} + {atol:g}"


def reference_scale(report) -> dict[str, float]:
    """target output name -> max |source output| over the inputs validate fed (remade: same seed and
    shapes; the report keeps only the differences)."""
    import numpy as np
    from onnxgrow import modelio
    from onnxgrow.verify import plan_inputs, read_io_names, run_model
    source = modelio.load(report.source)
    plan = plan_inputs(source)
    names = read_io_names(modelio.load(report.target), Path(report.target))["outputs"]
    scale: dict[str, float] = {}
    for shapes in report.cases:
        batch, seq = (shapes.get("input_ids") or next(iter(shapes.values())))[:2]  # inputs start [batch, seq]
        outputs = run_model(report.source, plan.make(batch, seq, report.past_length or 3, 0), "cpu")
        for o in report.outputs:
            value = outputs[names.get(o.name) or o.name].astype(np.float64)
            top = float(np.abs(value[np.isfinite(value)]).max(initial=0.0))
            scale[o.name] = max(scale.get(o.name, 0.0), top)
    return scale


def zoo_model(zoo: dict, name: str, manifest: Path | None = None) -> Path:
    """The zoo entry's file, or a failure naming the build error from the manifest: a model that did not
    build must not turn its tests into silent skips."""
    import json
    if name in zoo:
        return zoo[name]["file"]
    if manifest is None:
        from conftest import ZOO
        manifest = ZOO / "manifest.json"
    entries = {e["name"]: e for e in json.loads(Path(manifest).read_text())} if Path(manifest).exists() else {}
    if name not in entries:
        raise AssertionError(f"zoo model {name} is not in {manifest}")
    raise AssertionError(f"zoo model {name} did not build: {entries[name].get('error', 'no error recorded')}")
