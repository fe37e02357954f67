"""Tests for onnxgrow.validate on tiny hand-built graphs (milliseconds to build, no torch export).

encoder: input_ids, attention_mask, token_type_ids -> hidden [b, s, 16], logits [b, s, 50]
decoder: Optimum-style inputs (input_ids, position_ids, a KV cache, a mask over past + new tokens)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxgrow.errors import OnnxgrowError
from onnxgrow.verify import IO_MAP_KEY, make_inputs, run_model, validate
from helpers import zoo_model

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
VOCAB, HIDDEN = 50, 16


# --- building models ------------------------------------------------------------------------------


def _init(name, values):
    """A float32 or int64 initializer, whichever kind `values` are."""
    array = np.asarray(values)
    return numpy_helper.from_array(array.astype(np.float32 if array.dtype.kind == "f" else np.int64), name)


def _ints(name):
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what onnxruntime accepts
    onnx.checker.check_model(model)
    return model


def encoder_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        _init("wte", rng.standard_normal((VOCAB, HIDDEN))),
        _init("tte", rng.standard_normal((2, HIDDEN))),
        _init("w1", rng.standard_normal((HIDDEN, HIDDEN)) * 0.5),
        _init("b1", rng.standard_normal(HIDDEN) * 0.1),
        _init("w2", rng.standard_normal((HIDDEN, VOCAB)) * 0.5),
        _init("b2", rng.standard_normal(VOCAB) * 0.1),
        _init("axis_last", [2]),
        _init("axis_seq", [1]),
    ]
    nodes = [
        helper.make_node("Gather", ["wte", "input_ids"], ["tok"]),
        helper.make_node("Gather", ["tte", "token_type_ids"], ["typ"]),
        helper.make_node("Add", ["tok", "typ"], ["h0"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),
        helper.make_node("Mul", ["h0", "mask3"], ["hm"]),
        # mixing along the sequence makes the padded slot matter to every position
        helper.make_node("ReduceMean", ["hm", "axis_seq"], ["ctx"], keepdims=1),
        helper.make_node("Add", ["hm", "ctx"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["mm2"]),
        helper.make_node("Add", ["mm2", "b2"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])]
    return _model(nodes, [_ints("input_ids"), _ints("attention_mask"), _ints("token_type_ids")], outputs, inits)


KV_HEADS, HEAD_DIM, DEC_VOCAB, DEC_HIDDEN, POSITIONS = 2, 4, 40, 8, 32
KEY = "past_key_values.0.key"


def decoder_model(rotary: bool = False, mask_dim: str = "past_sequence_length + sequence_length",
                  float_bias: bool = False) -> onnx.ModelProto:
    """Inputs named and shaped the way Optimum exports a decoder with a KV cache.

    float_bias adds a float input [batch, 1, seq, mask_dim], which only its dim name can size.
    """
    rng = np.random.default_rng(1)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(KEY, TensorProto.FLOAT,
                                      ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", mask_dim]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    inits = [
        _init("wte", rng.standard_normal((DEC_VOCAB, DEC_HIDDEN))),
        _init("w_out", rng.standard_normal((DEC_HIDDEN, DEC_VOCAB))),
        _init("axis_last", [2]),
        _init("axes_heads_dim", [1, 3]),
        _init("axis_seq", [1]),
        _init("scale", np.float32(0.01)),
    ]
    if rotary:  # llama style: positions times inverse frequencies
        inits.append(_init("inv_freq", rng.uniform(0.1, 1.0, (1, DEC_HIDDEN))))
        position_nodes = [
            helper.make_node("Unsqueeze", ["position_ids", "axis_last"], ["pos3"]),
            helper.make_node("Cast", ["pos3"], ["posf"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["posf", "inv_freq"], ["freqs"]),
            helper.make_node("Sin", ["freqs"], ["pos"]),
        ]
    else:  # gpt2 style: a learned table, smaller than the vocabulary
        inits.append(_init("wpe", rng.standard_normal((POSITIONS, DEC_HIDDEN))))
        position_nodes = [helper.make_node("Gather", ["wpe", "position_ids"], ["pos"])]
    nodes = [
        helper.make_node("Gather", ["wte", "input_ids"], ["tok"]),
        *position_nodes,
        helper.make_node("Add", ["tok", "pos"], ["h"]),
        # the mask spans cache and new tokens: [b, past] ++ [b, seq] must line up with it
        helper.make_node("ReduceSum", [KEY, "axes_heads_dim"], ["past_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["h", "axis_last"], ["new_sum"], keepdims=0),
        helper.make_node("Concat", ["past_sum", "new_sum"], ["all_sum"], axis=1),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["all_sum", "maskf"], ["masked"]),
    ]
    if float_bias:
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT,
                                                    ["batch_size", 1, "sequence_length", mask_dim]))
        inits.append(_init("axes_one_seq", [1, 2]))
        nodes += [helper.make_node("ReduceSum", ["bias", "axes_one_seq"], ["bias_sum"], keepdims=0),
                  helper.make_node("Add", ["masked", "bias_sum"], ["scores"])]
    else:
        nodes.append(helper.make_node("Identity", ["masked"], ["scores"]))
    nodes += [
        helper.make_node("ReduceSum", ["scores", "axis_seq"], ["total"], keepdims=1),
        helper.make_node("Unsqueeze", ["total", "axis_last"], ["total3"]),
        helper.make_node("Mul", ["total3", "scale"], ["shift"]),
        helper.make_node("Add", ["h", "shift"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w_out"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", DEC_VOCAB])]
    return _model(nodes, inputs, outputs, inits)


def rename(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    """A copy with tensor `old` called `new` everywhere."""
    model = copy.deepcopy(model)
    g = model.graph
    for node in g.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.name == old:
            v.name = new
    return model


def set_io_map(model: onnx.ModelProto, io_map: dict) -> None:
    helper.set_model_props(model, {IO_MAP_KEY: json.dumps(io_map)})


def widened_hidden(base: onnx.ModelProto, second_copy_offset: float) -> onnx.ModelProto:
    """`hidden` doubled along its last axis, as an exact widening would: [h | h + offset]."""
    model = rename(base, "hidden", "hidden_src")
    model.graph.initializer.append(_init("offset", np.float32(second_copy_offset)))
    model.graph.node.extend([
        helper.make_node("Add", ["hidden_src", "offset"], ["hidden_copy"]),
        helper.make_node("Concat", ["hidden_src", "hidden_copy"], ["hidden"], axis=-1),
    ])
    out = next(o for o in model.graph.output if o.name == "hidden_src")
    out.name = "hidden"
    out.type.tensor_type.shape.dim[2].dim_value = 2 * HIDDEN
    set_io_map(model, {"outputs": {"hidden": {"2": list(range(HIDDEN)) * 2}}})
    onnx.checker.check_model(model)
    return model


def widened_cache(base: onnx.ModelProto) -> onnx.ModelProto:
    """The KV input grown from 2 to 3 heads; the new head is read, so it must be fed zeros."""
    model = rename(base, KEY, "key_src")
    wide = helper.make_tensor_value_info(KEY, TensorProto.FLOAT,
                                         ["batch_size", KV_HEADS + 1, "past_sequence_length", HEAD_DIM])
    index = next(i for i, v in enumerate(model.graph.input) if v.name == "key_src")
    model.graph.input.remove(model.graph.input[index])
    model.graph.input.insert(index, wide)
    model.graph.initializer.extend([_init("old_heads", [0, 1]), _init("new_head", [2])])
    model.graph.node.insert(0, helper.make_node("Gather", [KEY, "old_heads"], ["key_old"], axis=1))
    model.graph.node.insert(1, helper.make_node("Gather", [KEY, "new_head"], ["key_new"], axis=1))
    model.graph.node.insert(2, helper.make_node("Add", ["key_old", "key_new"], ["key_src"]))
    set_io_map(model, {"inputs": {KEY: {"1": [0, 1, -1]}}})
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {}

    def save(name, model):
        paths[name] = root / f"{name}.onnx"
        onnx.save_model(model, paths[name])

    encoder = encoder_model()
    save("encoder", encoder)
    (root / "external").mkdir()
    paths["external"] = root / "external" / "model.onnx"
    # a copy: saving with external data rewrites the tensors it is given into references
    onnx.save_model(copy.deepcopy(encoder), paths["external"], save_as_external_data=True, all_tensors_to_one_file=True,
                    size_threshold=0, location="model.onnx.data")

    perturbed = copy.deepcopy(encoder)
    b2 = next(t for t in perturbed.graph.initializer if t.name == "b2")
    values = numpy_helper.to_array(b2).copy()
    values[3] += 1e-2
    b2.CopyFrom(numpy_helper.from_array(values, "b2"))
    save("perturbed", perturbed)

    save("widened", widened_hidden(encoder, 0.0))
    save("widened_bad_copy", widened_hidden(encoder, 1e-2))
    save("renamed_input", rename(encoder, "token_type_ids", "segment_ids"))

    # a graph ORT loads but cannot run for a 1 x 5 batch: 5 ids do not split into rows of 3
    failing = copy.deepcopy(encoder)
    failing.graph.initializer.append(_init("rows_of_3", [-1, 3]))
    failing.graph.node.append(helper.make_node("Reshape", ["input_ids", "rows_of_3"], ["extra"]))
    failing.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.INT64, None))
    save("fails_at_run", failing)

    decoder = decoder_model()
    save("decoder", decoder)
    save("decoder_rotary", decoder_model(rotary=True))
    save("decoder_wide_cache", widened_cache(decoder))

    paths["garbage"] = root / "garbage.onnx"
    paths["garbage"].write_bytes(b"this is not a protobuf \x00\xff\x13" * 10)
    return paths


def failing_names(report) -> list[str]:
    return [o.name for o in report.outputs if not o.passed]


# --- pass / fail ------------------------------------------------------------------------------------


def test_model_against_itself_passes(models):
    report = validate(models["encoder"], models["encoder"], provider="cpu")
    assert report.passed and report.exit_code == 0
    assert [o.name for o in report.outputs] == ["hidden", "logits"]
    for o in report.outputs:
        assert o.max_abs_diff == 0.0 and o.cosine == pytest.approx(1.0) and o.top1_agreement == 1.0
        assert o.dtype == "float32" and (o.rule.atol, o.rule.rtol) == (1e-6, 1e-5)
        assert o.tolerance == pytest.approx(1e-6 + 1e-5 * o.scale) and o.scale > 0
    assert len(report.cases) == 3 and report.cases[2]["input_ids"] == [3, 16]


def test_external_data_copy_passes(models):
    assert (models["external"].parent / "model.onnx.data").stat().st_size > 0
    report = validate(models["encoder"], models["external"], provider="cpu")
    assert report.passed and report.exit_code == 0
    assert max(o.max_abs_diff for o in report.outputs) == 0.0


def test_perturbed_weight_fails_and_names_the_output(models):
    report = validate(models["encoder"], models["perturbed"], provider="cpu")
    assert not report.passed and report.exit_code == 1
    assert failing_names(report) == ["logits"]
    logits = next(o for o in report.outputs if o.name == "logits")
    assert 5e-3 < logits.max_abs_diff < 2e-2  # the bias moved by 1e-2
    assert logits.max_rel_diff > 0 and logits.cosine < 1.0


def test_given_tolerance_decides(models):
    assert validate(models["encoder"], models["perturbed"], provider="cpu", tolerance=2e-2).passed
    assert not validate(models["encoder"], models["perturbed"], provider="cpu", tolerance=1e-3).passed


def test_widened_output_with_io_map_passes(models):
    report = validate(models["encoder"], models["widened"], provider="cpu")
    assert report.passed, report.to_dict()
    hidden = next(o for o in report.outputs if o.name == "hidden")
    assert hidden.copies_max_abs == 0.0 and hidden.max_abs_diff == 0.0
    assert hidden.top1_agreement is None  # its last axis was remapped
    assert hidden.shape == (3, 16, HIDDEN)  # compared in source coordinates


def test_widened_output_with_a_wrong_copy_fails(models):
    report = validate(models["encoder"], models["widened_bad_copy"], provider="cpu")
    assert not report.passed and report.exit_code == 1
    hidden = next(o for o in report.outputs if o.name == "hidden")
    assert hidden.max_abs_diff == 0.0  # the first copies are right...
    assert hidden.copies_max_abs == pytest.approx(1e-2, rel=1e-3)  # ...the second ones are not
    assert failing_names(report) == ["hidden"]


def test_changed_output_shape_without_io_map_fails(models, tmp_path):
    model = onnx.load(models["widened"])
    del model.metadata_props[:]
    onnx.save_model(model, tmp_path / "m.onnx")
    report = validate(models["encoder"], tmp_path / "m.onnx", provider="cpu")
    assert failing_names(report) == ["hidden"] and report.exit_code == 1
    assert "target shape (3, 16, 32)" in report.outputs[0].note  # as of the last case


@pytest.mark.parametrize("dtype, name, atol, rtol", [(TensorProto.FLOAT16, "float16", 1e-3, 4 * 2**-10),
                                                      (TensorProto.BFLOAT16, "bfloat16", 1e-2, 4 * 2**-7)])
def test_half_precision_output_gets_its_tolerance(models, tmp_path, dtype, name, atol, rtol):
    model = rename(onnx.load(models["encoder"]), "logits", "logits_f32")
    model.graph.node.append(helper.make_node("Cast", ["logits_f32"], ["logits"], to=dtype))
    out = next(o for o in model.graph.output if o.name == "logits_f32")
    out.name, out.type.tensor_type.elem_type = "logits", dtype
    onnx.save_model(model, tmp_path / "m.onnx")
    report = validate(models["encoder"], tmp_path / "m.onnx", provider="cpu")
    logits = next(o for o in report.outputs if o.name == "logits")
    assert (logits.dtype, logits.rule.atol, logits.rule.rtol) == (name, atol, rtol)
    assert logits.tolerance == pytest.approx(atol + rtol * logits.scale)
    assert 1e-6 < logits.max_abs_diff < logits.tolerance  # rounding shows, yet stays within the half rule
    assert report.passed


def scaled_logits_model(dtype: int, ulps: int, tmp_path: Path, name: str) -> Path:
    """Logits of magnitude ~10 in a half dtype, moved by `ulps` units in the last place (at 8..16)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    logits = helper.make_tensor_value_info("logits", dtype, ["b", "s", 4])
    table = np.linspace(9.0, 12.0, 32 * 4, dtype=np.float32).reshape(32, 4)
    eps = {TensorProto.FLOAT16: 2.0**-10, TensorProto.BFLOAT16: 2.0**-7}[dtype]
    table = table + ulps * 8 * eps  # one ulp of a value in [8, 16) is 8 * eps
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["g"]),
                               helper.make_node("Cast", ["g"], ["logits"], to=dtype)],
                              name, [ids], [logits], [numpy_helper.from_array(table, "table")])
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["float16", "bfloat16"])
def test_one_ulp_at_ten_passes_and_ten_ulps_fail(tmp_path, dtype):
    """The half-precision rule is relative: a ulp at |x| = 10 is 7.8e-3 in float16 and 6.3e-2 in bfloat16,
    more than any absolute tolerance small enough to mean something near 1."""
    source = scaled_logits_model(dtype, 0, tmp_path, "source")
    if dtype == TensorProto.BFLOAT16:  # ORT's CPU provider has no bfloat16 Cast+Gather path in all builds
        try:
            run_model(source, {"input_ids": np.zeros((1, 2), dtype=np.int64)}, "cpu")
        except OnnxgrowError:
            pytest.skip("this onnxruntime cannot run bfloat16 on the CPU")
    one = validate(source, scaled_logits_model(dtype, 1, tmp_path, "one"), provider="cpu")
    ten = validate(source, scaled_logits_model(dtype, 10, tmp_path, "ten"), provider="cpu")
    assert one.passed and one.outputs[0].max_abs_diff > 0
    assert not ten.passed and ten.exit_code == 1


