"""Every dtype: float16 and bfloat16 models (weights and activations), and float32 models whose
weights are stored as float16 behind a Cast.

The variants (float16, bfloat16, cast16: float16 weights behind Casts) are made from the zoo's float32
exports by models/variants.py.

For each variant a rewrite must keep every initializer's dtype, every I/O type and every Cast target,
pass onnx.checker's full (typed) check, and compute what the same rewrite computes on a float32 model
with the same (rounded) weights: its weights are that rewrite's weights rounded to the variant's type,
and its outputs agree within the tolerance `validate` uses for the variant's dtype. The exact methods
(HyperCloning, identity blocks) also preserve the variant's own outputs within that tolerance.

ONNX Runtime's CPU provider has no bfloat16 kernels for the arithmetic ops (Add, Mul, MatMul, Where,
...), so bfloat16 numerics are checked in the torch bridge instead, and the ORT-based checks skip
with ORT's own message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import onnxgrow
from onnxgrow import modelio

from models.variants import HALF, half_tensor
from models.variants import variant as make_variant
from onnxgrow.api import deepen
from onnxgrow.cli import app
from onnxgrow.errors import OnnxgrowError
from onnxgrow.structure import weight_of
from onnxgrow import tolerance as tol
from onnxgrow.verify import IO_MAP_KEY, make_inputs, open_session, validate

MODELS = ["gpt2-ts17", "llama-gqa-ts17", "bert-ts17"]
VARIANTS = ["float16", "bfloat16", "cast16"]
METHODS = ["hypercloning", "fpi", "identity", "stack", "subclone"]
EXACT = ["hypercloning", "identity"]
COMPUTE = {"float16": "float16", "bfloat16": "bfloat16", "cast16": "float32"}  # dtype of the outputs
# validate's default: by the output dtype, or by the weights' dtype when that is less precise (cast16)
RULE = {v: tol.BY_DTYPE[half_name] for v, half_name in
        (("float16", "float16"), ("bfloat16", "bfloat16"), ("cast16", "float16"))}
IDS = np.random.default_rng(0).integers(0, 500, (8, 16))  # subclone's calibration ids
runner = CliRunner()


# --- making the variants (models/variants.py) ---------------------------------------------------


class Variants:
    """Variants and rewrites, made on first use and kept for the module (tests share them)."""

    def __init__(self, zoo, folder: Path):
        self.zoo, self.folder, self.paths, self.rewrites = zoo, folder, {}, {}

    def path(self, name: str, variant: str) -> Path:
        """variant: float16 | bfloat16 | cast16, or ref-float16 / ref-bfloat16 (float32, rounded weights)."""
        key = (name, variant)
        if key not in self.paths:
            model = make_variant(onnx.load(self.zoo[name]["file"]), variant)
            path = self.folder / f"{name}.{variant}.onnx"
            onnx.save(model, path)
            self.paths[key] = path
        return self.paths[key]

    def rewrite(self, name: str, variant: str, method: str) -> tuple[Path, object]:
        """(path of the rewritten model, subclone result or None)."""
        key = (name, variant, method)
        if key not in self.rewrites:
            source = self.path(name, variant)
            c = self.zoo[name]["config"]
            result = None
            if method == "hypercloning":
                model = onnxgrow.widen(source, 2)
            elif method == "fpi":
                model = onnxgrow.widen(source, hidden=c["hidden_size"] * 3 // 2, heads=c["num_heads"] * 3 // 2,
                                       kv_heads=c["num_kv_heads"] * 3 // 2, ffn=c["ffn_size"] * 3 // 2,
                                       method="fpi")
            elif method == "identity":
                model = deepen(source, factor=2)
            elif method == "stack":
                model = deepen(source, 3, method="stack")
            else:
                from onnxgrow.subcloning import subclone_ir
                result = subclone_ir(modelio.load(source), IDS, hidden=c["hidden_size"] // 2, provider="cpu")
                model = ir.to_proto(result.model)
            path = self.folder / f"{name}.{variant}.{method}.onnx"
            onnx.save(model, path)
            self.rewrites[key] = (path, result)
        return self.rewrites[key]


@pytest.fixture(scope="module")
def variants(zoo, tmp_path_factory):
    return Variants(zoo, tmp_path_factory.mktemp("dtypes"))


def ort_cannot_run(path: Path) -> str | None:
    """Why ONNX Runtime's CPU provider cannot load the model, or None when it can."""
    try:
        open_session(path, "cpu")
    except OnnxgrowError as e:
        return f"onnxruntime {ort.__version__} CPUExecutionProvider: {e}"
    return None


