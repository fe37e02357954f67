"""The transformers classes a TransformerSpec can become, and where each role lives in their state dicts.

`choose(spec, roles)` picks the family from the structure (norm kind and position, positional scheme,
fused or separate QKV, gated FFN, biases) and returns a `Layout`: the config.json and the list of
(Hugging Face tensor name, onnxgrow role, transposed) that export and import both walk. A role's
tensor is [out, in] (torch.nn.Linear); `transposed` marks a tensor stored [in, out] (GPT-2's Conv1D).
A structure no class computes is refused with the reason, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedGraph
from ..structure import TransformerSpec
from . import facts

Entry = tuple[str, str, bool]  # (hf name, role, transposed)


@dataclass
class Layout:
    config: dict
    prefix: str  # the base model's prefix in the head model's state dict ("transformer.", "model.", ...)
    entries: list[Entry] = field(default_factory=list)
    # hf name -> the role of the weight it belongs to, for biases the graph does not have: exporters drop
    # an all-zero bias (a freshly initialised model's), and the class's is then zeros of the weight's width
    zeros: dict[str, str] = field(default_factory=dict)
    # hf name -> (k, n): the tensor is the k-th of n equal parts of its role along the output axis
    # (a packed q | k | v weight that the class keeps as three)
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, hf: str, role: str, roles: dict, transposed: bool = False, optional: bool = False,
            part: tuple[int, int] | None = None) -> None:
        base = role.removesuffix(".bias")
        owner = base + ".weight" if base + ".weight" in roles else base  # a norm's weight, or the projection
        if part is not None:
            self.parts[hf] = part
        if role in roles:
            self.entries.append((hf, role, transposed))
        elif optional:
            return
        elif role.endswith(".bias") and owner in roles:
            self.zeros[hf] = owner
        else:
            raise UnsupportedGraph(f"{self.config['architectures'][0]} needs {hf}, the graph has no {role}")


def choose(spec: TransformerSpec, roles: dict) -> Layout:
    """The Hugging Face layout for `spec`, or UnsupportedGraph naming what does not fit."""
    common_checks(spec)
    if spec.norm_position == "post" and spec.token_type_embedding is None:
        return distilbert(spec, roles)
    if spec.norm_position == "post":
        return bert(spec, roles)
    if spec.positional == "rotary" and spec.norm == "rmsnorm":
        return llama(spec, roles)
    if spec.positional == "rotary" and not spec.blocks[0].attention.fused_qkv:
        raise UnsupportedGraph("no transformers class fits: LayerNorm blocks with rotary positions and separate "
                               "Q, K, V projections (Phi's shape) are not mapped")
    if spec.positional == "rotary":
        return neox(spec, roles)
    if spec.positional == "learned" and spec.blocks[0].attention.fused_qkv:
        return gpt2(spec, roles)
    if spec.positional == "learned":
        return opt(spec, roles)
    raise UnsupportedGraph(f"no transformers class for {spec.norm}, {spec.norm_position}-norm, "
                           f"{spec.positional} positions")


def common_checks(spec: TransformerSpec) -> None:
    if len({d.size for d in spec.ffn}) > 1:
        raise UnsupportedGraph(f"FFN widths differ between layers ({sorted({d.size for d in spec.ffn})}); "
                               "a transformers config has one intermediate_size")
    if any(b.ffn is None for b in spec.blocks):
        raise UnsupportedGraph("a block without an FFN has no transformers class")
    if spec.activation == "unknown":
        raise UnsupportedGraph("the FFN's activation is not one transformers names")
    scale = facts.embedding_scale(spec)
    if scale != 1.0:
        raise UnsupportedGraph(f"token embeddings scaled by {scale:g} (as Gemma does): no mapped transformers class")


def require(cond: bool, family: str, what: str) -> None:
    if not cond:
        raise UnsupportedGraph(f"no transformers class fits: {family} needs {what}")


def has_bias(roles: dict, layer_role: str) -> bool:
    return all(f"layers.{i}.{layer_role}.bias" in roles for i in range(len(roles_layers(roles))))


def roles_layers(roles: dict) -> set[int]:
    return {int(r.split(".")[1]) for r in roles if r.startswith("layers.")}


def any_bias(roles: dict, layer_role: str) -> bool:
    return any(f"layers.{i}.{layer_role}.bias" in roles for i in roles_layers(roles))


def sizes(spec: TransformerSpec) -> dict:
    return dict(hidden=spec.hidden.size, layers=len(spec.blocks), heads=spec.heads.size,
                kv_heads=spec.kv_heads.size, head_dim=spec.head_dim.size, ffn=spec.ffn[0].size,
                vocab=spec.vocab.size)


def eps_of(spec: TransformerSpec) -> float:
    """One epsilon for every norm, as transformers configs have."""
    norms = [n for b in spec.blocks for n in b.norms] + ([spec.final_norm] if spec.final_norm else [])
    values = {facts.norm_epsilon(spec, n) for n in norms}
    if len(values) > 1:
        raise UnsupportedGraph(f"norms use different epsilons {sorted(values)}; a transformers config has one")
    return values.pop()


def base_config(arch: str, model_type: str, spec: TransformerSpec) -> dict:
    dtype = str(spec.token_embedding.const_value.dtype).lower()
    torch_dtype = {"float": "float32", "float16": "float16", "bfloat16": "bfloat16"}.get(
        dtype.replace("datatype.", ""), "float32")
    return {"architectures": [arch], "model_type": model_type, "torch_dtype": torch_dtype,
            "vocab_size": spec.vocab.size, "tie_word_embeddings": spec.tied_embeddings}


def lm_head(layout: Layout, spec: TransformerSpec, roles: dict, name: str) -> None:
    if not spec.tied_embeddings:
        layout.add(name, "lm_head", roles)


def gpt2(spec: TransformerSpec, roles: dict) -> Layout:
    s = sizes(spec)
    att = spec.blocks[0].attention
    require(spec.lm_head is not None, "GPT2LMHeadModel", "an LM head")
    require(spec.norm == "layernorm" and not spec.parallel_residual, "GPT-2", "sequential LayerNorm blocks")
    require(facts.qkv_layout(spec, att) == "contiguous", "GPT-2", "a QKV split into contiguous thirds")
    require(s["kv_heads"] == s["heads"] and s["heads"] * s["head_dim"] == s["hidden"], "GPT-2",
            "heads x head_dim = hidden and no grouped KV")
    require(spec.blocks[0].ffn.gate is None, "GPT-2", "an ungated FFN")
    require(facts.position_offset(spec) == 0, "GPT-2", "positions counted from 0")
    config = base_config("GPT2LMHeadModel", "gpt2", spec) | {
        "n_embd": s["hidden"], "n_layer": s["layers"], "n_head": s["heads"], "n_inner": s["ffn"],
        "n_positions": spec.position_embedding.const_value.shape[-2], "activation_function": spec.activation,
        "layer_norm_epsilon": eps_of(spec), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    layout = Layout(config, "transformer.")
    t = "transformer."
    layout.add(t + "wte.weight", "embed.tokens", roles)
    layout.add(t + "wpe.weight", "embed.positions", roles)
    for i in range(s["layers"]):
        h, r = f"{t}h.{i}.", f"layers.{i}."
        for hf, role in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.o"),
                         ("mlp.c_fc", "ffn.up"), ("mlp.c_proj", "ffn.down")):
            layout.add(h + hf + ".weight", r + role, roles, transposed=True)
            layout.add(h + hf + ".bias", r + role + ".bias", roles)
        for hf, role in (("ln_1", "norm0"), ("ln_2", "norm1")):
            layout.add(h + hf + ".weight", r + role + ".weight", roles)
            layout.add(h + hf + ".bias", r + role + ".bias", roles)
    layout.add(t + "ln_f.weight", "final_norm.weight", roles)
    layout.add(t + "ln_f.bias", "final_norm.bias", roles)
    lm_head(layout, spec, roles, "lm_head.weight")
    require("lm_head.bias" not in roles, "GPT-2", "an LM head without bias")
    return layout


def opt(spec: TransformerSpec, roles: dict) -> Layout:
    s = sizes(spec)
    require(spec.lm_head is not None, "OPTForCausalLM", "an LM head")
    require(spec.norm == "layernorm" and not spec.parallel_residual, "OPT", "sequential LayerNorm blocks")
    require(s["kv_heads"] == s["heads"] and s["heads"] * s["head_dim"] == s["hidden"], "OPT",
            "heads x head_dim = hidden and no grouped KV")
    require(spec.blocks[0].ffn.gate is None, "OPT", "an ungated FFN")
    offset = facts.position_offset(spec)
    require(offset == 2, "OPT", f"positions offset by 2 (this graph adds {offset})")
    require(abs(eps_of(spec) - 1e-5) < 1e-12, "OPT", "LayerNorm epsilon 1e-5")
    rows = spec.position_embedding.const_value.shape[-2]
    config = base_config("OPTForCausalLM", "opt", spec) | {
        "hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "ffn_dim": s["ffn"], "max_position_embeddings": rows - offset, "word_embed_proj_dim": s["hidden"],
        "do_layer_norm_before": True, "activation_function": spec.activation, "enable_bias": True,
        "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0}
    layout = Layout(config, "model.")
    d = "model.decoder."
    layout.add(d + "embed_tokens.weight", "embed.tokens", roles)
    layout.add(d + "embed_positions.weight", "embed.positions", roles)
    for i in range(s["layers"]):
        h, r = f"{d}layers.{i}.", f"layers.{i}."
        for hf, role in (("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"),
                         ("self_attn.v_proj", "attn.v"), ("self_attn.out_proj", "attn.o"),
                         ("fc1", "ffn.up"), ("fc2", "ffn.down")):
            layout.add(h + hf + ".weight", r + role, roles)
            layout.add(h + hf + ".bias", r + role + ".bias", roles)
        for hf, role in (("self_attn_layer_norm", "norm0"), ("final_layer_norm", "norm1")):
            layout.add(h + hf + ".weight", r + role + ".weight", roles)
            layout.add(h + hf + ".bias", r + role + ".bias", roles)
    layout.add(d + "final_layer_norm.weight", "final_norm.weight", roles)
    layout.add(d + "final_layer_norm.bias", "final_norm.bias", roles)
    lm_head(layout, spec, roles, "lm_head.weight")
    return layout


def bert(spec: TransformerSpec, roles: dict) -> Layout:
    """BertModel, or BertForMaskedLM when the graph ends in the MLM head (dense, act, norm, decoder).
    Post-norm: roles name a norm by the block whose projections it feeds, so block i's output norm is
    block i+1's norm0, and the last one is the extra role `last_norm` (see export.extra_roles)."""
    s = sizes(spec)
    require(spec.norm == "layernorm" and spec.blocks[0].ffn.gate is None, "BERT", "LayerNorm and an ungated FFN")
    att = spec.blocks[0].attention
    # ONNX Runtime's fused Attention packs [q | k | v] along its output: three Linears again here
    require(not att.fused_qkv or facts.qkv_layout(spec, att) == "contiguous", "BERT",
            "separate Q, K and V projections, or one packed [q | k | v]")
    require(s["kv_heads"] == s["heads"] and s["heads"] * s["head_dim"] == s["hidden"], "BERT",
            "heads x head_dim = hidden and no grouped KV")
    offset = facts.position_offset(spec)
    roberta = offset > 0
    require(spec.positional == "learned" and (offset == 0 or facts.padding_id(spec) == offset), "BERT",
            "learned positions counted from 0 (RoBERTa: from the padding id + 1, skipping padding)")
    mlm = spec.lm_head is not None
    require(not (mlm and roberta), "RoBERTa", "no MLM head (RobertaForMaskedLM is not mapped)")
    arch = "BertForMaskedLM" if mlm else "RobertaModel" if roberta else "BertModel"
    types = spec.token_type_embedding.const_value.shape[-2] if spec.token_type_embedding is not None else 2
    config = base_config(arch, "roberta" if roberta else "bert", spec) | {
        "hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "intermediate_size": s["ffn"], "hidden_act": spec.activation, "layer_norm_eps": eps_of(spec),
        "max_position_embeddings": spec.position_embedding.const_value.shape[-2], "type_vocab_size": types,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if not mlm:
        config["tie_word_embeddings"] = True  # no output embedding to tie; the transformers default
    if roberta:
        config["pad_token_id"] = offset
    b = "bert." if mlm else ""
    layout = Layout(config, "bert.")
    layout.add(b + "embeddings.word_embeddings.weight", "embed.tokens", roles)
    layout.add(b + "embeddings.position_embeddings.weight", "embed.positions", roles)
    layout.add(b + "embeddings.token_type_embeddings.weight", "embed.token_types", roles, optional=True)
    layout.add(b + "embeddings.LayerNorm.weight", "layers.0.norm0.weight", roles)
    layout.add(b + "embeddings.LayerNorm.bias", "layers.0.norm0.bias", roles)
    for i in range(s["layers"]):
        h, r = f"{b}encoder.layer.{i}.", f"layers.{i}."
        for k, (hf, role) in enumerate((("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"),
                                        ("attention.self.value", "attn.v"))):
            role, part = ("attn.qkv", (k, 3)) if att.fused_qkv else (role, None)
            layout.add(h + hf + ".weight", r + role, roles, part=part)
            layout.add(h + hf + ".bias", r + role + ".bias", roles, part=part)
        for hf, role in (("attention.output.dense", "attn.o"), ("intermediate.dense", "ffn.up"),
                         ("output.dense", "ffn.down")):
            layout.add(h + hf + ".weight", r + role, roles)
            layout.add(h + hf + ".bias", r + role + ".bias", roles)
        out_norm = f"layers.{i + 1}.norm0" if i + 1 < s["layers"] else "last_norm"
        for hf, role in (("attention.output.LayerNorm", r + "norm1"), ("output.LayerNorm", out_norm)):
            layout.add(h + hf + ".weight", role + ".weight", roles)
            layout.add(h + hf + ".bias", role + ".bias", roles)
    if mlm:
        p = "cls.predictions."
        layout.add(p + "transform.dense.weight", "head.transform", roles)
        layout.add(p + "transform.dense.bias", "head.transform.bias", roles)
        layout.add(p + "transform.LayerNorm.weight", "final_norm.weight", roles)
        layout.add(p + "transform.LayerNorm.bias", "final_norm.bias", roles)
        layout.add(p + "bias", "lm_head.bias", roles)
        lm_head(layout, spec, roles, p + "decoder.weight")
    return layout


def rotary_config(spec: TransformerSpec) -> tuple[float, float, int | None]:
    """(base, fraction of head_dim rotated, rows of a cos table or None)."""
    base, width, rows = facts.rotary(spec)
    return base, width / spec.head_dim.size, rows


def llama(spec: TransformerSpec, roles: dict) -> Layout:
    """LlamaForCausalLM; Qwen2ForCausalLM when Q, K and V carry biases and O does not."""
    s = sizes(spec)
    require(spec.lm_head is not None, "LlamaForCausalLM", "an LM head")
    require(not spec.parallel_residual and spec.blocks[0].ffn.gate is not None, "Llama",
            "sequential blocks with a gated FFN")
    require(not spec.blocks[0].attention.fused_qkv, "Llama", "separate Q, K and V projections")
    require(not any_bias(roles, "ffn.up") or has_bias(roles, "ffn.up"), "Llama", "biases on every FFN or none")
    base, fraction, rows = rotary_config(spec)
    require(fraction == 1.0, "Llama", f"a fully rotated head (this graph rotates {fraction:g} of it)")
    qkv_bias = [has_bias(roles, f"attn.{n}") for n in "qkv"]
    o_bias = has_bias(roles, "attn.o")
    qwen2 = all(qkv_bias) and not o_bias
    require(qwen2 or len(set(qkv_bias + [o_bias])) == 1, "Llama",
            "biases on all of Q, K, V and O or none (Qwen2: on Q, K and V only)")
    arch, model_type = ("Qwen2ForCausalLM", "qwen2") if qwen2 else ("LlamaForCausalLM", "llama")
    config = base_config(arch, model_type, spec) | {
        "hidden_size": s["hidden"], "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"],
        "hidden_act": spec.activation, "rms_norm_eps": eps_of(spec), "rope_theta": base,
        # RoPE computed from positions needs no table: any length runs; 2048 is a conventional bound
        "max_position_embeddings": rows or 2048, "attention_dropout": 0.0}
    if qwen2:
        require(not any_bias(roles, "ffn.up"), "Qwen2", "an FFN without biases")
        config |= {"use_sliding_window": False}
    else:
        config |= {"attention_bias": o_bias, "mlp_bias": has_bias(roles, "ffn.up")}
    layout = Layout(config, "model.")
    for i in range(s["layers"]):
        h, r = f"model.layers.{i}.", f"layers.{i}."
        for hf, role in (("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"),
                         ("self_attn.v_proj", "attn.v"), ("self_attn.o_proj", "attn.o"),
                         ("mlp.gate_proj", "ffn.gate"), ("mlp.up_proj", "ffn.up"), ("mlp.down_proj", "ffn.down")):
            layout.add(h + hf + ".weight", r + role, roles)
            layout.add(h + hf + ".bias", r + role + ".bias", roles, optional=True)
        layout.add(h + "input_layernorm.weight", r + "norm0.weight", roles)
        layout.add(h + "post_attention_layernorm.weight", r + "norm1.weight", roles)
    layout.add("model.embed_tokens.weight", "embed.tokens", roles)
    layout.add("model.norm.weight", "final_norm.weight", roles)
    lm_head(layout, spec, roles, "lm_head.weight")
    require(not any(r.startswith("layers.") and r.endswith("norm0.bias") for r in roles), "Llama",
            "RMSNorms without bias")
    return layout


