"""Block-by-block verification (issue 18, item 1): each model is run one segment at a time (embeddings,
each block, head) and the residual stream after every block is compared too.

It must reach the verdict whole-model validation reaches, with the same max abs diff per output (the
segments compute what the whole graph computes), on every zoo model; and it must name the block that
a wrong weight sits in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from conftest import load_builder
from helpers import zoo_model
from onnxgrow import api, blockwise, modelio, verify
from onnxgrow.api import boundaries_after_insert
from onnxgrow.errors import OnnxgrowError
from onnxgrow.metadata import record_stream_map, stream_map
from onnxgrow.structure import load_structure, weight_of

ALL_ZOO = [spec.name for spec in load_builder().MODELS]
MODELS = Path(__file__).resolve().parent.parent / "models"
# the forms made by tools CI does not install, committed: onnxruntime-genai, other frameworks' exporters
COMMITTED = sorted(str(p.relative_to(MODELS)) for p in [*MODELS.glob("genai/*-fp32/model.onnx"),
                                                        *MODELS.glob("frameworks/*.onnx")])


def rewrite(source, how: str, out):
    model = modelio.load(source)
    grown = api.widen_ir(model, 2) if how == "widen" else api.deepen_ir(model, factor=2)
    modelio.save(grown, out)
    return out


def agree(source, target):
    whole = verify.validate(source, target, blockwise=False)
    blocks = verify.validate(source, target, blockwise=True)
    assert whole.mode == "whole" and blocks.mode == "blockwise"
    assert blocks.passed == whole.passed, (blocks.first_differing_block, blocks.to_dict())
    assert [o.name for o in blocks.outputs] == [o.name for o in whole.outputs]
    for b, w in zip(blocks.outputs, whole.outputs):
        # the same outputs, but ONNX Runtime may fuse across a cut differently: within the tolerance
        assert abs(b.max_abs_diff - w.max_abs_diff) <= w.tolerance, b.name
    return blocks


@pytest.mark.parametrize("name", ALL_ZOO)
def test_blockwise_agrees_with_whole_model_validation_on_widen(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    report = agree(source, rewrite(source, "widen", tmp_path / "wide.onnx"))
    assert report.passed
    # every boundary compared: the embeddings' output and the stream after each block
    assert [b.name for b in report.blocks] == ["embeddings"] + [f"block {i}" for i in range(len(report.blocks) - 1)]
    assert all(b.copies_max_abs is not None for b in report.blocks)  # HyperCloning's copies checked too


@pytest.mark.parametrize("name", [n for n in ALL_ZOO if not n.startswith(("bert", "minilm"))])
def test_blockwise_agrees_with_whole_model_validation_on_identity_deepen(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    report = agree(source, rewrite(source, "deepen", tmp_path / "deep.onnx"))
    assert report.passed
    num = len(load_structure(modelio.load(source)).blocks)
    assert len(report.blocks) == 2 * num + 1  # the identity blocks' streams equal their inputs


@pytest.mark.parametrize("how", ["widen", "deepen"])
@pytest.mark.parametrize("relative", COMMITTED)
def test_blockwise_agrees_with_whole_model_validation_on_committed_forms(tmp_path, relative, how):
    source = MODELS / relative
    if how == "deepen" and api.inspect(source)["norm_position"] == "post":  # Keras' BERT-style encoder
        with pytest.raises(OnnxgrowError, match="pre-norm"):
            rewrite(source, how, tmp_path / "grown.onnx")
        return
    assert agree(source, rewrite(source, how, tmp_path / "grown.onnx")).passed


def corrupt_block(path, index: int, out):
    """The same model with one wrong weight: block `index`'s FFN down projection, one entry moved."""
    model = modelio.load(path)
    spec = load_structure(model)
    weight = weight_of(spec.flow, spec.blocks[index].ffn.down)[0]
    array = weight.const_value.numpy().copy()
    array.flat[7] += 0.5 + abs(array).max()
    weight.const_value = ir.tensor(array, name=weight.name)
    modelio.save(model, out)
    return out


@pytest.mark.parametrize("name, index", [("gpt2-ts17", 1), ("llama-gqa-ts17", 0), ("bert-ortfused-ts17", 1)])
def test_a_wrong_weight_fails_blockwise_verification_naming_its_block(zoo, tmp_path, name, index):
    source = zoo_model(zoo, name)
    wide = rewrite(source, "widen", tmp_path / "wide.onnx")
    bad = corrupt_block(wide, index, tmp_path / "bad.onnx")
    report = verify.validate(source, bad, blockwise=True)
    assert not report.passed
    assert report.first_differing_block == f"block {index}"
    passed = [b.name for b in report.blocks if b.passed]
    assert passed == ["embeddings"] + [f"block {i}" for i in range(index)]  # the blocks before it are fine