def skip_unless_ort_runs(path: Path) -> None:
    reason = ort_cannot_run(path)
    if reason is not None:
        pytest.skip(reason)


def cases(methods=METHODS, names=MODELS, kinds=VARIANTS):
    """(name, variant, method) params. Identity blocks need pre-norm (not BERT)."""
    params = []
    for name in names:
        for variant in kinds:
            for method in methods:
                if method == "identity" and name.startswith("bert"):
                    continue
                params.append(pytest.param(name, variant, method, id=f"{name}-{variant}-{method}"))
    return params


def origin(name: str) -> str:
    """The source tensor a rewritten one stands for: without the suffixes that normalize
    ("__1") and copied blocks (".b0c1") add."""
    while True:
        stripped = re.sub(r"(__\d+|\.b\d+c\d+)$", "", name)
        if stripped == name:
            return name
        name = stripped


def float_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """name -> data type of every float initializer and Constant tensor."""
    found = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.type == onnx.AttributeProto.TENSOR:
                found[n.output[0]] = a.t.data_type
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    return {k: v for k, v in found.items() if v in floats}


def io_types(model: onnx.ModelProto) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}


def cast_targets(model: onnx.ModelProto) -> set[int]:
    return {a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}


# --- the variants themselves ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_variant_is_recognised(zoo, variants, name, variant):
    path = variants.path(name, variant)
    onnx.checker.check_model(str(path), full_check=True)
    assert onnxgrow.inspect(path) == onnxgrow.inspect(zoo[name]["file"])  # the same transformer, found
    spec = onnxgrow.structure(path)
    weights = [spec.token_embedding] + [
        weight_of(spec.flow, p)[0] for b in spec.blocks for p in (
            b.attention.q_proj, b.attention.k_proj, b.attention.v_proj, b.attention.o_proj, b.ffn.up, b.ffn.down)]
    for weight in weights:
        assert weight.const_value.dtype == ir.DataType(HALF[variant]), weight.name
        if variant == "cast16":  # found through the Cast that reads it
            assert [n.op_type for n in weight.consumers()] == ["Cast"], weight.name


@pytest.mark.parametrize("name", MODELS)
def test_ort_cpu_runs_the_variants(variants, name):
    """float16 and cast16 run on ONNX Runtime's CPU provider. bfloat16 does not (onnxruntime 1.32 has no
    CPU kernel for bfloat16 Add, Mul, MatMul, Where, Softmax, ...): the only acceptable reason is a
    missing kernel, and validate says so in one line."""
    for variant in ("float16", "cast16"):
        assert ort_cannot_run(variants.path(name, variant)) is None
    why = ort_cannot_run(variants.path(name, "bfloat16"))
    assert why is None or ("Could not find an implementation for" in why and "bfloat16" in why), why


# --- rewrites keep dtypes -------------------------------------------------------------------------------------


def assert_dtypes_kept(source: onnx.ModelProto, target: onnx.ModelProto, variant: str) -> None:
    before, after = float_dtypes(source), float_dtypes(target)
    unknown = sorted(k for k in after if origin(k) not in before)
    assert not unknown  # every float tensor of the rewrite stands for one of the source's
    changed = {k: (before[origin(k)], v) for k, v in after.items() if before[origin(k)] != v}
    assert not changed  # ... and has its type
    assert {k: v for k, v in io_types(target).items() if k in io_types(source)} == io_types(source)
    assert cast_targets(target) <= cast_targets(source)
    if variant == "cast16":  # the weights are still float16 (checked above), each read through a Cast
        consumers = {}
        for n in target.graph.node:
            for x in n.input:
                consumers.setdefault(x, []).append(n)
        halves = [t.name for t in target.graph.initializer if t.data_type == TensorProto.FLOAT16]
        assert len(halves) >= sum(t == TensorProto.FLOAT16 for t in before.values())
        for name in halves:
            assert [c.op_type for c in consumers.get(name, [])] == ["Cast"], name


def assert_blocks_have_own_weights(path: Path) -> None:
    spec = onnxgrow.structure(path)
    weights = [weight_of(spec.flow, b.attention.o_proj)[0].name for b in spec.blocks]
    assert len(set(weights)) == len(weights), weights


