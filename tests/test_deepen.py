"""deepen: identity blocks are exact on pre-norm models; stacking and interleaving reach the depth."""

from __future__ import annotations

from operator import attrgetter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import onnxgrow
from onnxgrow.api import deepen
from onnxgrow.cli import app
from onnxgrow.errors import OnnxgrowError
from onnxgrow.structure import weight_of
from conftest import DEFAULT_MODEL, SMALL_NAMES
from helpers import assert_close_to_scale, save_and_validate, worst, zoo_model

PRE_NORM = [n for n in SMALL_NAMES if not n.startswith("bert")]  # the Optimum KV-cache exports too
POST_NORM = [n for n in SMALL_NAMES if n.startswith("bert")]
KV_CACHE = [n for n in SMALL_NAMES if "optimum" in n]
LOUD = ["gpt2-loud-ts17", "llama-gqa-loud-ts17"]  # logits of |10-30|, as trained LMs have (models/build.py)
runner = CliRunner()


def assert_identity_is_bit_exact(source, deep: onnx.ModelProto, path) -> None:
    """Identity blocks add exactly 0 to the stream: the outputs are the source's, bit for bit (docs)."""
    report = save_and_validate(deep, source, path, tolerance=1e-5)
    assert report.passed and worst(report) == 0.0, report.to_dict()


@pytest.mark.parametrize("how", [dict(layers=3), dict(factor=2), dict(factor=3), dict(at=[0, 0, 1])])
@pytest.mark.parametrize("name", PRE_NORM)
def test_identity_blocks_preserve_outputs(zoo, tmp_path, name, how):
    entry = zoo[name]
    deep = deepen(entry["file"], **how)
    assert_identity_is_bit_exact(entry["file"], deep, tmp_path / "deep.onnx")
    expected = how.get("layers") or 2 * how.get("factor", 0) or 2 + len(how["at"])
    assert onnxgrow.inspect(tmp_path / "deep.onnx")["num_layers"] == expected


@pytest.mark.parametrize("name", LOUD)
def test_identity_blocks_are_bit_exact_on_realistic_logits(zoo, tmp_path, name):
    deep = deepen(zoo_model(zoo, name), factor=2)
    assert_identity_is_bit_exact(zoo_model(zoo, name), deep, tmp_path / "deep.onnx")


def test_injected_nonzero_identity_projection_is_caught(zoo, tmp_path, monkeypatch):
    """Injected defect: identity blocks whose output projections are 1e-6 instead of 0."""
    from onnxgrow import resize
    real = resize.set_tensor

    def nearly_zero(value, array):
        real(value, array if array.any() else np.full_like(array, 1e-6))
    monkeypatch.setattr(resize, "set_tensor", nearly_zero)
    source = zoo["llama-gqa-ts17"]["file"]
    with pytest.raises(AssertionError):
        assert_identity_is_bit_exact(source, deepen(source, factor=2), tmp_path / "deep.onnx")


@pytest.mark.parametrize("name", POST_NORM)
def test_identity_is_refused_for_post_norm(zoo, name):
    with pytest.raises(OnnxgrowError, match="pre-norm"):
        deepen(zoo[name]["file"], factor=2)


@pytest.mark.parametrize("name", KV_CACHE)
def test_copied_blocks_get_their_own_cache(zoo, name):
    """A KV-cache export grows past inputs and present outputs with its blocks, numbered in order."""
    deep = deepen(zoo[name]["file"], at=[0])
    inputs = [i.name for i in deep.graph.input]
    outputs = [o.name for o in deep.graph.output]
    for layer in range(3):
        assert f"past_key_values.{layer}.key" in inputs and f"present.{layer}.value" in outputs


# Which source block each block of the deepened 2-block zoo model copies, as the passes' docs say:
# stack repeats the sequence [0, 1, 0, 1] (to 3 blocks, the top block: [0, 1, 1]); interleave follows
# each block by its copy [0, 0, 1, 1] (to 3 blocks, one copy spread evenly: after the last block).
PLACEMENT = {("stack", 3): [0, 1, 1], ("stack", 4): [0, 1, 0, 1],
             ("interleave", 3): [0, 1, 1], ("interleave", 4): [0, 0, 1, 1]}


def block_weights(model) -> list[list[np.ndarray]]:
    """Per block, in order: the weights of its projections (q, k, v, o, up, gate, down) and norms."""
    spec = onnxgrow.structure(model)
    blocks = []
    for b in spec.blocks:
        a = b.attention
        nodes = [a.q_proj, a.k_proj, a.v_proj, a.o_proj] + ([b.ffn.up, b.ffn.gate, b.ffn.down] if b.ffn else [])
        weights, seen = [], set()
        for node in nodes:
            found = weight_of(spec.flow, node) if node is not None else None
            if found is not None and found[0].name not in seen:  # fused qkv: one weight for three
                seen.add(found[0].name)
                weights.append(found[0].const_value.numpy())
        blocks.append(weights)
    return blocks


def assert_blocks_copied_from(deep, source, expected: list[int]) -> None:
    """Block i of `deep` holds exactly the weights of source block expected[i], bit for bit."""
    got, src = block_weights(deep), block_weights(source)
    assert len(got) == len(expected)
    for i, j in enumerate(expected):
        assert len(got[i]) == len(src[j]) and all(np.array_equal(a, b) for a, b in zip(got[i], src[j])), (
            f"block {i} is not a copy of source block {j}")


