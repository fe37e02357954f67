"""torch.onnx.export(model, (ids,)) with nothing else: torch 2.13's default static-shape export (#13, item 1).

The dynamo exporter at opset 20 writes every shape as a literal (batch x 8 tokens), takes input_ids
only, and folds the position and token-type lookups into constants added to the token embeddings.
The same number (8) is the sequence length and the head dimension's half; a static batch of 2 is as
big as a kv-head count. The analysis tells them apart by dataflow; rewrites keep the static shapes;
subclone, train and validate fit their windows to them and refuse what does not fit. The `-slim` forms are the same exports after onnxslim, which with static
shapes fuses MatMul + Add into Gemm on a [tokens, hidden] view of the stream.

Every command runs on each form (inspect, widen by each method, deepen by each method, subclone,
validate, train, export-weights), and the exact methods stay exact.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import onnx
import pytest
from rich.console import Console
from safetensors.numpy import load_file

import onnxgrow
from onnxgrow import modelio, training
from onnxgrow.errors import OnnxgrowError
from onnxgrow.static_shapes import batches, fit
from onnxgrow.verify import plan_inputs, run_model
from onnxgrow.weights import export_weights
from helpers import assert_close_to_scale, save_and_validate, zoo_model

FAMILIES = ("gpt2", "llama-gqa", "bert")
FORMS = [f"{family}-static-{form}" for family in FAMILIES for form in ("b1", "b2", "b2-slim")]
PRE_NORM = [n for n in FORMS if not n.startswith("bert")]
SEQ = 8
KEYS = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "vocab_size",
        "norm", "norm_position", "positional", "tied_embeddings", "activation", "parallel_residual"]


def batch_of(name: str) -> int:
    return int(name.split("-static-b")[1][0])


def io_shapes(path) -> list[list[int]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(graph.input) + list(graph.output)]


def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    return path


# --- the pieces, on their own -------------------------------------------------------------------


def test_fit_takes_the_fixed_size_refuses_another_and_leaves_dynamic_axes_alone():
    assert fit("--seq", None, None, 64) == 64 and fit("--seq", 32, None, 64) == 32
    assert fit("--seq", None, 8, 64) == 8 and fit("--seq", 8, 8, 64) == 8
    with pytest.raises(OnnxgrowError, match="--seq 64 does not fit.*static sequence length of 8"):
        fit("--seq", 64, 8, 128)


def test_batches_pad_the_last_chunk_to_a_fixed_batch_and_count_the_real_rows():
    ids = np.arange(10).reshape(5, 2)
    got = list(batches(ids, 8, 2))
    assert [chunk.shape[0] for chunk, _ in got] == [2, 2, 2] and [real for _, real in got] == [2, 2, 1]
    assert np.array_equal(got[-1][0], [[8, 9], [8, 9]])
    assert [real for _, real in batches(ids, 4, None)] == [4, 1]  # dynamic: as asked


# --- every command on each form -----------------------------------------------------------------


@pytest.mark.parametrize("name", FORMS)
def test_inspect_gives_the_true_configuration(zoo, name):
    got, expected = onnxgrow.inspect(zoo_model(zoo, name)), zoo[name]["config"]
    assert {k: got[k] for k in KEYS} == {k: expected[k] for k in KEYS}
    assert (got["static_batch"], got["static_sequence"], got["opset"]) == (batch_of(name), SEQ, 20)
    # the learned lookups were folded into constants of the first 8 positions
    assert got["max_positions"] == (SEQ if expected["positional"] == "learned" else None)


@pytest.mark.parametrize("name", FORMS)
def test_hypercloning_x2_is_exact_and_keeps_the_static_shapes(zoo, tmp_path, name):
    source, out = zoo_model(zoo, name), tmp_path / "wide.onnx"
    report = save_and_validate(onnxgrow.widen(source, 2), source, out)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    assert len(report.cases) == 1 and report.cases[0]["input_ids"] == [batch_of(name), SEQ]
    got, c = onnxgrow.inspect(out), zoo[name]["config"]
    assert (got["hidden_size"], got["num_heads"], got["num_kv_heads"]) == \
        (2 * c["hidden_size"], 2 * c["num_heads"], 2 * c["num_kv_heads"])
    src_shapes, out_shapes = io_shapes(source), io_shapes(out)
    assert out_shapes[0] == src_shapes[0] == [batch_of(name), SEQ]
    assert out_shapes[1][:2] == src_shapes[1][:2]  # batch x seq of the output too


@pytest.mark.parametrize("name", PRE_NORM)
def test_identity_deepen_x2_is_bit_exact(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    report = save_and_validate(onnxgrow.deepen(source, factor=2), source, tmp_path / "deep.onnx")
    assert report.passed and all(o.max_abs_diff == 0.0 for o in report.outputs), report.to_dict()
    assert onnxgrow.inspect(tmp_path / "deep.onnx")["num_layers"] == 4


@pytest.mark.parametrize("name", FORMS)
def test_any_size_widening_runs_and_validates(zoo, tmp_path, name):
    c, source = zoo[name]["config"], zoo_model(zoo, name)
    target = dict(hidden=c["hidden_size"] * 3 // 2, heads=c["num_heads"] * 3 // 2,
                  kv_heads=c["num_kv_heads"] * 3 // 2, ffn=c["ffn_size"] * 3 // 2)
    for method in ("fpi", "aki", "pad"):
        out = tmp_path / f"{method}.onnx"
        report = save_and_validate(onnxgrow.widen(source, method=method, **target), source, out)
        assert all(np.isfinite(o.max_abs_diff) and o.cosine > 0.5 for o in report.outputs), method
        got = onnxgrow.inspect(out)
        assert (got["hidden_size"], got["num_heads"], got["num_kv_heads"], got["ffn_size"]) == \
            tuple(target.values()), method
        assert io_shapes(out)[0] == [batch_of(name), SEQ]


@pytest.mark.parametrize("name", FORMS)
def test_stack_and_interleave_run_and_validate(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    for method in ("stack", "interleave"):
        out = tmp_path / f"{method}.onnx"
        report = save_and_validate(onnxgrow.deepen(source, 3, method=method), source, out)
        assert all(o.cosine is not None and np.isfinite(o.max_abs_diff) for o in report.outputs), method
        assert onnxgrow.inspect(out)["num_layers"] == 3


@pytest.mark.parametrize("name", FORMS)
def test_subclone_calibrates_with_windows_that_fit(zoo, tmp_path, name):
    c, source = zoo[name]["config"], zoo_model(zoo, name)
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], 4000)
    # 7 windows: with a static batch of 2 the last batch is padded
    small, result = onnxgrow.subclone(source, ids, samples=7, hidden=c["hidden_size"] // 2, layers=1,
                                      provider="cpu", return_details=True)
    assert result.held_out.shape[1] == SEQ
    out = tmp_path / "small.onnx"
    onnx.save(small, str(out))
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"], got["static_batch"]) == (c["hidden_size"] // 2, 1, batch_of(name))
    report = onnxgrow.validate(source, out)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)


def test_subclone_refuses_a_window_that_does_not_fit(zoo):
    with pytest.raises(OnnxgrowError, match="--seq 16 does not fit"):
        onnxgrow.subclone(zoo_model(zoo, "gpt2-static-b1"), np.arange(2000) % 500, seq=16, hidden=32)


@pytest.mark.parametrize("name", FORMS)
def test_train_two_steps_fits_the_static_shape_and_writes_a_model_ort_runs(zoo, tmp_path, name):
    out = tmp_path / "trained.onnx"
    _, summary = onnxgrow.train(zoo_model(zoo, name), text_file(tmp_path), use_bytes=True, steps=2, device="cpu",
                                output=out, checkpoint_every=0, console=Console(file=io.StringIO()),
                                return_summary=True)
    assert (summary["batch"], summary["seq"]) == (batch_of(name), SEQ)
    outputs = run_model(out, plan_inputs(modelio.load(out)).make(batch_of(name), SEQ), "cpu")
    assert all(np.isfinite(v).all() for v in outputs.values())
    assert io_shapes(out) == io_shapes(zoo_model(zoo, name))


def test_train_refuses_a_batch_that_does_not_fit_and_writes_nothing(zoo, tmp_path):
    out = tmp_path / "trained.onnx"
    cmd = [sys.executable, "-m", "onnxgrow", "train", str(zoo_model(zoo, "llama-gqa-static-b2")), "--data",
           str(text_file(tmp_path)), "--bytes", "--steps", "1", "--batch", "3", "-o", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2 and not out.exists()
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch 3 does not fit: the model's inputs have a static batch of 2 (a static-shape "
                      "export); use --batch 2, or export the model with dynamic shapes"], run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("name", FORMS)
def test_export_weights_names_every_role(zoo, tmp_path, name):
    tensors = load_file(str(export_weights(zoo_model(zoo, name), tmp_path / "w.safetensors")))
    c = zoo[name]["config"]
    assert tensors["embed.tokens"].shape == (c["vocab_size"], c["hidden_size"])
    if c["positional"] == "learned":  # folded: the first 8 rows, as [1, 8, hidden]
        assert tensors["embed.positions"].shape[-2:] == (SEQ, c["hidden_size"])
    assert len([k for k in tensors if k.startswith("layers.")]) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_simplified_export_deepens_into_the_same_function(zoo, tmp_path, family):
    """onnxslim changes the graph, not the model: stacking and interleaving its blocks must give what they
    give on the export before simplification (same weights). A copy that read the stream through the
    wrong view, or shared the residual it should have copied, differs."""
    plain, slim = zoo_model(zoo, f"{family}-static-b2"), zoo_model(zoo, f"{family}-static-b2-slim")
    if family == "bert":  # MatMul + Add fused by onnxslim (GPT-2 has Gemm already; Llama has no biases)
        ops = [{n.op_type for n in onnx.load(str(p)).graph.node} for p in (plain, slim)]
        assert "Gemm" in ops[1] - ops[0]
    ids = np.random.default_rng(0).integers(0, zoo[f"{family}-static-b2"]["config"]["vocab_size"], (2, SEQ))
    for method in ("stack", "interleave"):
        outputs = []
        for source in (plain, slim):
            out = tmp_path / f"{method}-{source.parent.name}.onnx"
            onnx.save(onnxgrow.deepen(source, factor=2, method=method), out)
            outputs.append(next(iter(run_model(out, {"input_ids": ids}, "cpu").values())))
        assert np.abs(outputs[0] - outputs[1]).max() <= 1e-5 * np.abs(outputs[0]).max(), method