@pytest.mark.parametrize("name, variant, method", cases())
def test_rewrite_keeps_dtypes(zoo, variants, name, variant, method):
    if method == "subclone" and variant == "bfloat16":
        skip_unless_ort_runs(variants.path(name, variant))  # calibration runs the model in ORT
    path, _ = variants.rewrite(name, variant, method)
    onnx.checker.check_model(str(path), full_check=True)  # typed: every value's type checked
    source, target = onnx.load(variants.path(name, variant)), onnx.load(path)
    assert_dtypes_kept(source, target, variant)
    got = onnxgrow.inspect(path)  # the rewrite is still recognised, at its new size
    c = zoo[name]["config"]
    expected = {"hypercloning": (2 * c["hidden_size"], c["num_layers"]),
                "fpi": (c["hidden_size"] * 3 // 2, c["num_layers"]),
                "identity": (c["hidden_size"], 2 * c["num_layers"]), "stack": (c["hidden_size"], 3),
                "subclone": (c["hidden_size"] // 2, c["num_layers"])}[method]
    assert (got["hidden_size"], got["num_layers"]) == expected
    assert_blocks_have_own_weights(path)


# --- rewrites compute what the float32 rewrite computes -----------------------------------------------------


def without_io_map(path: Path) -> Path:
    """A copy that validate compares output by output as it is (both rewrites have the same shapes)."""
    model = onnx.load(path)
    keep = [p for p in model.metadata_props if not p.key.startswith("onnxgrow.io")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    out = path.with_suffix(".plain.onnx")
    onnx.save(model, out)
    return out


def base_name(name: str) -> str:
    return name.replace(".fp16", "")


@pytest.mark.parametrize("name, variant, method", cases(kinds=["float16", "cast16"]))
def test_rewrite_matches_the_float32_rewrite(variants, name, variant, method):
    half = HALF[variant]
    path, result = variants.rewrite(name, variant, method)
    reference, ref_result = variants.rewrite(name, "ref-float16", method)
    if result is not None:  # subclone ranks on its own activations: same choices, here
        assert result.kept_hidden == ref_result.kept_hidden
    want = {t.name: numpy_helper.to_array(half_tensor(t, half)) for t in onnx.load(reference).graph.initializer
            if t.data_type == TensorProto.FLOAT}
    for t in onnx.load(path).graph.initializer:
        if t.data_type != half or base_name(t.name) not in want:
            continue
        got, expected = numpy_helper.to_array(t), want[base_name(t.name)]
        if method == "subclone" and got.ndim == 1:  # norm gains measured in the variant's dtype
            np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=1e-2)
        else:  # copying, dividing by copy counts and zeroing commute with rounding
            np.testing.assert_array_equal(got, expected, err_msg=t.name)
    report = validate(reference, without_io_map(path), provider="cpu")
    for o in report.outputs:
        assert (o.dtype, o.rule) == (COMPUTE[variant], RULE[variant])
    assert report.passed, report.to_dict()
    print(f"{name} {variant} {method}: vs float32 rewrite max abs {max(o.max_abs_diff for o in report.outputs):.2e}")


@pytest.mark.parametrize("name, variant, method", cases(EXACT))
def test_exact_methods_preserve_outputs(variants, name, variant, method):
    source = variants.path(name, variant)
    skip_unless_ort_runs(source)
    path, _ = variants.rewrite(name, variant, method)
    report = validate(source, path, provider="cpu")
    rule = RULE[variant]
    assert report.tolerances == {COMPUTE[variant]: {"atol": rule.atol, "rtol": rule.rtol}}
    assert report.passed, report.to_dict()
    worst = max(max(o.max_abs_diff, o.copies_max_abs or 0.0) for o in report.outputs)
    if variant == "cast16":  # halving float16 weights is exact, and the graph computes in float32
        assert all(max(o.max_abs_diff, o.copies_max_abs or 0.0) <= tol.BY_DTYPE["float32"].bound(o.scale)
                   for o in report.outputs)
    print(f"{name} {variant} {method}: max abs {worst:.2e} ({rule.describe()})")


@pytest.mark.parametrize("name, method", [(n, m) for n in MODELS for m in EXACT
                                          if not (m == "identity" and n.startswith("bert"))])
def test_bfloat16_exact_methods_in_torch(variants, name, method):
    """ORT's CPU provider cannot run bfloat16 graphs; the torch bridge can (it computes norms, softmax
    and reductions in float32, the rest in bfloat16). Outputs are compared at the first copy of
    every widened axis, as validate does."""
    import torch
    from onnxgrow.bridge import to_torch

    source = variants.path(name, "bfloat16")
    path, _ = variants.rewrite(name, "bfloat16", method)
    io_map = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}.get(IO_MAP_KEY, "{}"))
    worst = scale = 0.0
    for batch, seq in ((1, 5), (2, 9)):
        feeds = make_inputs(source, batch, seq)
        with torch.no_grad():
            want = to_torch(source)(**feeds)
            got = to_torch(path)(**feeds)
        for out, expected in want.items():
            actual = got[out].float().numpy()
            for axis, index in io_map.get("outputs", {}).get(out, {}).items():
                first = [index.index(j) for j in range(expected.shape[int(axis)])]
                actual = np.take(actual, first, axis=int(axis))
            reference = expected.float().numpy()
            worst = max(worst, float(np.abs(actual - reference).max()))
            scale = max(scale, float(np.abs(reference).max()))
    assert worst <= tol.BY_DTYPE["bfloat16"].bound(scale)
    print(f"{name} bfloat16 {method} (torch bridge): max abs {worst:.2e}")


@pytest.mark.parametrize("name", ["gpt2-ts17", "llama-gqa-ts17"])
def test_cast16_block_removal_drops_the_blocks_weights(variants, name):
    """Removing a block removes its weights, float16 initializers behind Casts that only the block
    reads, with those Casts: what is left is the float32 model's result weight for weight, each still
    float16 behind its own Cast, and no node is left dead."""
    from onnxgrow.subcloning import subclone_ir

    def drop_first(variant):
        return ir.to_proto(subclone_ir(modelio.load(variants.path(name, variant)), IDS[:2], keep_layers=[1],
                                       provider="cpu").model)

    before, model, reference = onnx.load(variants.path(name, "cast16")), drop_first("cast16"), drop_first("ref-float16")
    halves = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    stored = {t.name for t in before.graph.initializer if t.data_type == TensorProto.FLOAT16}
    want = {t.name + ".fp16": numpy_helper.to_array(t) for t in reference.graph.initializer
            if t.name + ".fp16" in stored}  # the float32 result's weights that cast16 stores as float16
    assert sorted(halves) == sorted(want) and len(halves) < len(stored)
    for k, got in halves.items():
        np.testing.assert_allclose(got.astype(np.float32), want[k], rtol=1e-2 if got.ndim == 1 else 0, err_msg=k)
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in halves]
    assert sorted(n.input[0] for n in casts) == sorted(halves)  # one Cast each
    read = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    assert [n.name for n in model.graph.node if not any(y in read for y in n.output)] == []


