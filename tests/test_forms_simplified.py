"""Simplified exports (issue #13, item 3): what users run on their exports before anything else.

- gpt2-slim-ts17, llama-gqa-slim-ts17, bert-slim-ts17: `onnxslim.slim(model)` on the TorchScript
  exports. It folds shape chains into constants, removes Shape ops, merges equal constants into one
  initializer (the Q, K and V Reshapes of a Llama read one shape) and folds the Equal(target, -1) of
  each K/V repeat into a bool constant, the condition of the Where that resolves the Expand target.
- llama-gqa-onnxsim-ts17: `onnxsim.simplify(model)`, which folds the same chains its own way.
- llama-gqa-optimized-ts17: onnxscript's optimizer (`onnxscript.optimizer.optimize`).

Every command runs on each form (inspect, widen by each method, deepen by each method, subclone,
validate, train, export-weights), and the exact methods stay exact. The models are small, but the
grown models are shared by the tests that read them (module-scoped `grown`), so the file stays fast.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from rich.console import Console
from safetensors.numpy import load_file

import onnxgrow
from onnxgrow import modelio, training
from onnxgrow.errors import OnnxgrowError
from onnxgrow.verify import plan_inputs, run_model, validate
from onnxgrow.weights import export_weights
from helpers import assert_close_to_scale, worst, zoo_model

SLIM = ["gpt2-slim-ts17", "llama-gqa-slim-ts17", "bert-slim-ts17"]
FORMS = SLIM + ["llama-gqa-onnxsim-ts17", "llama-gqa-optimized-ts17"]
PRE_NORM = [n for n in FORMS if not n.startswith("bert")]
# the export each form was simplified from
UNSIMPLIFIED = {"gpt2-slim-ts17": "gpt2-ts17", "llama-gqa-slim-ts17": "llama-gqa-ts17", "bert-slim-ts17": "bert-ts17",
                "llama-gqa-onnxsim-ts17": "llama-gqa-ts17", "llama-gqa-optimized-ts17": "llama-gqa-ts17"}
KEYS = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "vocab_size",
        "max_positions", "norm", "norm_position", "positional", "tied_embeddings", "activation",
        "parallel_residual", "num_parameters"]
EXACT = 1e-4  # max abs diff of the outputs at fp32 for the function-preserving methods


class Grown:
    """Each grown model is made once and shared by every test that reads it."""

    def __init__(self, zoo, directory):
        self.zoo, self.directory, self.done = zoo, directory, {}

    def get(self, name: str, how: str, make):
        """(path, validate report) of `make(source)`, saved as <name>-<how>.onnx."""
        key = (name, how)
        if key not in self.done:
            source = zoo_model(self.zoo, name)
            out = self.directory / f"{name}-{how}.onnx"
            onnx.save(make(source), str(out))
            onnx.checker.check_model(str(out))
            self.done[key] = out, validate(source, out)
        return self.done[key]

    def widened(self, name: str, method: str = "hypercloning"):
        if method == "hypercloning":
            return self.get(name, method, lambda source: onnxgrow.widen(source, 2))
        c = self.zoo[name]["config"]
        target = dict(hidden=c["hidden_size"] * 3 // 2, heads=c["num_heads"] * 3 // 2,
                      kv_heads=c["num_kv_heads"] * 3 // 2, ffn=c["ffn_size"] * 3 // 2)
        return self.get(name, method, lambda source: onnxgrow.widen(source, method=method, **target))

    def deepened(self, name: str, method: str = "identity"):
        if method == "identity":
            return self.get(name, method, lambda source: onnxgrow.deepen(source, factor=2))
        return self.get(name, method, lambda source: onnxgrow.deepen(source, 3, method=method))


@pytest.fixture(scope="module")
def grown(zoo, tmp_path_factory):
    return Grown(zoo, tmp_path_factory.mktemp("simplified"))


def op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# --- the forms hold what they test ------------------------------------------------------------


@pytest.mark.parametrize("name", FORMS)
def test_the_forms_are_simplified(zoo, name):
    simplified, exported = op_counts(zoo_model(zoo, name)), op_counts(zoo_model(zoo, UNSIMPLIFIED[name]))
    computing = {k: v for k, v in simplified.items() if k != "Constant"}
    assert simplified.get("Constant", 0) < exported["Constant"] / 10  # folded or lifted to initializers
    assert simplified["Shape"] < exported["Shape"]
    assert sum(computing.values()) < sum(exported.values()) - exported["Constant"]


def test_onnxslim_folds_the_kv_repeat_condition_into_a_bool_constant(zoo):
    """The form that failed with "cannot tell query heads from key/value heads"."""
    graph = onnx.load(str(zoo_model(zoo, "llama-gqa-slim-ts17"))).graph
    bools = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.BOOL}
    expand_targets = {n.input[1] for n in graph.node if n.op_type == "Expand"}
    folded = [n for n in graph.node if n.op_type == "Where" and n.input[0] in bools and n.output[0] in expand_targets]
    assert len(folded) >= 2 * zoo["llama-gqa-slim-ts17"]["config"]["num_layers"]  # K and V of each layer


# --- every command ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMS)
def test_inspect_gives_the_true_configuration(zoo, name):
    got, want = onnxgrow.inspect(zoo_model(zoo, name)), dict(zoo[name]["config"])
    if want["positional"] != "learned":
        want["max_positions"] = None  # rotary: no table in the graph says how far it reaches
    assert {k: got[k] for k in KEYS} == {k: want[k] for k in KEYS}


@pytest.mark.parametrize("name", FORMS)
def test_hypercloning_x2_is_exact(zoo, grown, name):
    out, report = grown.widened(name)
    assert report.passed and worst(report) <= EXACT, report.to_dict()
    assert_close_to_scale(report)
    got, src = onnxgrow.inspect(out), zoo[name]["config"]
    assert (got["hidden_size"], got["num_heads"], got["num_kv_heads"], got["head_dim"]) == (
        2 * src["hidden_size"], 2 * src["num_heads"], 2 * src["num_kv_heads"], src["head_dim"])


@pytest.mark.parametrize("name", PRE_NORM)
def test_identity_deepen_x2_is_exact(zoo, grown, name):
    out, report = grown.deepened(name)
    assert report.passed and worst(report) == 0.0, report.to_dict()
    assert onnxgrow.inspect(out)["num_layers"] == 2 * zoo[name]["config"]["num_layers"]


def test_identity_deepen_is_refused_for_post_norm_bert(zoo):
    with pytest.raises(OnnxgrowError, match="pre-norm"):
        onnxgrow.deepen(zoo_model(zoo, "bert-slim-ts17"), factor=2)


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
@pytest.mark.parametrize("name", FORMS)
def test_any_size_widening_runs_and_validates(zoo, grown, name, method):
    out, report = grown.widened(name, method)
    for output in report.outputs:
        assert np.isfinite(output.max_abs_diff) and output.cosine > 0.5
    got, c = onnxgrow.inspect(out), zoo[name]["config"]
    assert (got["hidden_size"], got["num_heads"], got["num_kv_heads"], got["ffn_size"]) == (
        c["hidden_size"] * 3 // 2, c["num_heads"] * 3 // 2, c["num_kv_heads"] * 3 // 2, c["ffn_size"] * 3 // 2)


@pytest.mark.parametrize("method", ["stack", "interleave"])
@pytest.mark.parametrize("name", FORMS)
def test_stack_and_interleave_run_and_validate(grown, name, method):
    out, report = grown.deepened(name, method)
    assert all(o.cosine is not None and np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_layers"] == 3


@pytest.mark.parametrize("name", FORMS)
def test_subclone_runs_and_validates(zoo, tmp_path, name):
    c, source = zoo[name]["config"], zoo_model(zoo, name)
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], 4000)
    small = onnxgrow.subclone(source, ids, samples=8, seq=16, hidden=c["hidden_size"] // 2, layers=1,
                              provider="cpu")
    out = tmp_path / "small.onnx"
    onnx.save(small, str(out))
    got = onnxgrow.inspect(out)
    assert (got["hidden_size"], got["num_layers"]) == (c["hidden_size"] // 2, 1)
    assert all(np.isfinite(o.max_abs_diff) for o in validate(source, out).outputs)


@pytest.mark.parametrize("name", FORMS)
def test_train_two_steps_writes_a_model_ort_runs(zoo, tmp_path, name):
    source = zoo_model(zoo, name)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "trained.onnx"
    training.train(source, text, use_bytes=True, steps=2, batch=2, seq=16, device="cpu", output=out,
                   checkpoint_every=0, console=Console(file=io.StringIO()))
    outputs = run_model(out, plan_inputs(modelio.load(out)).make(2, 16), "cpu")
    assert all(np.isfinite(v).all() for v in outputs.values())
    before = run_model(source, plan_inputs(modelio.load(source)).make(2, 16), "cpu")
    assert any(not np.array_equal(before[k], outputs[k]) for k in outputs)  # the steps changed the weights


@pytest.mark.parametrize("name", FORMS)
def test_export_weights_names_every_role(zoo, tmp_path, name):
    tensors = load_file(str(export_weights(zoo_model(zoo, name), tmp_path / "w.safetensors")))
    c = zoo[name]["config"]
    assert tensors["embed.tokens"].shape == (c["vocab_size"], c["hidden_size"])
    if c["positional"] == "learned":
        assert tensors["embed.positions"].shape == (c["max_positions"], c["hidden_size"])
    layer_norms = [k for k in tensors if k.startswith("layers.") and ".norm" in k and k.endswith(".weight")]
    assert len(layer_norms) == 2 * c["num_layers"]
    assert not [k for k in tensors if k.startswith("other.") and tensors[k].ndim == 2], sorted(tensors)