def test_io_map_that_leaves_out_a_source_index_fails(models, tmp_path):
    """A widened model's map must cover every source index: one left out would go uncompared."""
    model = onnx.load(models["widened"])
    entry = next(p for p in model.metadata_props if p.key == "onnxgrow.io_map")
    io_map = json.loads(entry.value)
    axes = io_map["outputs"]["hidden"]
    axis, index = next(iter(axes.items()))
    missing = index[0]
    axes[axis] = [-1 if i == missing else i for i in index]  # drop every copy of source index `missing`
    entry.value = json.dumps(io_map)
    onnx.save_model(model, tmp_path / "m.onnx")
    report = validate(models["encoder"], tmp_path / "m.onnx", provider="cpu")
    hidden = next(o for o in report.outputs if o.name == "hidden")
    assert not hidden.passed and report.exit_code == 1
    assert "covers" in hidden.note and "only a subclone may drop indices" in hidden.note
    good = validate(models["encoder"], models["widened"], provider="cpu")
    compared = next(o for o in good.outputs if o.name == "hidden").indices_compared
    assert compared and all(n == total for n, total in compared.values())


def test_widened_input_is_fed_from_the_source_with_zero_new_slots(models):
    report = validate(models["decoder"], models["decoder_wide_cache"], provider="cpu")
    assert report.passed, report.to_dict()
    assert report.outputs[0].max_abs_diff == 0.0