def test_deepen_noise_reaches_bfloat16_copies(variants):
    """--noise perturbs the copies' float weights in bfloat16 too (numpy files ml_dtypes.bfloat16 under
    kind "V", not "f"), keeps their dtype, and leaves the original blocks' weights as they were."""
    path = variants.path("llama-gqa-ts17", "bfloat16")
    plain, noisy = deepen(path, at=[0], method="stack"), deepen(path, at=[0], method="stack", noise=0.05)
    assert [(t.name, t.data_type) for t in plain.graph.initializer] == \
        [(t.name, t.data_type) for t in noisy.graph.initializer]
    a = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in noisy.graph.initializer}
    changed = {n for n in a if not np.array_equal(a[n], b[n])}
    copies = {n for n, w in a.items() if re.search(r"\.b\d+c\d+$", n) and w.ndim >= 1 and w.dtype == ml_dtypes.bfloat16
              and w.astype(np.float32).std() > 0}
    assert copies and changed == copies
    for n in changed:
        step = np.abs(b[n].astype(np.float32) - a[n].astype(np.float32))
        assert 0 < step.mean() < 0.5 * a[n].astype(np.float32).std(), n  # noise at about 5% of the spread


# --- validate names the dtype and the tolerance it used ---------------------------------------------------


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the console width


