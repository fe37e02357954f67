"""GPT-2 in the form ONNX Runtime's own GPT-2 tooling writes (onnxruntime.transformers.models.gpt2
convert_to_onnx, then its optimizer): one com.microsoft Attention per layer with the packed [q | k | v]
projection inside, unidirectional=1, and the KV cache as one past/present tensor per layer in the packed
[2, batch, heads, sequence, head] layout; every residual Add + LayerNorm a SkipLayerNormalization (output 3
the residual stream), each bias + GELU a FastGelu.

Why written here and not by the tool: with torch 2.13 and transformers 4.57, convert_to_onnx's export
fails inside transformers' vmap mask code ("RuntimeError: unordered_map::at"), and the optimizer does not
fuse the attention of today's GPT-2 exports (TorchScript, dynamo or Optimum). So the graph is written
node by node, in that tool's layout and I/O names (input_ids, position_ids, attention_mask, past_i ->
logits, present_i), from a transformers GPT2LMHeadModel's weights; build.verify checks it against
PyTorch with an empty past and a past of 3 tokens.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"


class GraphWriter:
    """Collects nodes and initializers; names each weight by its state-dict name, as an export would."""

    def __init__(self, state: dict):
        self.state, self.nodes, self.inits = state, [], []

    def weight(self, name: str, transpose: bool = False) -> str:
        value = self.state[name].detach().numpy().astype(np.float32)
        stored = f"{name}.T" if transpose else name
        if stored not in {i.name for i in self.inits}:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value.T if transpose else value), stored))
        return stored

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", domain=domain, **attrs))
        return outputs


def skip_norm(g: GraphWriter, x: str, skip: str, ln: str, bias: str | None, out: str, eps: float):
    """SkipLayerNormalization(x, skip, gamma, beta[, bias]) -> (normed, residual sum)."""
    inputs = [x, skip, g.weight(f"{ln}.weight"), g.weight(f"{ln}.bias")] + ([g.weight(bias)] if bias else [])
    normed, _, _, residual = g.node("SkipLayerNormalization", inputs, [f"{out}_norm", "", "", f"{out}_sum"], MS,
                                    epsilon=eps)
    return normed, residual


def layer(g: GraphWriter, i: int, normed: str, residual: str, heads: int, eps: float, next_norm: str):
    p = f"transformer.h.{i}"
    attn, present = g.node("Attention", [normed, g.weight(f"{p}.attn.c_attn.weight"),
                                         g.weight(f"{p}.attn.c_attn.bias"), "attention_mask", f"past_{i}"],
                           [f"{p}.attn_out", f"present_{i}"], MS, num_heads=heads, unidirectional=1)
    proj, = g.node("MatMul", [attn, g.weight(f"{p}.attn.c_proj.weight")], [f"{p}.attn_proj"])
    normed, residual = skip_norm(g, proj, residual, f"{p}.ln_2", f"{p}.attn.c_proj.bias", f"{p}.ln_2", eps)
    up, = g.node("MatMul", [normed, g.weight(f"{p}.mlp.c_fc.weight")], [f"{p}.mlp_up"])
    act, = g.node("FastGelu", [up, g.weight(f"{p}.mlp.c_fc.bias")], [f"{p}.mlp_act"], MS)
    down, = g.node("MatMul", [act, g.weight(f"{p}.mlp.c_proj.weight")], [f"{p}.mlp_down"])
    return skip_norm(g, down, residual, next_norm, f"{p}.mlp.c_proj.bias", f"{p}.out", eps)


def gpt2_attention_graph(model, opset: int = 17) -> onnx.ModelProto:
    """A transformers GPT2LMHeadModel as ONNX Runtime's fused GPT-2 with past (see the module doc)."""
    c = model.config
    heads, head_dim, eps = c.n_head, c.n_embd // c.n_head, c.layer_norm_epsilon
    g = GraphWriter(model.state_dict())
    tokens, = g.node("Gather", [g.weight("transformer.wte.weight"), "input_ids"], ["tokens"])
    positions, = g.node("Gather", [g.weight("transformer.wpe.weight"), "position_ids"], ["positions"])
    normed, residual = skip_norm(g, tokens, positions, "transformer.h.0.ln_1", None, "embed", eps)
    for i in range(c.n_layer):
        next_norm = f"transformer.h.{i + 1}.ln_1" if i + 1 < c.n_layer else "transformer.ln_f"
        normed, residual = layer(g, i, normed, residual, heads, eps, next_norm)
    g.node("MatMul", [normed, g.weight("transformer.wte.weight", transpose=True)], ["logits"])  # tied head

    ints = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch_size", s])
            for n, s in (("input_ids", "seq_len"), ("position_ids", "seq_len"), ("attention_mask", "total_seq_len"))]
    cache = [2, "batch_size", heads, "past_seq_len", head_dim]
    pasts = [helper.make_tensor_value_info(f"past_{i}", TensorProto.FLOAT, cache) for i in range(c.n_layer)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "seq_len", c.vocab_size])]
    outputs += [helper.make_tensor_value_info(f"present_{i}", TensorProto.FLOAT,
                                              [2, "batch_size", heads, "total_seq_len", head_dim])
                for i in range(c.n_layer)]
    graph = helper.make_graph(g.nodes, "gpt2", ints + pasts, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                             producer_name="onnxruntime.transformers")
