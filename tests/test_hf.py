"""export-hf and import-hf: a Hugging Face folder that transformers loads as it is, computing what ONNX
Runtime computes on the graph, and its (trained) weights back into the same graph."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxgrow import api
from onnxgrow.cli import app
from onnxgrow.errors import OnnxgrowError
from onnxgrow.weights import model_roles

from conftest import load_builder
from helpers import zoo_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every folder here is local
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

RTOL = 1e-4  # relative to the output's scale (at least 1)
runner = CliRunner()

# every family of the zoo, TorchScript opset 17 and one dynamo export of each
FORMS = ["gpt2-ts17", "bert-ts17", "bert-mlm-ts17", "minilm-ts17", "llama-gqa-ts17", "neox-ts17", "opt-ts17",
         "gpt2-dynamo18", "bert-dynamo18", "llama-gqa-dynamo18", "neox-dynamo18", "opt-dynamo18",
         "gpt2-fresh-dynamo18"]  # zero biases dropped by the exporter: the class gets zeros


def auto_class(config: dict):
    arch = config["architectures"][0]
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return transformers.AutoModelForCausalLM
    if arch.endswith("ForMaskedLM"):
        return transformers.AutoModelForMaskedLM
    return transformers.AutoModel


def load_hf(folder):
    config = json.loads((folder / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = auto_class(config).from_pretrained(folder, output_loading_info=True)
    # nothing left at random init: BertModel's pooler is the one part no graph here has
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
    assert not missing and not info["unexpected_keys"], info
    return model.eval()


def example_feeds(path, vocab: int, batch: int = 2) -> dict:
    """Random ids (2 x 7, or the graph's static shape), the last row right-padded by two tokens."""
    inputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    names = [i.name for i in inputs]
    shape = [d if isinstance(d, int) else default for d, default in zip(inputs[0].shape, (batch, 7))]
    g = torch.Generator().manual_seed(0)
    feeds = {"input_ids": torch.randint(0, vocab, shape, generator=g),
             "attention_mask": torch.ones(shape, dtype=torch.long),
             "token_type_ids": torch.randint(0, 2, shape, generator=g)}
    feeds["attention_mask"][-1, -2:] = 0
    return {k: v for k, v in feeds.items() if k in names}


def ort_output(model, feeds) -> np.ndarray:
    data = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    sess = ort.InferenceSession(str(data) if isinstance(data, os.PathLike) else data,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def hf_output(model, feeds) -> np.ndarray:
    with torch.no_grad():
        out = model(**feeds)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def relative_error(got, ref, feeds) -> float:
    mask = feeds.get("attention_mask", torch.ones_like(feeds["input_ids"])).bool().numpy()
    return float(np.abs(got - ref)[mask].max() / max(1.0, np.abs(ref).max()))


@pytest.fixture(scope="module")
def exported(zoo, tmp_path_factory):
    """name -> (onnx path, hf folder), exported once per module."""
    root, done = tmp_path_factory.mktemp("hf"), {}

    def get(name):
        if name not in done:
            path = zoo_model(zoo, name)
            done[name] = (path, api.export_hf(path, root / name))
        return done[name]
    return get


@pytest.mark.parametrize("name", FORMS)
def test_export_loads_and_matches_onnxruntime(exported, name):
    path, folder = exported(name)
    model = load_hf(folder)
    feeds = example_feeds(path, model.config.vocab_size)
    err = relative_error(hf_output(model, feeds), ort_output(path, feeds), feeds)
    assert err < RTOL, f"{name}: {err:.2e}"


# forms with folded constants: static shapes (rotary tables and position lookups folded into constants),
# a simplified graph, opset 23's fused ops (ONNX Runtime runs its RotaryEmbedding at batch 1 only)
OTHER_FORMS = [("llama-gqa-static-b1", 1), ("gpt2-static-b2", 2), ("bert-static-b2", 2),
               ("llama-gqa-slim-ts17", 2), ("llama-gqa-dynamo23", 1)]


@pytest.mark.parametrize("name, batch", OTHER_FORMS)
def test_other_forms_export_and_match(exported, name, batch):
    path, folder = exported(name)
    model = load_hf(folder)
    feeds = example_feeds(path, model.config.vocab_size, batch)
    if "attention_mask" not in feeds:
        feeds["attention_mask"] = torch.ones_like(feeds["input_ids"])  # HF's default; the graph has none
    want = ort_output(path, {k: v for k, v in feeds.items() if k != "attention_mask" or
                             k in [i.name for i in onnx.load(str(path)).graph.input]})
    assert relative_error(hf_output(model, feeds), want, feeds) < RTOL


@pytest.mark.parametrize("name", [n for n in FORMS if n != "minilm-ts17"] + [n for n, _ in OTHER_FORMS])
def test_round_trip_is_bit_identical(exported, name):
    path, folder = exported(name)
    back = api.import_hf(folder, path)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in back.graph.initializer}
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].tobytes() == after[k].tobytes(), k


