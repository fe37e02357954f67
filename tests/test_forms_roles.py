"""Forms whose parts are told apart by their role in the graph (issue #13, items 4 and 5).

- gpt2-fresh-dynamo18, llama-gqa-fresh-dynamo18: freshly initialised models exported by dynamo, whose
  optimizer merges equal initializers: every LayerNorm (RMSNorm) reads one all-ones tensor. normalize
  gives each norm its own copy, so a rewrite of one (the final norm of a tied head) leaves the others.
- bert-notypes-ts17: a BERT exported with input_ids and attention_mask only. Its token-type table
  (2 rows) is looked up by constant zeros, not by an input: it must not be taken for the positions.

Every command runs on each form (inspect, widen by each method, deepen by each method, subclone,
validate, train, export-weights), and the exact methods stay exact.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from rich.console import Console
from safetensors.numpy import load_file

import onnxgrow
from onnxgrow import modelio
from onnxgrow import training
from onnxgrow.errors import OnnxgrowError
from onnxgrow.normalize import normalize
from onnxgrow.structure import load_structure
from onnxgrow.verify import plan_inputs, run_model
from onnxgrow.weights import export_weights
from helpers import assert_close_to_scale, save_and_validate, worst, zoo_model

FRESH = ["gpt2-fresh-dynamo18", "llama-gqa-fresh-dynamo18"]
NOTYPES = ["bert-notypes-ts17"]
FORMS = FRESH + NOTYPES
PRE_NORM = FRESH

# The dynamo optimizer also drops a Linear's all-zero bias (a Gemm without C): GPT-2's four biases per
# block (c_attn 192, attn c_proj 64, c_fc 160, mlp c_proj 64) are not in the graph to be counted.
ABSENT_PARAMETERS = {"gpt2-fresh-dynamo18": 2 * (192 + 64 + 160 + 64)}


def shared_norm_weights(path) -> list[str]:
    """Float initializers of rank 1 read by several nodes of the graph as exported."""
    graph = onnx.load(str(path)).graph
    rank1 = {t.name for t in graph.initializer if len(t.dims) == 1 and t.dims[0] > 1 and t.data_type == 1}
    readers = {}
    for node in graph.node:
        for name in set(node.input) & rank1:
            readers[name] = readers.get(name, 0) + 1
    return [name for name, count in readers.items() if count > 1]


# --- normalization on a hand-built graph ------------------------------------------------------


def two_norms_one_scale() -> onnx.ModelProto:
    """x -> LayerNorm(scale, bias) -> MatMul W -> LayerNorm(scale, bias) -> y: both norms read one
    scale tensor and one bias tensor, as a dynamo export of a fresh model writes them."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(np.ones(8, np.float32), "scale"),
             onnx.numpy_helper.from_array(np.zeros(8, np.float32), "bias"),
             onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["h"], name="norm1", axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["m"], name="proj"),
             helper.make_node("LayerNormalization", ["m", "scale", "bias"], ["y"], name="norm2", axis=-1)]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", 1, ["b", 8])],
                              [helper.make_tensor_value_info("y", 1, ["b", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_two_norms_sharing_a_scale_get_one_copy_each():
    model = normalize(ir.from_proto(two_norms_one_scale()))
    norms = [n for n in model.graph if n.op_type == "LayerNormalization"]
    scales, biases = [n.inputs[1] for n in norms], [n.inputs[2] for n in norms]
    assert scales[0] is not scales[1] and biases[0] is not biases[1]
    assert all(v.is_initializer() for v in scales + biases)
    assert np.array_equal(scales[0].const_value.numpy(), scales[1].const_value.numpy())
    # the copies are separate tensors: a rewrite of one leaves the other as it was
    assert not np.shares_memory(scales[0].const_value.numpy(), scales[1].const_value.numpy())
    aliases = model.graph.meta["onnxgrow_aliases"]
    assert aliases[scales[1].name] == "scale" and aliases[biases[1].name] == "bias"
    onnx.checker.check_model(ir.to_proto(model))


def test_a_tied_table_stays_one_tensor():
    """The token table read by its Gather and, through a Transpose, by the LM head is one parameter."""
    from unit.toy import build
    proto = build(tied=True)
    model = normalize(ir.from_proto(proto))
    before = {t.name for t in proto.graph.initializer}
    tables = [n.inputs[0] for n in model.graph if n.op_type == "Gather" and n.inputs[0].is_initializer()
              and len(n.inputs[0].const_value.shape) == 2]
    assert tables and all(len(list(t.uses())) == 2 for t in tables[:1])  # Gather and Transpose
    assert not [n for n in model.graph.initializers if n not in before and n.startswith(tables[0].name)]


# --- the zoo forms -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", FRESH)
def test_fresh_exports_really_share_their_norm_weights(zoo, name):
    assert shared_norm_weights(zoo_model(zoo, name)), "the form no longer has what it tests"
    spec = load_structure(modelio.load(zoo_model(zoo, name)))
    scales = [n.scale for b in spec.blocks for n in b.norms] + [spec.final_norm.scale]
    assert len(scales) == 5 and len(set(scales)) == 5  # two per block and the final one, each its own


@pytest.mark.parametrize("name", FORMS)
def test_inspect_gives_the_true_configuration(zoo, name):
    entry = zoo[name]
    got = onnxgrow.inspect(entry["file"])
    want = dict(entry["config"])
    want["num_parameters"] -= ABSENT_PARAMETERS.get(name, 0)
    if want["positional"] != "learned":
        want["max_positions"] = None  # rotary: no table in the graph says how far it reaches
    assert {k: got[k] for k in want if k in got} == {k: want[k] for k in want if k in got}


def test_bert_without_token_types_finds_its_tables(zoo):
    path = zoo_model(zoo, "bert-notypes-ts17")
    spec = load_structure(modelio.load(path))
    assert spec.position_embedding.const_value.shape[0] == 128
    assert spec.token_type_embedding.const_value.shape[0] == 2
    assert [(s.name, s.kind) for s in plan_inputs(modelio.load(path)).specs] == [
        ("input_ids", "tokens"), ("attention_mask", "mask")]


@pytest.mark.parametrize("name", FORMS)
def test_hypercloning_x2_is_exact(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    report = save_and_validate(onnxgrow.widen(source, 2), source, tmp_path / "wide.onnx")
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    got, src = onnxgrow.inspect(tmp_path / "wide.onnx"), zoo[name]["config"]
    assert got["hidden_size"] == 2 * src["hidden_size"]
    assert got["max_positions"] == onnxgrow.inspect(source)["max_positions"]


@pytest.mark.parametrize("name", PRE_NORM)
def test_identity_deepen_x2_is_bit_exact(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    report = save_and_validate(onnxgrow.deepen(source, factor=2), source, tmp_path / "deep.onnx", tolerance=1e-5)
    assert report.passed and worst(report) == 0.0, report.to_dict()
    assert onnxgrow.inspect(tmp_path / "deep.onnx")["num_layers"] == 4


def test_identity_deepen_is_refused_for_post_norm_bert(zoo):
    with pytest.raises(OnnxgrowError, match="pre-norm"):
        onnxgrow.deepen(zoo_model(zoo, "bert-notypes-ts17"), factor=2)


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
@pytest.mark.parametrize("name", FORMS)
def test_any_size_widening_runs_and_validates(zoo, tmp_path, name, method):
    c = zoo[name]["config"]
    target = dict(hidden=c["hidden_size"] * 3 // 2, heads=c["num_heads"] * 3 // 2,
                  kv_heads=c["num_kv_heads"] * 3 // 2, ffn=c["ffn_size"] * 3 // 2)
    source = zoo_model(zoo, name)
    report = save_and_validate(onnxgrow.widen(source, method=method, **target), source, tmp_path / "wide.onnx")
    for output in report.outputs:
        assert np.isfinite(output.max_abs_diff) and output.cosine > 0.5
    got = onnxgrow.inspect(tmp_path / "wide.onnx")
    assert (got["hidden_size"], got["num_heads"], got["num_kv_heads"], got["ffn_size"]) == tuple(target.values())


@pytest.mark.parametrize("method", ["stack", "interleave"])
@pytest.mark.parametrize("name", FORMS)
def test_stack_and_interleave_run_and_validate(zoo, tmp_path, name, method):
    source = zoo_model(zoo, name)
    report = save_and_validate(onnxgrow.deepen(source, 3, method=method), source, tmp_path / "deep.onnx")
    assert all(o.cosine is not None and np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(tmp_path / "deep.onnx")["num_layers"] == 3


@pytest.mark.parametrize("name", FORMS)
def test_subclone_runs(zoo, tmp_path, name):
    c = zoo[name]["config"]
    source = zoo_model(zoo, name)
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], 4000)
    small = onnxgrow.subclone(source, ids, samples=8, seq=16, hidden=c["hidden_size"] // 2, layers=1,
                              provider="cpu")
    out = tmp_path / "small.onnx"
    onnx.save(small, str(out))
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"]) == (c["hidden_size"] // 2, 1)
    assert got["max_positions"] == onnxgrow.inspect(source)["max_positions"]
    report = onnxgrow.validate(source, out)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)


@pytest.mark.parametrize("name", FORMS)
def test_train_two_steps_writes_a_model_ort_runs(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "trained.onnx"
    training.train(source, text, use_bytes=True, steps=2, batch=2, seq=16, device="cpu", output=out,
                   checkpoint_every=0, console=Console(file=io.StringIO()))
    feeds = plan_inputs(modelio.load(out)).make(2, 16)
    outputs = run_model(out, feeds, "cpu")
    assert all(np.isfinite(v).all() for v in outputs.values())


@pytest.mark.parametrize("name", FORMS)
def test_export_weights_names_every_role(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    tensors = load_file(str(export_weights(source, tmp_path / "w.safetensors")))
    c = zoo[name]["config"]
    assert tensors["embed.tokens"].shape == (c["vocab_size"], c["hidden_size"])
    if c["positional"] == "learned":
        assert tensors["embed.positions"].shape == (c["max_positions"], c["hidden_size"])
    if name in NOTYPES:
        assert tensors["embed.token_types"].shape == (c["type_vocab_size"], c["hidden_size"])
    norms = [k for k in tensors if ".norm" in k and k.endswith(".weight")] + ["final_norm.weight"] * (
        name in FRESH)
    assert len(norms) == 5 if name in FRESH else len(norms) == 4
    if name in FRESH:
        # each norm has its own name; in the graph as exported they are one merged tensor, equal in value
        assert all(np.array_equal(tensors[k], tensors[norms[0]]) for k in norms)
    assert not [k for k in tensors if k.startswith("other.") and tensors[k].ndim == 2], sorted(tensors)


# --- refusals name the node --------------------------------------------------------------------


def test_a_graph_whose_ids_are_not_gathered_is_refused_at_the_reader():
    """An embedding stored as int8 and looked up by a quantized op: the refusal names that op, its
    domain and its node, not just "no token embedding"."""
    from onnxgrow.errors import UnsupportedGraph
    from unit.toy import build
    proto = build()
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and "input_ids" in n.input)
    gather.op_type, gather.domain, gather.name = "GatherPacked", "com.microsoft", "embed_p"
    with pytest.raises(UnsupportedGraph, match="no token embedding.*com.microsoft.*GatherPacked.*'embed_p'"):
        load_structure(ir.from_proto(proto))
    # a quantized lookup is refused before any analysis, naming it too (tests/test_quantized.py)
    gather.op_type, gather.name = "GatherBlockQuantized", "embed_q"
    with pytest.raises(OnnxgrowError, match="quantized weights.*com.microsoft:GatherBlockQuantized.*'embed_q'"):
        load_structure(ir.from_proto(proto))


def test_input_roles_come_from_the_graph_and_names_break_ties():
    """Two int inputs index tables: the larger table is the tokens' unless the other input's name says
    it holds positions (a vocabulary smaller than the position table). An input the graph turns into
    a mask (1 - m) is the mask whatever its name."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((40, 8)).astype(np.float32), "tokens_table"),
             onnx.numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "positions_table"),
             onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("Gather", ["tokens_table", "input_ids"], ["t"]),
             helper.make_node("Gather", ["positions_table", "position_ids"], ["p"]),
             helper.make_node("Add", ["t", "p"], ["x"]),
             helper.make_node("Cast", ["keep"], ["kf"], to=1),
             helper.make_node("Sub", ["one", "kf"], ["drop"]),
             helper.make_node("Unsqueeze", ["drop", "axis"], ["d3"]),
             helper.make_node("Mul", ["x", "d3"], ["y"])]
    inits.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "axis"))
    ints = [helper.make_tensor_value_info(n, onnx.TensorProto.INT64, ["b", "s"])
            for n in ("input_ids", "position_ids", "keep")]
    graph = helper.make_graph(nodes, "roles", ints, [helper.make_tensor_value_info("y", 1, ["b", "s", 8])], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    kinds = {s.name: s.kind for s in plan_inputs(model).specs}
    assert kinds == {"input_ids": "tokens", "position_ids": "positions", "keep": "mask"}


def test_a_position_ids_input_is_not_taken_for_the_tokens():
    """Positions given as an input, from a table larger than the vocabulary: the token table is the
    one input_ids looks up, and the position table keeps its role and its size."""
    from unit.toy import build
    proto = build(vocab=8, max_positions=30)
    lookup = next(n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] == "wpe")
    lookup.input[1] = "position_ids"
    proto.graph.input.append(helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, ["b", "s"]))
    spec = load_structure(ir.from_proto(proto))
    assert spec.token_embedding.name == "wte" and spec.position_embedding.name == "wpe"
    assert spec.config()["vocab_size"] == 8 and spec.config()["max_positions"] == 30