def test_partial_io_map_compares_the_kept_source_slices(models, tmp_path):
    """A subclone keeps some source slices; each target slice is compared with the one it keeps."""
    model = onnx.load(models["widened"])
    set_io_map(model, {"outputs": {"hidden": {"2": [0] * (2 * HIDDEN)}}})  # every slot claims slice 0
    onnx.save_model(model, tmp_path / "m.onnx")
    report = validate(models["encoder"], tmp_path / "m.onnx", provider="cpu")
    assert not report.passed  # the widened model's slot 1 holds source slice 1, not 0


def test_malformed_io_map_is_an_error(models, tmp_path):
    model = onnx.load(models["encoder"])
    helper.set_model_props(model, {IO_MAP_KEY: "{not json"})
    onnx.save_model(model, tmp_path / "m.onnx")
    with pytest.raises(OnnxgrowError, match="malformed"):
        validate(models["encoder"], tmp_path / "m.onnx", provider="cpu")


# --- generated inputs ------------------------------------------------------------------------------


def test_encoder_inputs_follow_the_graph(models):
    feeds = make_inputs(models["encoder"], 4, 7, seed=3)
    assert {k: v.shape for k, v in feeds.items()} == {k: (4, 7) for k in feeds}
    assert feeds["input_ids"].dtype == np.int64
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < VOCAB
    assert feeds["input_ids"].max() >= 10  # drawn from the whole table, not a small fallback range
    assert set(np.unique(feeds["token_type_ids"])) == {0, 1}
    mask = feeds["attention_mask"]
    assert mask[0, -1] == 0 and mask.sum() == mask.size - 1  # exactly one padded slot
    again = make_inputs(models["encoder"], 4, 7, seed=3)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