def neox(spec: TransformerSpec, roles: dict) -> Layout:
    s = sizes(spec)
    att = spec.blocks[0].attention
    require(spec.lm_head is not None, "GPTNeoXForCausalLM", "an LM head")
    require(spec.norm == "layernorm" and spec.blocks[0].ffn.gate is None, "GPT-NeoX", "LayerNorm and an ungated FFN")
    require(att.fused_qkv and facts.qkv_layout(spec, att) == "per_head", "GPT-NeoX",
            "a fused QKV viewed as [heads, 3 x head_dim]")
    require(s["kv_heads"] == s["heads"] and s["heads"] * s["head_dim"] == s["hidden"], "GPT-NeoX",
            "heads x head_dim = hidden and no grouped KV")
    base, fraction, rows = rotary_config(spec)
    bias = has_bias(roles, "attn.qkv")
    config = base_config("GPTNeoXForCausalLM", "gpt_neox", spec) | {
        "hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "intermediate_size": s["ffn"], "hidden_act": spec.activation, "rotary_pct": fraction,
        "partial_rotary_factor": fraction, "rotary_emb_base": base, "rope_theta": base,
        "max_position_embeddings": rows or 2048, "layer_norm_eps": eps_of(spec),
        "use_parallel_residual": spec.parallel_residual, "attention_bias": bias,
        "attention_dropout": 0.0, "hidden_dropout": 0.0}
    layout = Layout(config, "gpt_neox.")
    g = "gpt_neox."
    layout.add(g + "embed_in.weight", "embed.tokens", roles)
    for i in range(s["layers"]):
        h, r = f"{g}layers.{i}.", f"layers.{i}."
        for hf, role in (("attention.query_key_value", "attn.qkv"), ("attention.dense", "attn.o"),
                         ("mlp.dense_h_to_4h", "ffn.up"), ("mlp.dense_4h_to_h", "ffn.down")):
            layout.add(h + hf + ".weight", r + role, roles)
            layout.add(h + hf + ".bias", r + role + ".bias", roles, optional=role.startswith("attn") and not bias)
        for hf, role in (("input_layernorm", "norm0"), ("post_attention_layernorm", "norm1")):
            layout.add(h + hf + ".weight", r + role + ".weight", roles)
            layout.add(h + hf + ".bias", r + role + ".bias", roles)
    layout.add(g + "final_layer_norm.weight", "final_norm.weight", roles)
    layout.add(g + "final_layer_norm.bias", "final_norm.bias", roles)
    lm_head(layout, spec, roles, "embed_out.weight")
    return layout


