"""Tiny pre-norm decoders written with onnx.helper alone: graphs the unit tests can build in
milliseconds and know everything about.

    proto = build(hidden=16, heads=2, ffn=40, vocab=50, layers=2)

The graph is laid out the way exporters lay out a GPT-style decoder, so the matcher meets the same
dataflow: a token-embedding Gather (plus learned positions looked up by Range(sequence)), then per
block

    h = Norm(x);  q, k, v = h Wq + bq, h Wk + bk, h Wv + bv
    q -> Reshape [0, 0, heads, head_dim] -> Transpose [b, heads, s, head_dim]   (k: [b, heads, d, s])
    a = Softmax(q k^T / sqrt(head_dim) + causal mask) v -> Transpose -> Reshape [0, 0, hidden]
    x = x + (a Wo + bo);  x = x + (act(Norm(x) W1 + b1) W2 + b2)

and a final norm and LM head (tied: a Transpose of the embedding table itself). Norms are
LayerNormalization (opset 17) or an RMSNorm decomposed into Pow/ReduceMean/Add/Sqrt/Div/Mul; the
activation is GELU decomposed with Erf, or Relu. Batch and sequence are dynamic. Every weight is
random (seeded) and distinct, so a copy map can be read back from a widened weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxgrow.blocks import block_graphs
from onnxgrow.structure import TransformerSpec, load_structure

OPSET = 17
IR_VERSION = 8  # what opset 17 needs; old enough for every ONNX Runtime the project supports


@dataclass(frozen=True)
class Toy:
    hidden: int = 16
    heads: int = 2
    ffn: int = 40
    vocab: int = 50
    layers: int = 2
    max_positions: int | None = 12  # None: no position table
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    activation: str = "gelu"  # "gelu" (Erf form) | "relu"
    tied: bool = False  # the LM head reads the token-embedding table itself
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class GraphWriter:
    """Collects nodes and initializers; every value and node gets a readable, unique name."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        self.count += 1
        node_name = f"{name}/{op_type}_{self.count}"
        out = out or node_name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attrs))
        return out

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, shape, std: float, mean: float = 0.0) -> str:
        return self.const(name, (mean + std * self.rng.standard_normal(shape)).astype(np.float32))

    def scalar(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, dtype=np.float32))

    def ints(self, name: str, values) -> str:
        return self.const(name, np.array(values, dtype=np.int64))