def test_batch_of_one_is_not_padded(models):
    assert make_inputs(models["encoder"], 1, 6)["attention_mask"].all()


@pytest.mark.parametrize("rotary", [False, True])
def test_decoder_inputs_use_optimum_dim_names(models, rotary):
    feeds = make_inputs(models["decoder_rotary" if rotary else "decoder"], 2, 5, past_length=3)
    assert feeds["input_ids"].shape == (2, 5) and feeds["input_ids"].max() < DEC_VOCAB
    assert feeds[KEY].shape == (2, KV_HEADS, 3, HEAD_DIM) and feeds[KEY].dtype == np.float32
    assert feeds["attention_mask"].shape == (2, 8)  # past + new tokens
    assert feeds["attention_mask"][0, -1] == 0 and feeds["attention_mask"][1].all()
    # new tokens sit after the cache, in both the table and the rotary form
    np.testing.assert_array_equal(feeds["position_ids"], [[3, 4, 5, 6, 7]] * 2)


@pytest.mark.parametrize("mask_dim", ["past_sequence_length + 1", "total_sequence_length", "attn_len"])
def test_other_mask_length_names_mean_past_plus_new(tmp_path, mask_dim):
    path = tmp_path / "m.onnx"
    onnx.save_model(decoder_model(mask_dim=mask_dim), path)
    assert make_inputs(path, 3, 6, past_length=2)["attention_mask"].shape == (3, 8)
    assert validate(path, path, provider="cpu", shapes=((2, 4),)).passed  # ORT agrees with the sizes


