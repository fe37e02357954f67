"""subclone: smaller models chosen from a larger one's weights, ranked on calibration data."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import onnxgrow
from onnxgrow import modelio
from onnxgrow.cli import app
from onnxgrow.structure import distinct, load_structure, parameter_names
from onnxgrow.subcloning import copies, subclone_ir
from onnxgrow.verify import validate
from conftest import DEFAULT_MODEL, ROOT, SMALL_NAMES
from onnxgrow.passes import subclone as method

runner = CliRunner()
IDS = np.random.default_rng(0).integers(0, 500, (16, 24))


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_half_width_half_depth(zoo, tmp_path, name):
    entry = zoo[name]
    c = entry["config"]
    result = subclone_ir(modelio.load(entry["file"]), IDS, hidden=c["hidden_size"] // 2,
                         layers=c["num_layers"] // 2)
    out = modelio.save(result.model, tmp_path / "sub.onnx")  # checked by onnx.checker
    report = validate(entry["file"], out)  # ORT runs both; outputs are compared at the kept dims
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    got = onnxgrow.inspect(out)
    assert got["hidden_size"] == c["hidden_size"] // 2
    assert got["num_heads"] == c["num_heads"] // 2 and got["head_dim"] == c["head_dim"]
    assert got["ffn_size"] == c["ffn_size"] // 2
    assert got["num_layers"] == c["num_layers"] // 2
    assert_keeps_reported_hidden(entry["file"], out, result.kept_hidden)


def assert_keeps_reported_hidden(source, target, kept: list[int]) -> None:
    """Every weight with one hidden axis, whose other axis is not resized (token and position tables,
    an untied head), holds the source's slices at exactly the reported hidden indices. In the default
    rescale mode ("norm") these are not rescaled: only the norms' scales are."""
    src, got = parameters(source), parameters(target)
    d_src, d_got = onnxgrow.inspect(source)["hidden_size"], len(kept)
    compared = 0
    for name, w in src.items():
        if name not in got or w.ndim != 2:
            continue
        changed = [a for a in range(2) if w.shape[a] != got[name].shape[a]]
        if len(changed) == 1 and w.shape[changed[0]] == d_src and got[name].shape[changed[0]] == d_got:
            assert np.array_equal(got[name], np.take(w, kept, axis=changed[0])), name
            compared += 1
    assert compared >= 1  # at least the token table


@pytest.mark.parametrize("name", SMALL_NAMES + ["minilm-ts17"])
def test_same_size_reproduces_the_source(zoo, tmp_path, name):
    entry = zoo[name]
    result = subclone_ir(modelio.load(entry["file"]), IDS[:4])
    report = validate(entry["file"], modelio.save(result.model, tmp_path / "same.onnx"))
    assert report.passed


def test_keep_top_groups_keeps_one_copy_of_each_group_first():
    scores = np.array([5.0, 1.0, 5.0, 3.0, 1.0, 3.0])
    # no copies: the plain top-k (ties to the lower index), factors 1
    plan, factor = method.keep_top_groups(scores, 3, np.arange(6))
    assert plan.source.tolist() == method.keep_top(scores, 3).source.tolist() == [0, 2, 3]
    assert factor.tolist() == [1, 1, 1]
    # 0, 2 are copies (as 1, 4 and 3, 5): the best three units, not two copies of the best one
    groups = np.array([0, 1, 0, 3, 1, 3])
    plan, factor = method.keep_top_groups(scores, 2, groups)
    assert plan.source.tolist() == [0, 3] and factor.tolist() == [2, 2]
    plan, factor = method.keep_top_groups(scores, 3, groups)
    assert plan.source.tolist() == [0, 1, 3] and factor.tolist() == [2, 2, 2]
    # more slots than groups: second copies of the best groups, the group's factor split between them
    plan, factor = method.keep_top_groups(scores, 4, groups)
    assert plan.source.tolist() == [0, 1, 2, 3] and factor.tolist() == [1, 2, 1, 2]


@pytest.mark.parametrize("name", ["gpt2-ts17", "llama-gqa-ts17", "bert-ts17"])
def test_a_model_without_copies_has_none(zoo, name):
    spec = load_structure(modelio.load(zoo[name]["file"]))
    for d in [spec.hidden] + distinct(spec.ffn) + distinct(
            x for b in spec.blocks for x in (b.attention.kv_heads, b.attention.group)):
        if d.size > 1:
            assert copies(spec, d).tolist() == list(range(d.size)), d