def grown(zoo, tmp_path, kind):
    if kind == "widened-gpt2":
        model = api.widen(zoo_model(zoo, "gpt2-ts17"), 2, method="hypercloning")
    else:
        model = api.deepen(zoo_model(zoo, "llama-gqa-ts17"), 4, method="identity")
    path = tmp_path / "grown.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind, key, size", [("widened-gpt2", "n_embd", 128), ("deepened-llama", "num_hidden_layers", 4)])
def test_grown_model_exports_at_its_new_size(zoo, tmp_path, kind, key, size):
    path = grown(zoo, tmp_path, kind)
    folder = api.export_hf(path, tmp_path / "hf")
    model = load_hf(folder)
    assert getattr(model.config, key) == size
    feeds = example_feeds(path, model.config.vocab_size)
    assert relative_error(hf_output(model, feeds), ort_output(path, feeds), feeds) < RTOL


def add_o_bias(path, out):
    """The Llama graph with a bias after every attention output projection and nowhere else: no
    transformers class has that (Llama biases all four projections, Qwen2 only Q, K and V)."""
    _, roles = model_roles(path)
    proto = onnx.load(str(path))
    g = proto.graph
    for i, role in enumerate(r for r in roles if r.endswith(".attn.o")):
        name, _ = roles[role]
        pos, node = next((k, n) for k, n in enumerate(g.node) if n.op_type == "MatMul" and name in n.input)
        old, new = node.output[0], node.output[0] + "_biased"
        for n in g.node:
            n.input[:] = [new if x == old else x for x in n.input]
        hidden = next(t for t in g.initializer if t.name == name).dims[1]
        g.initializer.append(onnx.numpy_helper.from_array(np.full(hidden, 0.1, np.float32), f"o_bias_{i}"))
        g.node.insert(pos + 1, onnx.helper.make_node("Add", [old, f"o_bias_{i}"], [new]))
    onnx.save(proto, str(out))
    return out