@pytest.mark.parametrize("mask_dim", ["past_sequence_length + sequence_length", "total_sequence_length"])
def test_float_input_spanning_past_and_new_is_sized_by_its_dim_name(tmp_path, mask_dim):
    path = tmp_path / "m.onnx"
    onnx.save_model(decoder_model(mask_dim=mask_dim, float_bias=True), path)
    feeds = make_inputs(path, 2, 4, past_length=3)
    assert feeds["bias"].shape == (2, 1, 4, 7) and feeds[KEY].shape == (2, KV_HEADS, 3, HEAD_DIM)
    assert validate(path, path, provider="cpu", shapes=((2, 4),)).passed


def test_rotary_positions_are_found_by_structure_not_name(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(rename(decoder_model(rotary=True), "position_ids", "p"), path)
    np.testing.assert_array_equal(make_inputs(path, 1, 4, past_length=2)["p"], [[2, 3, 4, 5]])


def test_decoder_against_itself_passes(models):
    report = validate(models["decoder"], models["decoder"], provider="cpu", past_length=4)
    assert report.passed and report.past_length == 4
    assert report.cases[0][KEY] == [1, KV_HEADS, 4, HEAD_DIM]
    assert report.cases[0]["attention_mask"] == [1, 9]


def test_inputs_file_replaces_generation(models, tmp_path):
    feeds = make_inputs(models["encoder"], 2, 3)
    np.savez(tmp_path / "in.npz", **feeds)
    report = validate(models["encoder"], models["perturbed"], provider="cpu", inputs=tmp_path / "in.npz")
    assert report.cases == [{name: [2, 3] for name in feeds}]
    assert failing_names(report) == ["logits"]


def test_inputs_file_lacking_an_input_is_an_error(models, tmp_path):
    feeds = make_inputs(models["encoder"], 2, 3)
    del feeds["token_type_ids"]
    np.savez(tmp_path / "in.npz", **feeds)
    with pytest.raises(OnnxgrowError, match="lacks input 'token_type_ids'"):
        validate(models["encoder"], models["encoder"], provider="cpu", inputs=tmp_path / "in.npz")


def test_text_and_tokenizer_give_the_inputs(models, tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "hello": 7, "world": 42}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    report = validate(models["encoder"], models["perturbed"], provider="cpu", text="hello world hello",
                      tokenizer=tmp_path / "tokenizer.json")
    assert report.cases == [{"input_ids": [1, 3], "attention_mask": [1, 3], "token_type_ids": [1, 3]}]
    assert failing_names(report) == ["logits"]


# --- errors ---------------------------------------------------------------------------------------------


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(OnnxgrowError, match=match) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_file_is_an_error(models, tmp_path):
    _one_line_error(lambda: validate(models["encoder"], tmp_path / "nope.onnx", provider="cpu"), "no such file")


def test_garbage_bytes_are_an_error(models):
    _one_line_error(lambda: validate(models["garbage"], models["encoder"], provider="cpu"), "not a readable ONNX")


def test_mismatched_inputs_are_an_error(models):
    message = _one_line_error(lambda: validate(models["encoder"], models["renamed_input"], provider="cpu"),
                              "different inputs")
    assert "token_type_ids" in message and "segment_ids" in message


def test_runtime_failure_names_the_model(models):
    message = _one_line_error(lambda: validate(models["encoder"], models["fails_at_run"], provider="cpu"),
                              "onnxruntime could not run")
    assert str(models["fails_at_run"]) in message


def test_unloadable_model_names_the_model(models, tmp_path):
    model = onnx.load(models["encoder"])
    model.graph.node[0].op_type = "NoSuchOp"  # valid protobuf, but no kernel anywhere
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    message = _one_line_error(lambda: validate(models["encoder"], path, provider="cpu"), "could not load")
    assert str(path) in message


def test_unknown_or_absent_provider_is_an_error(models):
    _one_line_error(lambda: validate(models["encoder"], models["encoder"], provider="tpu"), "unknown provider")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        _one_line_error(lambda: validate(models["encoder"], models["encoder"], provider="cuda"), "CUDA")


# --- reporting ---------------------------------------------------------------------------------------------


def test_report_to_dict_is_strict_json(models):
    report = validate(models["encoder"], models["widened_bad_copy"], provider="cpu")
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False and data["exit_code"] == 1
    hidden = next(o for o in data["outputs"] if o["name"] == "hidden")
    assert hidden["passed"] is False and hidden["copies_max_abs"] == pytest.approx(1e-2, rel=1e-3)
    assert "float32: max abs diff <= 1e-6 + 1e-5 x max|source|" in data["tolerance"]
    assert hidden["atol"] == 1e-6 and hidden["rtol"] == 1e-5 and hidden["indices_compared"]


def test_report_prints_a_table(models):
    console = Console(record=True, width=160)
    validate(models["encoder"], models["perturbed"], provider="cpu").print(console)
    text = console.export_text()
    for word in ("output", "max abs", "cosine", "top-1", "hidden", "logits", "pass", "FAIL", "NOT preserved"):
        assert word in text
    assert "logits: max abs diff 1.0e-02 > tolerance" in text  # says which output and why
    assert "1e-6 + 1e-5 x max|source|" in text

    console = Console(record=True, width=160)
    validate(models["encoder"], models["widened_bad_copy"], provider="cpu").print(console)
    text = console.export_text()
    assert "copies" in text and "hidden: a duplicated slice differs from its source by 1.0e-02" in text


def test_run_model_accepts_a_path(models):
    feeds = make_inputs(models["encoder"], 1, 4)
    outputs = run_model(models["encoder"], feeds, "cpu")
    assert outputs["logits"].shape == (1, 4, VOCAB) and outputs["hidden"].dtype == np.float32


# --- real exports from the model zoo, when it has been built ---------------------------------------------


def test_a_zoo_model_that_did_not_build_fails_naming_the_error(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{"name": "gpt2-ts17", "error": "RuntimeError: exporter broke"}]))
    with pytest.raises(AssertionError, match="gpt2-ts17 did not build: RuntimeError: exporter broke"):
        zoo_model({}, "gpt2-ts17", manifest)


@pytest.mark.parametrize("name", ["gpt2-optimum-kv", "llama-gqa-optimum-kv", "bert-ts17", "opt-dynamo18"])
def test_zoo_model_against_itself(zoo, name):
    path = zoo_model(zoo, name)  # a model that did not build fails, naming the build error
    report = validate(path, path, provider="cpu", shapes=((2, 5),))
    assert report.passed and all(o.max_abs_diff == 0.0 for o in report.outputs)
    feeds = make_inputs(path, 2, 5, past_length=3)
    if "optimum" in name:
        assert feeds["attention_mask"].shape == (2, 8)
        np.testing.assert_array_equal(feeds["position_ids"][0], np.arange(3, 8))