@pytest.mark.parametrize("method", ["stack", "interleave"])
@pytest.mark.parametrize("name", PRE_NORM + POST_NORM)
def test_stack_and_interleave_reach_the_depth(zoo, tmp_path, name, method):
    entry = zoo[name]
    for layers in (3, 4):
        deep = deepen(entry["file"], layers, method=method)
        report = save_and_validate(deep, entry["file"], tmp_path / f"deep{layers}.onnx")
        assert all(o.cosine is not None and o.cosine > 0 for o in report.outputs)  # ORT ran it
        assert onnxgrow.inspect(tmp_path / f"deep{layers}.onnx")["num_layers"] == layers
        assert_blocks_copied_from(tmp_path / f"deep{layers}.onnx", entry["file"], PLACEMENT[method, layers])


def test_injected_stack_of_block_0_twice_is_caught(zoo, monkeypatch):
    """Injected defect: a stack pass that copies block 0 twice instead of blocks 0 and 1."""
    from onnxgrow import api
    stack = api.load_pass("stack", getattr(api, "DEPTH_PASSES", api.DEEPEN_METHODS))  # what deepen calls
    monkeypatch.setattr(stack, "plan", lambda spec, target, at: {1: [(0, False), (0, False)]})
    source = zoo["gpt2-ts17"]["file"]
    with pytest.raises(AssertionError, match="block 3 is not a copy of source block 1"):
        assert_blocks_copied_from(deepen(source, 4, method="stack"), source, PLACEMENT["stack", 4])


@pytest.mark.parametrize("name", ["gpt2-ts17", "llama-gqa-dynamo18", "neox-ts14", "opt-dynamo18"])
def test_widen_and_deepen_compose(zoo, tmp_path, name):
    src = zoo[name]["file"]
    a = deepen(onnxgrow.widen(src, 2), factor=2)
    b = onnxgrow.widen(deepen(src, factor=2), 2)
    for i, model in enumerate((a, b)):
        report = save_and_validate(model, src, tmp_path / f"m{i}.onnx")
        assert report.passed
        assert_close_to_scale(report)
        got = onnxgrow.inspect(tmp_path / f"m{i}.onnx")
        assert (got["num_layers"], got["hidden_size"]) == (4, 2 * zoo[name]["config"]["hidden_size"])


def test_cli_deepen(tmp_path):
    out = tmp_path / "deep.onnx"
    result = runner.invoke(app, ["deepen", str(DEFAULT_MODEL), "--at", "1,1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert onnxgrow.inspect(out)["num_layers"] == 4
    bad = runner.invoke(app, ["deepen", str(DEFAULT_MODEL), "--at", "7", "-o", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "--at" in bad.output and not (tmp_path / "x.onnx").exists()


def weights_behind(model: onnx.ModelProto, half: bool) -> onnx.ModelProto:
    """Every MatMul weight W stored transposed, read through Transpose (and, `half`, stored as float16
    behind a Cast first): chains of nodes that read no activation, as converters write them."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    chains, matmul = [], {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and t.name in matmul:
            name, w = t.name, numpy_helper.to_array(t)
            stored = np.ascontiguousarray(w.T.astype(np.float16 if half else np.float32))
            t.CopyFrom(numpy_helper.from_array(stored, name + ".t"))
            x = name + ".t"
            if half:
                chains.append(helper.make_node("Cast", [x], [name + ".t32"], to=TensorProto.FLOAT))
                x = name + ".t32"
            chains.append(helper.make_node("Transpose", [x], [name], perm=[1, 0]))
    nodes = chains + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@pytest.mark.parametrize("half", [False, True], ids=["transpose", "cast-transpose"])
def test_weight_side_chains_belong_to_their_block(zoo, tmp_path, half):
    """A block owns the nodes that only compute its weights: identity copies zero their own, stacked
    copies get weights of their own, and removing a block takes its chains and weights along."""
    from onnxgrow import modelio
    from onnxgrow.subcloning import subclone_ir
    source = tmp_path / "chains.onnx"
    onnx.save(weights_behind(onnx.load(zoo["llama-gqa-ts17"]["file"]), half), source)

    deep = deepen(source, factor=2)
    report = save_and_validate(deep, source, tmp_path / "deep.onnx", tolerance=1e-5)
    assert report.passed and worst(report) == 0.0, report.to_dict()
    for model in (deep, deepen(source, 4, method="stack")):
        readers = {}
        for n in model.graph.node:
            for x in n.input:
                readers.setdefault(x, []).append(n.op_type)
        stored = [t.name for t in model.graph.initializer if t.name.endswith(".t") or ".t." in t.name]
        assert len(stored) == len(set(stored)) > 0
        for name in stored:  # each weight read by its own chain, none shared between copies
            assert readers[name] == ["Cast" if half else "Transpose"], name

    small = ir.to_proto(subclone_ir(modelio.load(source), np.zeros((1, 4), np.int64), keep_layers=[1],
                                    provider="cpu").model)
    read = {x for n in small.graph.node for x in n.input} | {o.name for o in small.graph.output}
    assert [n.name for n in small.graph.node if not any(y in read for y in n.output)] == []
    assert not {t.name for t in small.graph.initializer} - read
    spec = onnxgrow.structure(source)
    first = {weight_of(spec.flow, p)[0].name for p in (*attrgetter("q_proj", "k_proj", "v_proj", "o_proj")(
        spec.blocks[0].attention), spec.blocks[0].ffn.up, spec.blocks[0].ffn.down, spec.blocks[0].ffn.gate)}
    assert all(name.endswith(".t") for name in first)  # found through the chains
    before = {t.name for t in onnx.load(source).graph.initializer if t.name.endswith(".t")}
    assert {t.name for t in small.graph.initializer if t.name.endswith(".t")} == before - first