def parameters(model) -> dict[str, np.ndarray]:
    spec = onnxgrow.structure(model)
    return {n: spec.model.graph.initializers[n].const_value.numpy() for n in parameter_names(spec)}


# fused QKV with a KV cache; grouped-query attention with a KV cache; post-norm encoder
@pytest.mark.parametrize("name", ["gpt2-optimum-kv", "llama-gqa-optimum-kv", "bert-ts17"])
def test_widen_then_subclone_back_gives_back_the_source(zoo, tmp_path, name):
    src = zoo[name]["file"]
    c = zoo[name]["config"]
    wide = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(src, 2), wide)
    result = subclone_ir(modelio.load(wide), IDS[:4], hidden=c["hidden_size"], heads=c["num_heads"],
                         kv_heads=c["num_kv_heads"], ffn=c["ffn_size"])
    back = modelio.save(result.model, tmp_path / "back.onnx")
    source, got = parameters(src), parameters(back)
    assert source.keys() == got.keys()
    assert all(np.array_equal(got[n], x) for n, x in source.items())  # x2: W/2*2 is exact
    report = validate(src, back, tolerance=1e-6)
    assert report.passed and max(o.max_abs_diff for o in report.outputs) == 0.0


@pytest.mark.parametrize("name", ["gpt2-ts17", "llama-gqa-ts17"])
def test_subclone_of_a_clone_is_the_subclone_of_the_source(zoo, tmp_path, name):
    """Un-cloning ranks groups of copies like the source's units and restores their weights, so
    shrinking a HyperCloned model below the source's size picks what shrinking the source picks."""
    src = zoo[name]["file"]
    c = zoo[name]["config"]
    wide = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(src, 2), wide)
    sizes = dict(hidden=c["hidden_size"] // 2, ffn=c["ffn_size"] // 2, rescale="none")
    direct = parameters(subclone_ir(modelio.load(src), IDS[:4], **sizes).model)
    via_clone = parameters(subclone_ir(modelio.load(wide), IDS[:4], **sizes).model)
    assert direct.keys() == via_clone.keys()
    for n, x in direct.items():
        np.testing.assert_allclose(via_clone[n], x, rtol=1e-6, atol=0, err_msg=n)


def test_kv_cache_block_removal_drops_its_cache(zoo, tmp_path):
    src = zoo["llama-gqa-optimum-kv"]["file"]
    result = subclone_ir(modelio.load(src), IDS, keep_layers=[1])
    names = [v.name for v in result.model.graph.inputs]
    assert "past_key_values.0.key" in names and "past_key_values.1.key" not in names
    report = validate(src, modelio.save(result.model, tmp_path / "s.onnx"))
    assert [o.name for o in report.outputs] == ["logits", "present.0.key", "present.0.value"]


@pytest.mark.slow
def test_minilm_subclone_keeps_sentence_embeddings(zoo):
    sys.path.insert(0, str(ROOT / "bench"))
    import subclone_minilm
    for row in subclone_minilm.run(windows=32, held_out=100, targets=((192, 3), (384, 3))):
        assert row["subclone_cosine"] > row["random_cosine"] + 0.2, row
        assert row["subclone_sim_corr"] > row["random_sim_corr"], row


def test_cli_needs_calibration_data(tmp_path):
    result = runner.invoke(app, ["subclone", str(DEFAULT_MODEL), "--hidden", "32", "-o", str(tmp_path / "s.onnx")])
    assert result.exit_code == 2 and "--calib" in result.output
    assert not (tmp_path / "s.onnx").exists()


def test_cli_subclone_with_text_calibration(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text((ROOT / "onnxgrow" / "resize.py").read_text() * 3)
    out = tmp_path / "s.onnx"
    result = runner.invoke(app, ["subclone", str(DEFAULT_MODEL), "--hidden", "32", "--keep-layers", "0",
                                 "--calib", str(text), "--bytes", "--samples", "16", "--seq", "32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"]) == (32, 1)
    assert "subclone_loss" in result.output and "random_loss" in result.output


def test_cli_subclone_without_report(tmp_path):
    out = tmp_path / "s.onnx"
    result = runner.invoke(app, ["subclone", str(DEFAULT_MODEL), "--hidden", "32", "--layers", "1",
                                 "--allow-random-calib", "--samples", "4", "--seq", "16", "--no-report", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "subclone_loss" not in result.output and "wrote" in result.output
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"]) == (32, 1)