def test_structure_without_a_class_is_refused_and_nothing_written(zoo, tmp_path):
    path = add_o_bias(zoo_model(zoo, "llama-gqa-ts17"), tmp_path / "o-bias.onnx")
    target = tmp_path / "out" / "hf"
    result = runner.invoke(app, ["export-hf", str(path), "-o", str(target)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "biases on all of Q, K, V and O or none" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_round_trip_with_tokenizer(zoo, tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(zoo_model(zoo, "gpt2-ts17").read_bytes())
    (tmp_path / "tokenizer.json").write_text("{}")
    result = runner.invoke(app, ["export-hf", str(src), "-o", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    again = runner.invoke(app, ["export-hf", str(src), "-o", str(tmp_path / "hf")])
    assert again.exit_code == 2 and "exists" in again.output
    result = runner.invoke(app, ["import-hf", str(tmp_path / "hf"), str(src), "-o", str(tmp_path / "back.onnx")])
    assert result.exit_code == 0, result.output
    a, b = onnx.load(str(src)), onnx.load(str(tmp_path / "back.onnx"))
    assert [t.raw_data for t in a.graph.initializer] == [t.raw_data for t in b.graph.initializer]


def train_one_step(model, feeds):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(**feeds, labels=feeds["input_ids"]) if hasattr(model, "lm_head") or \
        hasattr(model, "embed_out") or hasattr(model, "cls") else None
    loss = out.loss if out is not None else model(**feeds).last_hidden_state.pow(2).mean()
    loss.backward()
    opt.step()
    return model.eval()


@pytest.mark.parametrize("name", ["gpt2-ts17", "llama-gqa-ts17", "bert-mlm-ts17", "neox-dynamo18"])
def test_trained_weights_come_back(exported, tmp_path, name):
    path, folder = exported(name)
    model = load_hf(folder)
    feeds = example_feeds(path, model.config.vocab_size)
    train_one_step(model, feeds)
    model.save_pretrained(tmp_path / "trained")
    trained = api.import_hf(tmp_path / "trained", path, output=tmp_path / "trained.onnx")
    want = hf_output(model, feeds)
    assert relative_error(ort_output(trained, feeds), want, feeds) < RTOL
    assert relative_error(ort_output(path, feeds), want, feeds) > 100 * RTOL  # the step did change the model


def test_a_trained_bias_the_graph_lacks_is_refused(exported, tmp_path):
    path, folder = exported("gpt2-fresh-dynamo18")
    model = load_hf(folder)
    train_one_step(model, example_feeds(path, model.config.vocab_size))
    model.save_pretrained(tmp_path / "trained")
    with pytest.raises(OnnxgrowError, match="no longer zero"):
        api.import_hf(tmp_path / "trained", path, output=tmp_path / "trained.onnx")
    assert not (tmp_path / "trained.onnx").exists()


# Families outside the zoo, built here (tiny, random, TorchScript opset 17) as the zoo builds its own.
# Mistral computes what Llama computes over a graph's full causal mask, so it exports as Llama.
OTHER_FAMILIES = {
    "distilbert": ("bert", "DistilBertModel", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=160)),
    "roberta": ("bert", "RobertaModel", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=160, max_position_embeddings=130)),
    "mistral": ("llama", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("llama", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "phi": ("llama", None, dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                partial_rotary_factor=0.5)),
    "gemma": ("llama", None, dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16)),
}
HF_CLASSES = {"distilbert": ("DistilBertConfig", "DistilBertModel"), "roberta": ("RobertaConfig", "RobertaModel"),
              "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "phi": ("PhiConfig", "PhiForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM")}


@pytest.fixture(scope="module")
def other_family(tmp_path_factory):
    """name -> an ONNX export (TorchScript, opset 17) of a tiny random model of that family."""
    builder, root, done = load_builder(), tmp_path_factory.mktemp("families"), {}

    def get(name):
        if name not in done:
            zoo_family, _, sizes = OTHER_FAMILIES[name]
            config_cls, model_cls = (getattr(transformers, c) for c in HF_CLASSES[name])
            torch.manual_seed(0)
            extra = {"add_pooling_layer": False} if name == "roberta" else {}  # as the zoo's BERT: no pooler
            model = model_cls(config_cls(vocab_size=1000, attn_implementation="eager", **sizes), **extra).eval()
            builder.randomize_norms_and_biases(model, 1)
            spec = builder.Spec(f"{name}-ts17", zoo_family, "torchscript", 17,
                                dict(builder.TINY, no_token_types=name == "distilbert"))
            path = root / f"{name}.onnx"
            with builder.quiet():
                builder.export_torchscript(spec, model, path)
            done[name] = path
        return done[name]
    return get


@pytest.mark.parametrize("name", ["distilbert", "roberta", "mistral", "qwen2"])
def test_other_families_export_and_come_back(other_family, tmp_path, name):
    path = other_family(name)
    folder = api.export_hf(path, tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["architectures"] == [OTHER_FAMILIES[name][1]]
    model = load_hf(folder)
    feeds = example_feeds(path, model.config.vocab_size)
    feeds["input_ids"][0, -1] = 1  # a padding id (RoBERTa's positions skip it)
    assert relative_error(hf_output(model, feeds), ort_output(path, feeds), feeds) < RTOL
    back = api.import_hf(folder, path)
    assert [t.raw_data for t in onnx.load(str(path)).graph.initializer] == [t.raw_data for t in back.graph.initializer]


@pytest.mark.parametrize("name, reason", [("gemma", "token embeddings scaled by 8"),
                                          ("phi", "separate Q, K, V projections")])
def test_unmapped_families_are_refused(other_family, tmp_path, name, reason):
    with pytest.raises(OnnxgrowError, match=reason):
        api.export_hf(other_family(name), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


# ONNX Runtime's fused forms (#14): the optimizer's Skip norms, FastGelu and BiasGelu hold the projections'
# biases and the norms' epsilons; gpt2-ortattention's packed com.microsoft Attention holds the QKV
# projection (contiguous thirds, as GPT-2's c_attn) and takes position_ids and a packed past; the fully fused
# BERT's packed [q | k | v] becomes BertModel's query, key and value (and is joined again on import)
ORT_FORMS = ["gpt2-ortopt-ts17", "bert-ortopt-ts17", "gpt2-ortattention", "bert-ortfused-ts17"]


def ort_form_feeds(path, vocab: int) -> dict:
    """example_feeds, plus what gpt2-ortattention also takes: position ids and an empty past."""
    feeds = example_feeds(path, vocab)
    graph = onnx.load(str(path)).graph
    for i in graph.input:
        if i.name == "position_ids":
            feeds[i.name] = torch.arange(feeds["input_ids"].shape[1]).expand_as(feeds["input_ids"])
        elif i.name.startswith("past"):
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = torch.zeros(2, feeds["input_ids"].shape[0], dims[2], 0, dims[4])
    ints = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.INT32}
    return {k: v.int() if k in ints else v for k, v in feeds.items()}


@pytest.mark.parametrize("name", ORT_FORMS)
def test_ort_fused_forms_export_match_and_come_back(exported, name):
    path, folder = exported(name)
    model = load_hf(folder)
    config = json.loads((folder / "config.json").read_text())
    epsilon = config.get("layer_norm_epsilon", config.get("layer_norm_eps"))
    assert epsilon == (1e-5 if name.startswith("gpt2") else 1e-12)  # transformers' GPT-2 and BERT defaults
    feeds = ort_form_feeds(path, model.config.vocab_size)
    hf_feeds = {k: v.long() for k, v in feeds.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    assert relative_error(hf_output(model, hf_feeds), ort_output(path, feeds), hf_feeds) < RTOL
    back = api.import_hf(folder, path)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in back.graph.initializer}
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_the_epsilon_of_embed_layer_normalization_is_read(zoo, tmp_path):
    """The fully fused BERT's embedding norm is inside its EmbedLayerNormalization: the epsilon comes from
    that op's attribute (here set apart from the Skip norms' 1e-12), so export-hf refuses a model whose
    norms disagree instead of writing one epsilon for all."""
    from onnxgrow.hf import facts
    from onnxgrow.weights import spec_and_roles
    model = onnx.load(str(zoo_model(zoo, "bert-ortfused-ts17")))
    embed = next(n for n in model.graph.node if n.op_type == "EmbedLayerNormalization")
    for a in embed.attribute:
        if a.name == "epsilon":
            a.f = 1e-7
    path = tmp_path / "embed-eps.onnx"
    onnx.save(model, path)
    _, spec, _ = spec_and_roles(path)
    epsilons = {n.output.producer().op_type: facts.norm_epsilon(spec, n) for b in spec.blocks for n in b.norms}
    assert epsilons == {"EmbedLayerNormalization": 1e-7, "SkipLayerNormalization": 1e-12}