def test_validate_says_which_dtype_and_tolerance(variants, tmp_path):
    source = variants.path("gpt2-ts17", "float16")
    path, _ = variants.rewrite("gpt2-ts17", "float16", "hypercloning")
    result = runner.invoke(app, ["validate", str(source), str(path)])
    assert result.exit_code == 0, result.output
    assert "tolerance float16: max abs diff <= 1e-3 + 3.9e-3 x max|source| (default for float16)" in flat(result.output)
    result = runner.invoke(app, ["validate", str(source), str(path), "--json"])
    data = json.loads(result.output)
    assert data["tolerances"] == {"float16": {"atol": 1e-3, "rtol": 2**-8}}
    assert data["tolerance"] == "float16: max abs diff <= 1e-3 + 3.9e-3 x max|source| (default for float16)"
    first = data["outputs"][0]
    assert first["dtype"] == "float16" and first["tolerance"] == pytest.approx(1e-3 + 2**-8 * first["scale"])
    given = runner.invoke(app, ["validate", str(source), str(path), "--tolerance", "0.002"])
    assert "tolerance float16: max abs diff <= 2e-3 (given)" in flat(given.output)

    # outputs in two dtypes: each gets its own tolerance, and the table says which
    model = onnx.load(variants.path("gpt2-ts17", "ref-float16"))  # float32 weights
    model.graph.node.append(helper.make_node("Cast", ["logits"], ["logits16"], to=TensorProto.FLOAT16))
    model.graph.output.append(helper.make_tensor_value_info("logits16", TensorProto.FLOAT16, None))
    mixed = tmp_path / "mixed.onnx"
    onnx.save(model, mixed)
    result = runner.invoke(app, ["validate", str(mixed), str(mixed)])
    assert ("float32: max abs diff <= 1e-6 + 1e-5 x max|source| (default for float32); "
            "float16: max abs diff <= 1e-3 + 3.9e-3 x max|source| (default for float16)") in flat(result.output)
    assert "dtype" in result.output and "float16" in flat(result.output).split("dtype", 2)[-1]  # a column


@pytest.mark.parametrize("name", MODELS)
def test_float16_weights_in_a_float32_graph_get_the_float16_tolerance(variants, tmp_path, name):
    """HyperCloning x3 divides float16 weights by 3, which rounds: the float32 outputs then differ
    by ~1e-4, more than float32's rule allows. validate uses the weights' (float16) rule, so the
    exact method is accepted (before, `widen --factor 3` refused to write it)."""
    source = variants.path(name, "cast16")
    out = tmp_path / "wide3.onnx"
    result = runner.invoke(app, ["widen", str(source), "--factor", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "float32: max abs diff <= 1e-3 + 3.9e-3 x max|source| (default for float16 weights)" in flat(result.output)
    assert_dtypes_kept(onnx.load(source), onnx.load(out), "cast16")
    report = validate(source, out, provider="cpu")
    assert report.passed and all(o.weights_dtype == "float16" for o in report.outputs)
    worst = max(o.max_abs_diff for o in report.outputs)
    assert worst < 1e-3
    print(f"{name} cast16 hypercloning x3: max abs {worst:.2e}")


def test_validate_explains_missing_bfloat16_kernels(variants, monkeypatch):
    """Without torch there is no bridge to fall back on: ONNX Runtime's refusal is explained."""
    from onnxgrow import runtime
    monkeypatch.setattr(runtime.BridgeSession, "open", classmethod(lambda cls, path, provider: None))
    with pytest.raises(OnnxgrowError, match="no kernel for this op in this model's dtype"):
        validate(variants.path("gpt2-ts17", "bfloat16"), variants.path("gpt2-ts17", "bfloat16"), provider="cpu")


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_rewrites_are_verified_in_the_torch_bridge(variants, tmp_path, name):
    """ONNX Runtime's CPU provider cannot run bfloat16 graphs: widen's own check runs both models in
    the torch bridge instead (on the same device), says so, and still catches a wrong weight."""
    source = variants.path(name, "bfloat16")
    out = tmp_path / "wide.onnx"
    result = runner.invoke(app, ["widen", str(source), "--factor", "2", "--provider", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "torch bridge (cpu)" in flat(result.output)
    report = validate(source, out, provider="cpu")
    assert report.passed and report.provider == "torch bridge (cpu)"
    assert report.outputs[0].rule == tol.BY_DTYPE["bfloat16"]
    broken = onnx.load(str(out))
    weight = max((t for t in broken.graph.initializer if t.data_type == TensorProto.BFLOAT16), key=lambda t: len(t.raw_data))
    array = numpy_helper.to_array(weight).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array((array * 1.5).astype(ml_dtypes.bfloat16), weight.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    assert not validate(source, tmp_path / "broken.onnx", provider="cpu").passed


@pytest.mark.parametrize("variant", ["float16", "bfloat16", "cast16"])
def test_blockwise_verification_in_every_dtype(variants, monkeypatch, variant):
    """Half-precision segments run in ONNX Runtime like the whole model; a bfloat16 pair on the CPU,
    where only the torch bridge runs it, is compared whole even when blockwise is chosen for size."""
    from onnxgrow import verify
    source = variants.path("gpt2-ts17", variant)
    target, _ = variants.rewrite("gpt2-ts17", variant, "hypercloning")
    monkeypatch.setattr(verify, "BLOCKWISE_ABOVE", 0)
    report = verify.validate(source, target)
    assert report.passed
    assert report.mode == ("whole" if ort_cannot_run(source) else "blockwise")
