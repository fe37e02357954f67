"""Quantized weights (issue 14, item 4) and models with ONNX Runtime's own default-domain ops (item 1).

The quantized models are made here from zoo models by ONNX Runtime's own quantizers, as a user makes
them: MatMulNBitsQuantizer (int4 MatMulNBits, and GatherBlockQuantized for the embedding),
quantize_dynamic (MatMulInteger, and an int8 embedding read through DequantizeLinear) and
quantize_static in QDQ format (DequantizeLinear of every weight, Q -> DQ pairs on activations).
Without --dequantize every command refuses them, naming the op, and writes nothing; with it they
are turned into float and grown, and checked against the quantized source.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxgrow
from onnxgrow import modelio
from onnxgrow.errors import OnnxgrowError
from onnxgrow.quantized import quantized_nodes
from onnxgrow.verify import plan_inputs, run_model
from helpers import zoo_model

pytest.importorskip("onnxruntime.quantization")


def int4(source, out):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, op_types_to_quantize=("MatMul", "Gather"),
                                          quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, str(out))


def dynamic_int8(source, out):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8)


def qdq_int8(source, out):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    plan = plan_inputs(modelio.load(source))

    class Windows(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([plan.make(2, 7, seed=s) for s in range(4)])

        def get_next(self):
            return next(self.feeds, None)
    quantize_static(str(source), str(out), Windows(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    weight_type=QuantType.QInt8, activation_type=QuantType.QInt8, per_channel=True)


# (zoo model, quantizer, the quantized ops it writes)
FORMS = {"int4": ("llama-gqa-dynamo18", int4, {"MatMulNBits", "GatherBlockQuantized"}),
         "dynamic-int8": ("gpt2-ts17", dynamic_int8, {"MatMulInteger", "DequantizeLinear"}),
         "qdq-int8": ("llama-gqa-ts17", qdq_int8, {"DequantizeLinear"})}


@pytest.fixture(scope="module")
def quantized(zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized")
    made = {}
    for form, (name, quantize, _) in FORMS.items():
        made[form] = folder / f"{form}.onnx"
        quantize(zoo_model(zoo, name), made[form])
    return made


def outputs_of(path, like=None):
    """Every output of the model at `path` on inputs planned from the float model `like` (a quantized
    model's token table is not one the planner reads, so its ids would be drawn from another range)."""
    return run_model(path, plan_inputs(modelio.load(like or path)).make(2, 7), "cpu")


def onnxgrow_cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxgrow", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("form", FORMS)
def test_the_quantizer_wrote_what_the_form_is_about(quantized, form):
    ops = {n.op_type for n in quantized_nodes(modelio.load(quantized[form]))}
    assert ops == FORMS[form][2]


@pytest.mark.parametrize("form", FORMS)
def test_every_command_refuses_a_quantized_model_naming_the_op(quantized, form):
    with pytest.raises(OnnxgrowError, match=r"quantized weights \(.*; first at .*pass --dequantize"):
        onnxgrow.inspect(quantized[form])
    with pytest.raises(OnnxgrowError, match="pass --dequantize"):
        onnxgrow.subclone(quantized[form], np.arange(3000) % 500, hidden=32)


def test_plain_widen_of_int4_exits_2_naming_matmulnbits_and_writes_nothing(quantized, tmp_path):
    out = tmp_path / "wide.onnx"
    run = onnxgrow_cli("widen", quantized["int4"], "--factor", "2", "-o", out)
    assert run.returncode == 2 and not out.exists()
    assert "MatMulNBits" in run.stderr and "--dequantize" in run.stderr and "Traceback" not in run.stderr


def test_int4_dequantized_by_the_runtime_computes_what_the_int4_model_computes(quantized):
    """MatMulNBits and GatherBlockQuantized are dequantized by ONNX Runtime itself: the float model's
    logits are the int4 model's, up to float32 summation order."""
    floats = modelio.save(modelio.as_ir(onnxgrow.dequantize(quantized["int4"])), quantized["int4"].parent / "f.onnx")
    assert not quantized_nodes(modelio.load(floats))
    want, got = outputs_of(quantized["int4"], like=floats), outputs_of(floats)
    for name in want:
        assert np.abs(want[name] - got[name]).max() <= 1e-5 * np.abs(want[name]).max()


@pytest.mark.parametrize("form", FORMS)
def test_dequantized_model_stays_close_to_the_float_source(zoo, quantized, form, tmp_path):
    """A wrongly unpacked weight (nibble order, zero point, scale axis) is far from the float model the
    quantizer started from; quantization error is not."""
    floats = tmp_path / "float.onnx"
    onnx.save(onnxgrow.dequantize(quantized[form]), floats)
    source = zoo_model(zoo, FORMS[form][0])
    want, got = outputs_of(source), outputs_of(floats, like=source)
    for name in want:
        cosine = (want[name] * got[name]).sum() / (np.linalg.norm(want[name]) * np.linalg.norm(got[name]))
        assert cosine > 0.98, (form, name, cosine)


@pytest.mark.parametrize("form", FORMS)
def test_widen_dequantize_is_exact_against_the_quantized_source_within_the_reported_tolerance(quantized, form,
                                                                                           tmp_path):
    out = tmp_path / "wide.onnx"
    run = onnxgrow_cli("widen", quantized[form], "--factor", "2", "--dequantize", "-o", out)
    assert run.returncode == 0, run.stderr
    assert "dequantized" in run.stderr and "checked at max abs diff <=" in run.stderr
    assert not quantized_nodes(modelio.load(out))
    tolerance = float(run.stderr.split("checked at max abs diff <=")[1].split()[0])
    want, got = outputs_of(quantized[form], like=out), outputs_of(out)
    for name in want:
        assert np.abs(want[name] - got[name]).max() <= tolerance
    config = onnxgrow.inspect(out)
    assert config["hidden_size"] == 2 * onnxgrow.inspect(onnxgrow.dequantize(quantized[form]))["hidden_size"]


def test_deepen_and_the_dequantize_command(quantized, tmp_path):
    deep, flat = tmp_path / "deep.onnx", tmp_path / "float.onnx"
    assert onnxgrow_cli("deepen", quantized["dynamic-int8"], "--factor", "2", "--dequantize", "-o", deep).returncode == 0
    assert onnxgrow.inspect(deep)["num_layers"] == 4
    run = onnxgrow_cli("dequantize", quantized["qdq-int8"], "-o", flat)
    assert run.returncode == 0, run.stderr
    assert not quantized_nodes(modelio.load(flat)) and "QuantizeLinear" not in {n.op_type for n in onnx.load(str(flat)).graph.node}


# --- item 1: what ONNX Runtime runs is not invalid ONNX ---------------------------------------------------------


def test_a_default_domain_op_only_onnx_runtime_defines_loads(tmp_path):
    """onnxruntime-genai writes SimplifiedLayerNormalization in the default domain; onnx.checker alone calls
    that invalid. It loads, and the error that follows is about what onnxgrow cannot read, not validity."""
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y"], epsilon=1e-5, axis=-1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor("scale", TensorProto.FLOAT, [8], [1.0] * 8)])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    assert modelio.load(path).graph.node(0).op_type == "SimplifiedLayerNormalization"
    with pytest.raises(OnnxgrowError) as caught:
        onnxgrow.inspect(path)
    assert "not valid ONNX" not in str(caught.value)
    graph.node[0].op_type = "NoSuchOpAnywhere"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    with pytest.raises(OnnxgrowError, match="not valid ONNX.*NoSuchOpAnywhere"):
        modelio.load(path)


def test_a_model_with_external_data_comes_back_from_the_api_whole(tmp_path):
    """onnxgrow.widen(path) returns a ModelProto: its weights must be in it, not references to the
    source's external data file (saving it elsewhere would give a model with missing weights)."""
    from pathlib import Path
    source = Path(__file__).resolve().parent.parent / "models" / "genai" / "llama-fp32" / "model.onnx"
    assert (source.parent / "model.onnx.data").exists()
    wide = onnxgrow.widen(source, 2)
    assert not [t.name for t in wide.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    onnx.save(wide, tmp_path / "wide.onnx")
    assert onnxgrow.inspect(tmp_path / "wide.onnx")["hidden_size"] == 128
