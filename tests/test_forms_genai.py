"""The onnxruntime-genai form: a folder with model.onnx, genai_config.json and the tokenizer.

models/genai/ holds tiny random Llama and Qwen2 models written by the genai model builder (models/build_genai.py):
packed-QKV GroupQueryAttention with rotary inside the op (num_heads 4, kv_num_heads 2), the residual
stream through SkipSimplifiedLayerNormalization, a KV cache whose head axis is named kv_cache_dim, and
an int4 twin with MatMulNBits weights. GroupQueryAttention runs a sequence longer than one token with
a past only at batch 1, so every comparison here is at batch 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import onnxgrow
from onnxgrow import modelio
from onnxgrow.cli import app
from onnxgrow.verify import validate

GENAI = Path(__file__).resolve().parents[1] / "models" / "genai"
FAMILIES = ["llama", "qwen2"]
FP32, INT4 = GENAI / "llama-fp32" / "model.onnx", GENAI / "llama-int4" / "model.onnx"


def fp32(family: str) -> Path:
    return GENAI / f"{family}-fp32" / "model.onnx"
BATCH_1 = ((1, 5), (1, 9))
TRUE_CONFIG = dict(hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2, ffn_size=160, vocab_size=1000,
                   head_dim=16, norm="rmsnorm", norm_position="pre", positional="rotary", activation="silu",
                   tied_embeddings=False)
PROMPT = [1, 5, 17, 42]
runner = CliRunner()


def ops(path) -> dict[str, list]:
    """{op_type: [its nodes]} of a model file."""
    found: dict[str, list] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        found.setdefault(n.op_type, []).append(n)
    return found


def head_counts(path) -> list[tuple[int, int]]:
    return [tuple(a.i for a in sorted(n.attribute, key=lambda a: a.name) if a.name in ("num_heads", "kv_num_heads"))
            for n in ops(path)["GroupQueryAttention"]]


def greedy_tokens(folder: Path) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=12)
    generator = og.Generator(model, params)
    generator.append_tokens([PROMPT])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_gives_the_true_configuration(family):
    got = onnxgrow.inspect(fp32(family))
    assert {k: got[k] for k in TRUE_CONFIG} == TRUE_CONFIG
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= set(ops(fp32(family)))


@pytest.mark.parametrize("command, changed", [
    (["widen", "-k", "2"], dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_size=16,
                                num_hidden_layers=2)),
    (["deepen", "-k", "2"], dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_size=16,
                                 num_hidden_layers=4)),
])
@pytest.mark.parametrize("family", FAMILIES)
def test_grown_genai_folder_keeps_logits_form_and_greedy_tokens(tmp_path, family, command, changed):
    source = fp32(family)
    out = tmp_path / "grown" / "model.onnx"
    result = cli(*command, source, "-o", out)
    assert result.exit_code == 0, result.output
    report = validate(source, out, shapes=BATCH_1)
    logits = next(o for o in report.outputs if o.name == "logits")
    assert logits.max_abs_diff <= 1e-4, report.to_dict()
    # the output keeps the fused form: the same ops (constants become initializers), no Add left
    assert set(ops(out)) == set(ops(source)) - {"Constant"}
    decoder = json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert {k: decoder[k] for k in changed} == changed and decoder["filename"] == "model.onnx"
    assert (out.parent / "tokenizer.json").is_file()
    assert greedy_tokens(out.parent) == greedy_tokens(source.parent)


def test_widen_doubles_the_head_attributes(tmp_path):
    out = tmp_path / "w" / "model.onnx"
    modelio.save(onnxgrow.widen(modelio.load(FP32), 2), out)
    assert head_counts(FP32) == [(2, 4)] * 2 and head_counts(out) == [(4, 8)] * 2  # (kv_num_heads, num_heads)


def test_int4_widen_is_refused_naming_matmulnbits_and_writes_nothing(tmp_path):
    out = tmp_path / "w" / "model.onnx"
    result = cli("widen", INT4, "-k", "2", "-o", out)
    assert result.exit_code == 2 and "MatMulNBits" in result.output
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_int4_widen_dequantize_writes_a_float_model_within_the_reported_tolerance(tmp_path):
    out = tmp_path / "w" / "model.onnx"
    result = cli("widen", INT4, "-k", "2", "--dequantize", "-o", out)
    assert result.exit_code == 0, result.output
    assert "MatMulNBits" not in ops(out) and "GroupQueryAttention" in ops(out)
    tolerance = float(result.output.split("max abs diff <= ")[1].split()[0].rstrip("),"))
    report = validate(INT4, out, shapes=BATCH_1, tolerance=tolerance)
    assert report.passed, report.to_dict()
    assert json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]["hidden_size"] == 128


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
def test_other_widths_run_and_validate(tmp_path, method):
    out = tmp_path / "wide.onnx"
    modelio.save(onnxgrow.widen(modelio.load(FP32), 2, method=method), out)
    report = validate(FP32, out, shapes=BATCH_1, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_heads"] == 8


@pytest.mark.parametrize("method", ["stack", "interleave"])
def test_other_depths_run_and_validate(tmp_path, method):
    out = tmp_path / "deep.onnx"
    modelio.save(onnxgrow.deepen(modelio.load(FP32), factor=2, method=method), out)
    report = validate(FP32, out, shapes=BATCH_1, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_layers"] == 4


# --- the torch bridge against ONNX Runtime ------------------------------------------------------------------

RNG = np.random.default_rng(14)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def ints32(*values):
    return np.array(values, dtype=np.int32)


B, S, P, H = 1, 5, 3, 16  # batch, new tokens, cached tokens, head size (ORT: a multiple of 8)
COS, SIN = rand(32, H // 2), rand(32, H // 2)
BRIDGE_CASES = {
    "gqa-packed-prompt-rotary": (dict(num_heads=4, kv_num_heads=2, do_rotary=1),
                                 dict(query=rand(B, S, 8 * H), key=None, value=None, past_key=None, past_value=None,
                                      seqlens_k=ints32(S - 1), total_sequence_length=np.array(S, np.int32),
                                      cos_cache=COS, sin_cache=SIN), 3),
    "gqa-packed-past-rotary-interleaved": (dict(num_heads=4, kv_num_heads=2, do_rotary=1, rotary_interleaved=1),
                                           dict(query=rand(B, S, 8 * H), key=None, value=None,
                                                past_key=rand(B, 2, P, H), past_value=rand(B, 2, P, H),
                                                seqlens_k=ints32(P + S - 1),
                                                total_sequence_length=np.array(P + S, np.int32),
                                                cos_cache=COS, sin_cache=SIN), 3),
    "gqa-separate-padded-batch-scale": (dict(num_heads=4, kv_num_heads=4, scale=0.2),
                                        dict(query=rand(2, S, 4 * H), key=rand(2, S, 4 * H), value=rand(2, S, 4 * H),
                                             past_key=None, past_value=None, seqlens_k=ints32(S - 1, S - 3),
                                             total_sequence_length=np.array(S, np.int32)), 1),
    "rotary-3d": (dict(), dict(x=rand(2, S, 4 * H), position_ids=RNG.integers(0, 20, (2, S)).astype(np.int64),
                                cos_cache=COS, sin_cache=SIN), 1),
    "rotary-4d-interleaved-start": (dict(interleaved=1), dict(x=rand(2, 4, S, H), position_ids=np.array([3], np.int64),
                                                             cos_cache=COS, sin_cache=SIN), 1),
    "skip-simplified-norm": (dict(epsilon=1e-6), dict(x=rand(2, S, 8), skip=rand(2, S, 8), gamma=rand(8)), 4),
    "simplified-norm": (dict(epsilon=1e-6, axis=-1), dict(x=rand(2, S, 8), gamma=rand(8)), 1),
}
OP_OF = {"gqa": ("GroupQueryAttention", "com.microsoft"), "rotary": ("RotaryEmbedding", "com.microsoft"),
         "skip": ("SkipSimplifiedLayerNormalization", "com.microsoft"),
         "simplified": ("SimplifiedLayerNormalization", "")}


@pytest.mark.parametrize("case", list(BRIDGE_CASES))
def test_bridge_op_matches_onnxruntime(case):
    import onnxruntime as ort
    torch = pytest.importorskip("torch")
    from onnx import TensorProto, helper
    from onnxgrow import bridge
    attrs, feeds, n_out = BRIDGE_CASES[case]
    op, domain = OP_OF[case.split("-")[0]]
    names = [k if v is not None else "" for k, v in feeds.items()]
    outputs = (["y", "mean", "inv_std", "sum"] if op.startswith("Skip") else ["y", "present_key", "present_value"])[:n_out]
    if op.startswith("Skip"):
        outputs[1:3] = ["", ""]
    node = helper.make_node(op, names, outputs, domain=domain, **attrs)
    feeds = {k: v for k, v in feeds.items() if v is not None}
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    proto = helper.make_model(helper.make_graph([node], "g", inputs, [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 10
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = bridge.to_torch(proto)(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert len(got) == len(expected)
    for g, e in zip(got.values(), expected):
        g = g.detach().numpy()
        assert g.shape == e.shape
        assert np.abs(g - e).max() <= 1e-4 * np.abs(e).max()


def test_subclone_half_width_half_depth(tmp_path):
    from onnxgrow.subcloning import subclone_ir
    ids = np.random.default_rng(0).integers(0, 1000, (1, 24))
    result = subclone_ir(modelio.load(FP32), ids, hidden=32, layers=1)
    out = modelio.save(result.model, tmp_path / "sub.onnx")
    report = validate(FP32, out, shapes=BATCH_1, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_heads"], got["num_kv_heads"], got["num_layers"]) == (32, 2, 1, 1)
    assert head_counts(out) == [(1, 2)]


def test_train_two_steps_writes_a_model_onnxruntime_runs_in_its_form(tmp_path):
    import io
    from rich.console import Console
    from onnxgrow import training
    from onnxgrow.verify import make_inputs, run_model
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "trained" / "model.onnx"
    out.parent.mkdir()
    summary = training.train(FP32, text, use_bytes=True, steps=2, batch=1, seq=16, lr=1e-3, output=out,
                             console=Console(file=io.StringIO()))
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    assert set(ops(out)) == set(ops(FP32))
    feeds = make_inputs(FP32, 1, 6)
    before, after = run_model(FP32, feeds, "cpu")["logits"], run_model(out, feeds, "cpu")["logits"]
    assert np.isfinite(after).all() and not np.allclose(before, after)


def test_subclone_command_writes_a_genai_folder(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "sub" / "model.onnx"
    result = cli("subclone", FP32, "--hidden", 32, "--layers", 1, "--calib", text, "--bytes", "--samples", 4,
                 "--seq", 16, "--no-report", "-o", out)
    assert result.exit_code == 0, result.output
    decoder = json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["hidden_size"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["num_hidden_layers"]) == (32, 2, 1, 1)
    assert "SkipSimplifiedLayerNormalization" in ops(out)
    assert len(greedy_tokens(out.parent)) == 12


def test_validate_feeds_groupqueryattention_lengths_given_as_graph_inputs(tmp_path):
    """seqlens_k and total_sequence_length as graph inputs (not computed from a mask, as the genai builder
    does): validate gives them the counts of cached plus new tokens, and ONNX Runtime accepts them."""
    import onnx
    from onnx import TensorProto as T, helper
    from onnxgrow import modelio
    from onnxgrow.verify import plan_inputs, validate
    f = lambda name, shape: helper.make_tensor_value_info(name, T.FLOAT, shape)  # noqa: E731
    inputs = [f("query", ["batch", "sequence", 64]), f("key", ["batch", "sequence", 32]),
              f("value", ["batch", "sequence", 32]), f("past_key", ["batch", 2, "past_sequence", 16]),
              f("past_value", ["batch", 2, "past_sequence", 16]),
              helper.make_tensor_value_info("seqlens_k", T.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", T.INT32, [1])]
    node = helper.make_node("GroupQueryAttention", [i.name for i in inputs], ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=4, kv_num_heads=2)
    graph = helper.make_graph([node], "gqa", inputs, [f("out", ["batch", "sequence", 64]),
                                                      f("present_key", ["batch", 2, "total", 16]),
                                                      f("present_value", ["batch", 2, "total", 16])])
    path = tmp_path / "gqa.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
    plan = plan_inputs(modelio.load(path))
    assert {s.name: s.kind for s in plan.specs}["seqlens_k"] == "seqlens_k"
    feeds = plan.make(1, 5, past_length=3)
    assert feeds["seqlens_k"].tolist() == [7] and feeds["total_sequence_length"].tolist() == [8]
    report = validate(path, path)
    assert report.passed and report.cases