def distilbert(spec: TransformerSpec, roles: dict) -> Layout:
    """DistilBertModel: BERT's post-norm blocks without a token-type table."""
    s = sizes(spec)
    require(spec.norm == "layernorm" and spec.blocks[0].ffn.gate is None, "DistilBERT", "LayerNorm and an ungated FFN")
    require(not spec.blocks[0].attention.fused_qkv, "DistilBERT", "separate Q, K and V projections")
    require(s["kv_heads"] == s["heads"] and s["heads"] * s["head_dim"] == s["hidden"], "DistilBERT",
            "heads x head_dim = hidden and no grouped KV")
    require(spec.positional == "learned" and facts.position_offset(spec) == 0, "DistilBERT",
            "learned positions counted from 0")
    require(spec.lm_head is None, "DistilBERT", "no MLM head (DistilBertForMaskedLM is not mapped)")
    require(eps_of(spec) == 1e-12, "DistilBERT", "LayerNorm epsilon 1e-12")
    require(spec.activation in ("gelu", "relu"), "DistilBERT", "a gelu or relu FFN")
    config = base_config("DistilBertModel", "distilbert", spec) | {
        "dim": s["hidden"], "n_layers": s["layers"], "n_heads": s["heads"], "hidden_dim": s["ffn"],
        "activation": spec.activation, "max_position_embeddings": spec.position_embedding.const_value.shape[-2],
        "sinusoidal_pos_embds": False, "dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": True}
    layout = Layout(config, "distilbert.")
    layout.add("embeddings.word_embeddings.weight", "embed.tokens", roles)
    layout.add("embeddings.position_embeddings.weight", "embed.positions", roles)
    layout.add("embeddings.LayerNorm.weight", "layers.0.norm0.weight", roles)
    layout.add("embeddings.LayerNorm.bias", "layers.0.norm0.bias", roles)
    for i in range(s["layers"]):
        h, r = f"transformer.layer.{i}.", f"layers.{i}."
        for hf, role in (("attention.q_lin", "attn.q"), ("attention.k_lin", "attn.k"), ("attention.v_lin", "attn.v"),
                         ("attention.out_lin", "attn.o"), ("ffn.lin1", "ffn.up"), ("ffn.lin2", "ffn.down")):
            layout.add(h + hf + ".weight", r + role, roles)
            layout.add(h + hf + ".bias", r + role + ".bias", roles)
        out_norm = f"layers.{i + 1}.norm0" if i + 1 < s["layers"] else "last_norm"
        for hf, role in (("sa_layer_norm", r + "norm1"), ("output_layer_norm", out_norm)):
            layout.add(h + hf + ".weight", role + ".weight", roles)
            layout.add(h + hf + ".bias", role + ".bias", roles)
    return layout