def norm(w: GraphWriter, cfg: Toy, x: str, name: str) -> str:
    scale = w.weight(f"{name}.weight", [cfg.hidden], std=0.2, mean=1.0)
    if cfg.norm == "layernorm":
        bias = w.weight(f"{name}.bias", [cfg.hidden], std=0.1)
        return w.op("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=1e-5)
    if cfg.norm != "rmsnorm":
        raise ValueError(f"unknown norm {cfg.norm!r}")
    square = w.op("Pow", [x, w.scalar(f"{name}.two", 2.0)], name)
    mean = w.op("ReduceMean", [square], name, axes=[-1], keepdims=1)
    rms = w.op("Sqrt", [w.op("Add", [mean, w.scalar(f"{name}.eps", 1e-6)], name)], name)
    return w.op("Mul", [w.op("Div", [x, rms], name), scale], name)


def linear(w: GraphWriter, x: str, name: str, n_in: int, n_out: int) -> str:
    y = w.op("MatMul", [x, w.weight(f"{name}.weight", [n_in, n_out], std=n_in ** -0.5)], name)
    return w.op("Add", [y, w.weight(f"{name}.bias", [n_out], std=0.1)], name)


def activation(w: GraphWriter, cfg: Toy, x: str, name: str) -> str:
    if cfg.activation == "relu":
        return w.op("Relu", [x], name)
    if cfg.activation != "gelu":
        raise ValueError(f"unknown activation {cfg.activation!r}")
    # 0.5 x (1 + erf(x / sqrt 2)), as TorchScript exports write nn.GELU
    erf = w.op("Erf", [w.op("Div", [x, w.scalar(f"{name}.sqrt2", np.sqrt(2.0))], name)], name)
    half = w.op("Mul", [x, w.scalar(f"{name}.half", 0.5)], name)
    return w.op("Mul", [half, w.op("Add", [erf, w.scalar(f"{name}.one", 1.0)], name)], name)


def attention(w: GraphWriter, cfg: Toy, h: str, mask: str, name: str) -> str:
    def heads(proj: str, perm: list[int]) -> str:
        y = linear(w, h, f"{name}.{proj}", cfg.hidden, cfg.hidden)
        y = w.op("Reshape", [y, w.ints(f"{name}.{proj}.split_heads", [0, 0, cfg.heads, cfg.head_dim])], name)
        return w.op("Transpose", [y], name, perm=perm)

    q, k, v = heads("q", [0, 2, 1, 3]), heads("k", [0, 2, 3, 1]), heads("v", [0, 2, 1, 3])
    scores = w.op("Mul", [w.op("MatMul", [q, k], name), w.scalar(f"{name}.scale", cfg.head_dim ** -0.5)], name)
    probs = w.op("Softmax", [w.op("Add", [scores, mask], name)], name, axis=-1)
    out = w.op("Transpose", [w.op("MatMul", [probs, v], name)], name, perm=[0, 2, 1, 3])
    out = w.op("Reshape", [out, w.ints(f"{name}.merge_heads", [0, 0, cfg.hidden])], name)
    return linear(w, out, f"{name}.o", cfg.hidden, cfg.hidden)


def embeddings_and_mask(w: GraphWriter, cfg: Toy) -> tuple[str, str]:
    """The residual stream's start, and the [s, s] causal mask (0 on and below the diagonal)."""
    wte = w.weight("wte", [cfg.vocab, cfg.hidden], std=1.0)
    x = w.op("Gather", [wte, "input_ids"], "embed")
    length = w.op("Gather", [w.op("Shape", ["input_ids"], "embed"), w.ints("embed.seq_axis", 1)], "embed", axis=0)
    positions = w.op("Range", [w.ints("embed.start", 0), length, w.ints("embed.step", 1)], "embed")
    if cfg.max_positions is not None:
        wpe = w.weight("wpe", [cfg.max_positions, cfg.hidden], std=0.5)
        x = w.op("Add", [x, w.op("Gather", [wpe, positions], "embed")], "embed")
    rows = w.op("Unsqueeze", [positions, w.ints("mask.rows", [1])], "mask")
    cols = w.op("Unsqueeze", [positions, w.ints("mask.cols", [0])], "mask")
    future = w.op("Greater", [cols, rows], "mask")
    mask = w.op("Where", [future, w.scalar("mask.blocked", -1e4), w.scalar("mask.open", 0.0)], "mask")
    return x, mask


def build(cfg: Toy | None = None, **overrides) -> onnx.ModelProto:
    cfg = replace(cfg or Toy(), **overrides)
    if cfg.hidden % cfg.heads:
        raise ValueError("hidden must be a multiple of heads")
    w = GraphWriter(np.random.default_rng(cfg.seed))
    x, mask = embeddings_and_mask(w, cfg)
    for i in range(cfg.layers):
        name = f"blocks.{i}"
        x = w.op("Add", [x, attention(w, cfg, norm(w, cfg, x, f"{name}.ln1"), mask, f"{name}.attn")], name)
        h = norm(w, cfg, x, f"{name}.ln2")
        up = activation(w, cfg, linear(w, h, f"{name}.up", cfg.hidden, cfg.ffn), f"{name}.act")
        x = w.op("Add", [x, linear(w, up, f"{name}.down", cfg.ffn, cfg.hidden)], name)
    h = norm(w, cfg, x, "ln_f")
    if cfg.tied:
        head = w.op("Transpose", ["wte"], "lm_head", perm=[1, 0])
    else:
        head = w.weight("lm_head.weight", [cfg.hidden, cfg.vocab], std=1.0)
    w.op("MatMul", [h, head], "lm_head", out="logits")
    graph = helper.make_graph(
        w.nodes, "toy",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", cfg.vocab])],
        w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxgrow-unit-toy")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def token_ids(cfg_or_vocab, batch: int = 2, sequence: int = 7, seed: int = 1) -> np.ndarray:
    vocab = cfg_or_vocab.vocab if isinstance(cfg_or_vocab, Toy) else int(cfg_or_vocab)
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, sequence), dtype=np.int64)


def run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    """Logits from ONNX Runtime on the CPU."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


# --- reading results back ---------------------------------------------------------------------


def assert_close_to_scale(new: np.ndarray, ref: np.ndarray, rel: float = 1e-5, atol: float = 1e-6) -> None:
    """Equal up to float32 rounding, measured against the size of the reference output."""
    assert new.shape == ref.shape
    worst = float(np.abs(new - ref).max())
    bound = rel * float(np.abs(ref).max()) + atol
    assert worst <= bound, f"max |diff| {worst:.3g} > {bound:.3g}"


def private_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy to hand to code that may write through to the proto's tensors (see test_passes:
    deepen renames the caller's initializers)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def structure(proto: onnx.ModelProto) -> TransformerSpec:
    return load_structure(ir.from_proto(proto))


def arrays(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def block_initializers(spec: TransformerSpec) -> list[list[ir.Value]]:
    """Per block, the initializers its nodes read, in node order."""
    result = []
    for block in block_graphs(spec):
        seen: list[ir.Value] = []
        for node in block.nodes:
            for v in node.inputs:
                if v is not None and v.is_initializer() and all(v is not s for s in seen):
                    seen.append(v)
        result.append(seen)
    return result


def block_arrays(proto: onnx.ModelProto) -> list[list[np.ndarray]]:
    return [[v.const_value.numpy() for v in values] for values in block_initializers(structure(proto))]


def copy_map(new: np.ndarray, old: np.ndarray, axis: int) -> np.ndarray:
    """For each slice of `new` along `axis`, the index of the equal slice of `old` (-1: none)."""
    new_slices = np.moveaxis(new, axis, 0).reshape(new.shape[axis], -1)
    old_slices = np.moveaxis(old, axis, 0).reshape(old.shape[axis], -1)
    found = []
    for s in new_slices:
        equal = np.nonzero((old_slices == s).all(axis=1))[0]
        found.append(int(equal[0]) if len(equal) == 1 else -1)
    return np.array(found)