def test_the_cli_names_the_first_differing_block_and_exits_1(zoo, tmp_path):
    source = zoo_model(zoo, "gpt2-ts17")
    bad = corrupt_block(rewrite(source, "widen", tmp_path / "wide.onnx"), 1, tmp_path / "bad.onnx")
    run = subprocess.run([sys.executable, "-m", "onnxgrow", "validate", str(source), str(bad), "--blockwise"],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "first block that differs: block 1" in " ".join(run.stdout.split())
    run = subprocess.run([sys.executable, "-m", "onnxgrow", "validate", str(source), str(bad), "--blockwise",
                          "--json"], capture_output=True, text=True)
    result = json.loads(run.stdout)
    assert result["mode"] == "blockwise" and result["first_differing_block"] == "block 1"
    assert {"max_abs_diff", "max_rel_diff", "cosine", "passed"} <= set(result["blocks"][0])


def test_widen_refuses_to_write_a_model_whose_block_differs(zoo, tmp_path, monkeypatch):
    """write_checked's verification is blockwise when asked: a wrong rewrite writes nothing."""
    from onnxgrow import resize
    source = zoo_model(zoo, "gpt2-ts17")
    real = resize.resize_array

    def off_by_a_bit(old, maps, contracted, rule, rng):
        new = real(old, maps, contracted, rule, rng)
        return new * np.float32(1.01) if new.shape == (2 * ffn, 2 * hidden) else new
    config = api.inspect(source)
    ffn, hidden = config["ffn_size"], config["hidden_size"]
    monkeypatch.setattr(resize, "resize_array", off_by_a_bit)  # every FFN down projection 1% off
    out = tmp_path / "wide.onnx"
    from typer.testing import CliRunner
    from onnxgrow.cli import app
    result = CliRunner().invoke(app, ["widen", str(source), "--factor", "2", "-o", str(out), "--blockwise"])
    assert result.exit_code == 1 and not out.exists()
    assert "first block that differs: block 0" in " ".join(result.output.split())


def test_blockwise_is_chosen_for_big_pairs_only(zoo, tmp_path, monkeypatch):
    source = zoo_model(zoo, "gpt2-ts17")
    wide = rewrite(source, "widen", tmp_path / "wide.onnx")
    assert verify.validate(source, wide).mode == "whole"
    monkeypatch.setattr(verify, "BLOCKWISE_ABOVE", 1000)  # bytes: every pair is "big"
    assert verify.validate(source, wide).mode == "blockwise"
    assert verify.validate(source, wide, blockwise=False).mode == "whole"


def test_a_model_without_blocks_is_refused_blockwise_in_one_line(tmp_path):
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    node = ir.Node("", "Relu", [x], outputs=[y])
    model = ir.Model(ir.Graph([x], [y], nodes=[node], opset_imports={"": 17}, name="relu"), ir_version=10)
    path = modelio.save(model, tmp_path / "relu.onnx")
    with pytest.raises(OnnxgrowError, match="cannot verify block by block"):
        verify.validate(path, path, blockwise=True)
    assert verify.validate(path, path).passed  # unasked, a model that cannot be cut is compared whole


def test_each_block_segment_reads_only_its_own_weights(zoo):
    """What bounds the memory: a block's segment loads that block's projections and no other's."""
    path = zoo_model(zoo, "gpt2-ts17")
    segments = blockwise.cut(modelio.load(path))
    assert [s.label for s in segments] == ["embeddings", "block 0", "block 1", "head"]
    spec = load_structure(modelio.load(path))

    def projections(block):
        nodes = [block.attention.q_proj, block.attention.k_proj, block.attention.v_proj, block.attention.o_proj,
                 block.ffn.up, block.ffn.down]
        return {weight_of(spec.flow, n)[0].name for n in nodes}
    for i, block in enumerate(spec.blocks):
        loaded = {v.name for v in segments[i + 1].initializers}
        others = set().union(*(projections(b) for j, b in enumerate(spec.blocks) if j != i))
        assert projections(block) <= loaded and not loaded & others
    assert spec.token_embedding.name in {v.name for v in segments[0].initializers}


def test_stream_maps_compose_over_steps():
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    record_stream_map(model, hidden=[0, 1, 0, 1])  # widened x2
    record_stream_map(model, hidden=[0, 1, 2, 3, 2, -1])  # then to 6: a new slot
    assert stream_map(model)["hidden"] == [0, 1, 0, 1, 0, -1]
    record_stream_map(model, boundaries=[0, 1, 1, 2])  # an identity block after block 0
    record_stream_map(model, boundaries=[0, 1, 2, 3, None])  # then a stacked copy at the end
    assert stream_map(model)["boundaries"] == [0, 1, 1, 2, None]


def test_deepened_boundaries_follow_identity_copies_and_stop_at_others():
    # 3 blocks; an identity copy after block 0, a stacked (trained) copy after block 1
    assert boundaries_after_insert(3, {0: [(0, True)], 1: [(1, False)]}) == [0, 1, 1, 2, None, None]
    assert boundaries_after_insert(2, {}) == [0, 1, 2]


def test_blockwise_compares_a_subclone_like_whole_model_validation(zoo, tmp_path):
    """A subclone has fewer, narrower blocks: no stream stands for the source's; the outputs are
    compared at the kept indices, as whole-model validation compares them."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    source, small = zoo_model(zoo, "gpt2-optimum-kv"), tmp_path / "small.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxgrow", "subclone", str(source), "--hidden", "32", "--layers", "1",
                          "--calib", str(text), "--bytes", "-o", str(small), "--no-report"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    whole = verify.validate(source, small, blockwise=False)
    blocks = verify.validate(source, small, blockwise=True)
    assert blocks.blocks == [] and blocks.passed == whole.passed
    for b, w in zip(blocks.outputs, whole.outputs):
        assert b.name == w.name and abs(b.max_abs_diff - w.max_abs_diff) <= 1e-5 * max(1.0, w.scale)
