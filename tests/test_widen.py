"""widen: HyperCloning is exact on every export; FPI, AKI and padding run and are measured."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

import onnxgrow
from onnxgrow.cli import app
from onnxgrow.errors import UnsupportedGraph
from onnxgrow.verify import validate
from conftest import DEFAULT_MODEL, SMALL_NAMES
from helpers import save_and_validate, worst

runner = CliRunner()


def exact_fp32(report) -> None:
    """max|Δ| <= 1e-5 * max|ref| + 1e-6 on every output (helpers.assert_close_to_scale)."""
    from helpers import assert_close_to_scale
    assert_close_to_scale(report)


@pytest.mark.parametrize("factor,noise", [(2, 0.0), (3, 0.0), (2, 0.01), (3, 0.01), (2, 0.5)])
@pytest.mark.parametrize("name", SMALL_NAMES)
def test_hypercloning_preserves_outputs(zoo, tmp_path, name, factor, noise):
    entry = zoo[name]
    wide = onnxgrow.widen(entry["file"], factor, noise=noise)
    report = save_and_validate(wide, entry["file"], tmp_path / "wide.onnx")
    assert report.passed, report.to_dict()
    exact_fp32(report)
    got, src = onnxgrow.inspect(tmp_path / "wide.onnx"), entry["config"]
    assert got["hidden_size"] == factor * src["hidden_size"]
    assert got["num_heads"] == factor * src["num_heads"]
    assert got["num_kv_heads"] == factor * src["num_kv_heads"]
    assert got["ffn_size"] == factor * src["ffn_size"]
    assert got["head_dim"] == src["head_dim"] and got["num_layers"] == src["num_layers"]
    assert got["tied_embeddings"] == src["tied_embeddings"]  # tied stays tied, in value


@pytest.mark.parametrize("name", ["gpt2-loud-ts17", "llama-gqa-loud-ts17"])  # logits of |10-30|
def test_hypercloning_is_exact_on_realistic_logits(zoo, tmp_path, name):
    from helpers import zoo_model
    source = zoo_model(zoo, name)
    report = save_and_validate(onnxgrow.widen(source, 2), source, tmp_path / "wide.onnx")
    assert report.passed, (worst(report), report.to_dict())
    exact_fp32(report)


@pytest.mark.parametrize("factor", [2, 3])
def test_hypercloning_minilm(zoo, tmp_path, factor):
    entry = zoo["minilm-ts17"]
    report = save_and_validate(onnxgrow.widen(entry["file"], factor), entry["file"], tmp_path / "wide.onnx")
    assert report.passed
    exact_fp32(report)
    assert onnxgrow.inspect(tmp_path / "wide.onnx")["hidden_size"] == 384 * factor


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_noise_breaks_the_symmetry_between_copies(zoo):
    src = zoo["llama-gqa-dynamo18"]["file"]
    plain, noisy = weights(onnxgrow.widen(src, 2)), weights(onnxgrow.widen(src, 2, noise=0.05))
    changed = [n for n in plain if plain[n].dtype == np.float32 and not np.array_equal(plain[n], noisy[n])]
    assert len(changed) >= 7 * 2  # every weight that sums over copied inputs, in every layer
    w = noisy[changed[0]]
    half = w.shape[0] // 2
    assert not np.allclose(w[:half], w[half:])  # the two copies now differ


def test_each_output_copy_draws_its_own_noise():
    """HyperCloning's reference draws noise independently for every output copy. Drawn before the output
    axis is gathered, the copies of one output unit would get the same noise and stay identical."""
    from onnxgrow.resize import WeightRule, resize_array
    w = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)  # (in, out): axis 0 is summed over
    tiled = np.arange(8) % 4
    new = resize_array(w, [np.arange(6) % 3, tiled], {0}, WeightRule(divide_by_copies=True, noise=0.3),
                       np.random.default_rng(1))
    assert not np.allclose(new[:, :4], new[:, 4:])  # output copies differ
    np.testing.assert_allclose(new[:3] + new[3:], np.tile(w, (1, 2)), atol=1e-6)  # input copies still sum to W


def test_tied_embedding_stays_one_value(zoo):
    wide = weights(onnxgrow.widen(zoo["gpt2-ts17"]["file"], 2))
    table = wide["transformer.wte.weight"]
    copies = [w for w in wide.values() if w.shape == table.T.shape and np.array_equal(w, table.T)]
    assert table.shape == (1000, 128) and copies  # the head's transposed copy equals the grown table


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
@pytest.mark.parametrize("name", SMALL_NAMES)
def test_any_size_methods_run(zoo, tmp_path, name, method):
    entry = zoo[name]
    c = entry["config"]
    target = dict(hidden=c["hidden_size"] * 3 // 2, heads=c["num_heads"] * 3 // 2,
                  kv_heads=c["num_kv_heads"] * 3 // 2, ffn=c["ffn_size"] * 3 // 2)
    wide = onnxgrow.widen(entry["file"], method=method, **target)
    report = save_and_validate(wide, entry["file"], tmp_path / "wide.onnx")
    for output in report.outputs:
        assert np.isfinite(output.max_abs_diff) and output.cosine > 0.5  # ran, and still related
    got = onnxgrow.inspect(tmp_path / "wide.onnx")
    assert (got["hidden_size"], got["num_heads"], got["num_kv_heads"], got["ffn_size"]) == (
        target["hidden"], target["heads"], target["kv_heads"], target["ffn"])


ANY_SIZE = dict(hidden=96, heads=6, kv_heads=3, ffn=240)  # llama-gqa: 64, 4, 2, 160 times 3/2


def projections(model) -> list[list[np.ndarray]]:
    """Per block: the weights of q, k, v, o, up, gate, down, as [in, out] arrays (MatMul's layout)."""
    from onnxgrow.structure import weight_of
    spec = onnxgrow.structure(model)
    return [[weight_of(spec.flow, n)[0].const_value.numpy()
             for n in (b.attention.q_proj, b.attention.k_proj, b.attention.v_proj, b.attention.o_proj,
                       b.ffn.up, b.ffn.gate, b.ffn.down)] for b in spec.blocks]


def test_pad_puts_every_source_weight_in_the_corner(zoo):
    """Padding on a zoo model (the unit tests check two weights of a toy): every parameter holds the
    source in its top-left corner and zeros in every new row and column."""
    from onnxgrow.structure import parameter_names
    source = zoo["llama-gqa-ts17"]["file"]
    old = {n: numpy_helper.to_array(t) for n, t in weights_by_name(onnx.load(source)).items()}
    padded = weights_by_name(onnxgrow.widen(source, method="pad", **ANY_SIZE))
    names = parameter_names(onnxgrow.structure(source))
    grown = 0
    for name in names:
        w, p = old[name], numpy_helper.to_array(padded[name])
        corner = tuple(slice(0, n) for n in w.shape)
        assert p.ndim == w.ndim and np.array_equal(p[corner], w), name
        rest = p.copy()
        rest[corner] = 0
        assert not rest.any(), name
        grown += p.shape != w.shape
    assert grown >= 2 * 7 + 2  # every projection of both blocks, the embedding and the head at least


def test_aki_takes_new_neurons_from_the_next_block_on_a_zoo_model(zoo):
    """AKI = FPI (same copy maps) with each new output neuron of block l taken from block l+1's
    FPI-grown weight; the source's own neurons, and the top block, stay FPI's."""
    source = zoo["llama-gqa-ts17"]["file"]
    old = projections(source)
    fpi = projections(onnxgrow.widen(source, method="fpi", **ANY_SIZE))
    aki = projections(onnxgrow.widen(source, method="aki", **ANY_SIZE))
    for k, w in enumerate(old[0]):
        n = w.shape[-1]  # the source's output neurons come first
        assert np.array_equal(aki[0][k][:, :n], fpi[0][k][:, :n]), k
        assert np.array_equal(aki[0][k][:, n:], fpi[1][k][:, n:]), k
        assert not np.array_equal(aki[0][k], fpi[0][k]), k
        assert np.array_equal(aki[1][k], fpi[1][k]), k  # the top block keeps FPI


def weights_by_name(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def test_fpi_with_integer_factor_is_hypercloning_like(zoo, tmp_path):
    """FPI copying every neuron exactly once more is exact, like HyperCloning."""
    entry = zoo["llama-gqa-dynamo18"]
    spec = onnxgrow.structure(entry["file"])
    from onnxgrow.resize import Plan, Resizer
    from onnxgrow.passes import fpi
    import onnx_ir as ir
    sizes = {d: 2 * d.size for d in [spec.hidden, spec.kv_heads, *spec.ffn]}
    plans = {d: Plan(np.concatenate([np.arange(d.size), np.arange(d.size)])) for d in sizes}
    model = Resizer(spec, plans).apply(fpi.rule())
    report = save_and_validate(ir.to_proto(model), entry["file"], tmp_path / "w.onnx")
    assert report.passed


def custom_op_on_the_stream(tmp_path):
    model = onnx.load(DEFAULT_MODEL)
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    original = ln.output[0]
    ln.output[0] = original + "_pre"
    model.graph.node.insert(list(model.graph.node).index(ln) + 1,
                            onnx.helper.make_node("Mystery", [original + "_pre"], [original], domain="my.ops"))
    model.opset_import.append(onnx.helper.make_opsetid("my.ops", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    return path


def test_unclassifiable_node_is_refused_by_name(tmp_path):
    path = custom_op_on_the_stream(tmp_path)
    with pytest.raises(UnsupportedGraph, match="Mystery"):
        onnxgrow.widen(path, 2)
    before = set(tmp_path.iterdir())
    result = runner.invoke(app, ["widen", str(path), "--factor", "2"])
    assert result.exit_code == 2 and "Mystery" in result.output
    assert set(tmp_path.iterdir()) == before


def test_cli_widen_writes_next_to_input_and_never_overwrites(tmp_path):
    src = tmp_path / "tiny.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    result = runner.invoke(app, ["widen", str(src), "--factor", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny.widen2x.onnx").exists()
    again = runner.invoke(app, ["widen", str(src), "--factor", "2"])
    assert again.exit_code == 2 and "exists" in again.output
    same = runner.invoke(app, ["widen", str(src), "--factor", "2", "-o", str(src), "--force"])
    assert same.exit_code == 2 and "input" in same.output
    assert src.read_bytes() == DEFAULT_MODEL.read_bytes()


def test_cli_rejects_non_integer_hypercloning(tmp_path):
    result = runner.invoke(app, ["widen", str(DEFAULT_MODEL), "--factor", "1.5", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "integer" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_injected_io_map_that_drops_a_source_index_is_caught(zoo, tmp_path, monkeypatch):
    """Injected defect: a widen whose io map leaves one source index out. validate would otherwise
    compare only the indices the map lists; it must fail the output instead."""
    import json

    from onnxgrow import resize
    real = resize.compose_io_maps

    def drop_index_zero(previous, new):
        for axes in new["outputs"].values():
            for axis, index in axes.items():
                axes[axis] = [-1 if i == 0 else i for i in index]
        return real(previous, new)
    monkeypatch.setattr(resize, "compose_io_maps", drop_index_zero)
    source = zoo["gpt2-optimum-kv"]["file"]  # its present.* outputs are widened with the heads
    out = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(source, 2), str(out))
    assert any(axes for axes in json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}
                                           ["onnxgrow.io_map"])["outputs"].values())
    report = validate(source, out, provider="cpu")
    assert not report.passed
    assert any("only a subclone may drop indices" in o.note for o in report.outputs)


def test_the_cli_widens_with_symmetry_breaking_noise_by_default(zoo, tmp_path):
    """`onnxgrow widen` perturbs HyperCloning's copies by default (what kept the head start in training,
    issue #16), still exactly: the written model passed validate. `--noise 0` keeps the copies equal."""
    src = zoo["llama-gqa-dynamo18"]["file"]
    runs = {}
    for name, extra in (("default", []), ("plain", ["--noise", "0"])):
        out = tmp_path / f"{name}.onnx"
        result = runner.invoke(app, ["widen", str(src), "--factor", "2", "-o", str(out)] + extra)
        assert result.exit_code == 0, result.output
        runs[name] = weights(onnx.load(out))
    plain, noisy = runs["plain"], runs["default"]
    changed = [n for n in plain if plain[n].dtype == np.float32 and not np.array_equal(plain[n], noisy[n])]
    assert len(changed) >= 7 * 2
