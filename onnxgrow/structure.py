"""Find the transformer in a graph: embeddings, blocks (norms, attention, FFN), final norm, LM head.

The matcher works on dataflow only. Attention is a Softmax between two activation MatMuls; its
projections are the weight MatMuls reached by walking back from Q, K and V and forward from the
output. FFNs are the remaining weight MatMuls, paired by walking back from each down projection.
Norms are LayerNormalization ops or their decomposed forms. The result, a `TransformerSpec`, also
names the model dimensions (hidden, heads, kv_heads, head_dim, ffn, vocab) as Dims of the analysis,
so every pass resizes the same symbols.

`match` runs the steps in this order, each a function below it:

    find_embeddings   the token table (looked up by input ids) and a learned position table
    find_attentions   Softmax between two activation MatMuls (or an opset-23 Attention node), its
                      Q/K/V/O projections, head geometry
    find_ffns         the remaining projections, paired through their activation
    find_lm_head      the projection from hidden to the vocabulary, and whether it is tied
    assign_blocks     one attention and the FFN after it make a block, in graph order
    attach_norms      the norm in front of each block's projections, and the final norm

A graph the steps cannot read is refused with UnsupportedGraph(reason, node): the node the matcher
stopped at, so the user can find the place.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .dims import Dim, atoms, factors, product_of, same, unify
from .errors import UnsupportedGraph
from .fusednorms import is_skip_norm
from .normalize import normalize
from .quantized import refuse_quantized
from .registry import op_label
from .shapeflow import ShapeFlow, analyse
from .shapeflow.rules.attention import ROTARY_HALF
from .views import CASTS, IDS, PASS_THROUGH, RESHAPES, SHAPE_OF, look_through  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


@dataclass
class Norm:
    kind: str  # "layernorm" | "rmsnorm"
    input: ir.Value
    output: ir.Value
    scale: str | None = None  # initializer names of the affine parameters
    bias: str | None = None
    node: ir.Node | None = None  # a fused Skip norm (ONNX Runtime's): it adds the update to the stream too


@dataclass
class Attention:
    softmax: ir.Node  # the Softmax of the scores, or the opset-23 Attention node that is all of it
    q_proj: ir.Node
    k_proj: ir.Node
    v_proj: ir.Node
    o_proj: ir.Node
    fused_qkv: bool
    kv_heads: Dim | None = None  # this attention's own Dims (set by head_geometry)
    group: Dim | None = None
    head_dim: Dim | None = None


@dataclass
class FFN:
    up: ir.Node
    down: ir.Node
    gate: ir.Node | None = None


@dataclass
class Block:
    attention: Attention
    ffn: FFN | None = None
    norms: list[Norm] = field(default_factory=list)


@dataclass
class TransformerSpec:
    model: ir.Model
    flow: ShapeFlow
    hidden: Dim
    heads: Dim
    kv_heads: Dim
    group: Dim | None
    head_dim: Dim
    vocab: Dim
    ffn: list[Dim]
    token_embedding: ir.Value
    position_embedding: ir.Value | None
    blocks: list[Block]
    final_norm: Norm | None
    lm_head: ir.Node | None
    tied_embeddings: bool
    norm: str
    norm_position: str
    positional: str
    activation: str
    parallel_residual: bool
    token_type_embedding: ir.Value | None = None  # BERT's segment table, looked up by token types
    token_ids: ir.Value | None = None  # the graph input of token ids

    def static_shape(self) -> tuple[int | None, int | None]:
        """(batch, sequence) where the token ids' axes have a fixed size (a static-shape export), else None."""
        dims = list(self.token_ids.shape) if self.token_ids is not None and self.token_ids.shape else []
        fixed = [d if isinstance(d, int) else None for d in dims]
        return (fixed + [None, None])[0], (fixed + [None, None])[1]

    def config(self) -> dict:
        """The configuration, in the terms of `onnxgrow inspect --json`."""
        g = self.model.graph
        return {
            "hidden_size": self.hidden.size,
            "num_layers": len(self.blocks),
            "num_heads": self.heads.size,
            "num_kv_heads": self.kv_heads.size,
            "head_dim": self.head_dim.size,
            "ffn_size": self.ffn[0].size if self.ffn else None,
            "vocab_size": self.vocab.size,
            # a table's rows; a folded lookup's (static-shape export) are the positions it holds
            "max_positions": self.position_embedding.const_value.shape[-2] if self.position_embedding else None,
            "norm": self.norm,
            "norm_position": self.norm_position,
            "positional": self.positional,
            "tied_embeddings": self.tied_embeddings,
            "activation": self.activation,
            "parallel_residual": self.parallel_residual,
            "num_parameters": count_parameters(self),
            "opset": g.opset_imports.get("", None),
            "static_batch": self.static_shape()[0],
            "static_sequence": self.static_shape()[1],
        }


# --- small graph helpers ------------------------------------------------------------------------

def weight_of(flow: ShapeFlow, node: ir.Node):
    """The (initializer, input index) of a MatMul/Gemm whose one operand is a weight, else None; of a
    com.microsoft Attention, its packed q | k | v weight (the projection is inside the op)."""
    if is_packed_weight_attention(node):
        init, _ = flow.source_initializer(node.inputs[1])
        return (init, 1) if init is not None else None
    if node.op_type == "Einsum":
        return einsum_weight(flow, node)
    if node.op_type not in ("MatMul", "Gemm"):
        return None
    for i in (1, 0):
        init, _ = flow.source_initializer(node.inputs[i])
        shape = init.const_value.shape if init is not None else ()
        # leading unit axes only on the right of activations x weight: rotary frequencies [1, d, 1] on
        # the left of positions are no projection
        if init is not None and (len(shape) == 2 or (i == 1 and is_matrix(shape))):
            return init, i
    return None


def einsum_weight(flow: ShapeFlow, node: ir.Node):
    """(kernel, input index) of a two-operand Einsum of an activation by a weight of rank >= 2 (Keras'
    MultiHeadAttention: "abc,cde->abde" by [hidden, heads, head_dim], "abcd,cde->abe" by
    [heads, head_dim, hidden]), else None."""
    if len(node.inputs) != 2 or "->" not in (attr_value(node, "equation") or ""):
        return None
    for i in (1, 0):
        init, perm = flow.source_initializer(node.inputs[i])
        if init is not None and perm is None and len(init.const_value.shape) >= 2 and \
                flow.source_initializer(node.inputs[1 - i])[0] is None:
            return init, i
    return None


def einsum_axes(node: ir.Node, index: int) -> tuple[list[int], list[int]]:
    """(summed, kept) axes of the Einsum's operand `index`: its letters missing from the output or not."""
    terms, output = attr_value(node, "equation").replace(" ", "").split("->")
    term = terms.split(",")[index]
    return [a for a, c in enumerate(term) if c not in output], [a for a, c in enumerate(term) if c in output]


def attr_value(node: ir.Node, name: str):
    a = node.attributes.get(name)
    return None if a is None else a.value


def is_matrix(shape) -> bool:
    """2-D, or 2-D behind leading axes of size 1 (tf2onnx stores a folded, transposed head [1, in, out])."""
    return len(shape) >= 2 and all(s == 1 for s in shape[:-2])


def is_projection(flow: ShapeFlow, node: ir.Node) -> bool:
    """A MatMul/Gemm of an activation by a 2-D weight."""
    return weight_of(flow, node) is not None


def data_input(flow: ShapeFlow, proj: ir.Node) -> ir.Value:
    """The operand of a projection that is not its weight."""
    return proj.inputs[1 - weight_of(flow, proj)[1]]


def table_of(gather: ir.Node) -> ir.Value | None:
    """The initializer a Gather looks up in, directly or through a Cast of it (fp16 weights in an
    fp32 graph), else None."""
    v = look_through(gather.inputs[0], CASTS)
    return v if v.is_initializer() else None


def producers_back(value: ir.Value, stop):
    """Walk back from `value` over producers; `stop(node)` ends a branch (and is collected)."""
    found, seen, todo = [], set(), deque([value])
    while todo:
        v = todo.popleft()
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if stop(node):
            found.append(node)
            continue
        if node.op_type in SHAPE_OF:
            continue  # a shape is not data: the walk follows values, not their sizes
        todo.extend(i for i in node.inputs if i is not None and not i.is_initializer())
    return found


def consumers_forward(value: ir.Value, stop):
    """Walk forward from `value` over consumers; `stop(node)` ends a branch (and is collected)."""
    found, seen, todo = [], set(), deque([value])
    while todo:
        v = todo.popleft()
        for node in v.consumers():
            if id(node) in seen or node.op_type in SHAPE_OF:
                continue
            seen.add(id(node))
            if stop(node):
                found.append(node)
                continue
            todo.extend(node.outputs)
    return found


def skip_view(value: ir.Value) -> ir.Value:
    """The value behind casts and dropouts (the same residual stream)."""
    return look_through(value, PASS_THROUGH)


def ids_source(value: ir.Value) -> ir.Value:
    """Where a tensor of ids comes from, looking through reshapes of the same ids."""
    return look_through(value, IDS)


def is_activation(flow: ShapeFlow, v: ir.Value | None) -> bool:
    return v is not None and flow.source_initializer(v)[0] is None


def known_shape(flow: ShapeFlow, value: ir.Value, node: ir.Node, what: str) -> list[Dim]:
    """The Dims of `value` (an input or output of `node`), or a refusal when the analysis could not
    give it any; the analysis' first problem is usually why."""
    shape = flow.dims.get(value)
    if not shape:
        why = f"; the analysis first stopped at {flow.problems[0]}" if flow.problems else ""
        raise UnsupportedGraph(f"cannot follow the graph: the shape of {what} is unknown{why}", node)
    return shape


def output_width(flow: ShapeFlow, node: ir.Node) -> Dim:
    """The last axis of a projection's output."""
    return known_shape(flow, node.outputs[0], node, "the projection's output")[-1]


# --- the matcher ----------------------------------------------------------------------------------

def load_structure(model: ir.Model) -> TransformerSpec:
    """Normalize `model` IN PLACE, then match it.

    Normalizing is a rewrite that changes no output (constants become initializers, shared
    parameters and small ints get their own copies: see normalize.py), but it does change the
    model object given: pass a copy (modelio.as_ir(model)) to keep the original as it is.
    """
    refuse_quantized(model)  # before any analysis: onnxgrow grows float models (see quantized.py)
    normalize(model)
    return find_structure(model)


def find_structure(model: ir.Model, flow: ShapeFlow | None = None) -> TransformerSpec:
    """The TransformerSpec of a normalized model (load_structure normalizes first)."""
    return match(model, flow or analyse(model))


def match(model: ir.Model, flow: ShapeFlow) -> TransformerSpec:
    """Find the parts step by step (see the module docstring), then describe the model they make."""
    g = model.graph
    emb = find_embeddings(g, flow)
    attentions, missing = find_attentions(g, flow)
    heads, kv_heads, group, head_dim = head_layout(attentions)
    attention_nodes = {id(n) for a in attentions for n in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)}
    projections = [n for n in g if is_projection(flow, n) and id(n) not in attention_nodes]
    ffns = find_ffns(flow, projections, emb.hidden, attention_nodes)
    lm_head, tied = find_lm_head(flow, projections, ffns, emb)
    blocks, no_ffn = assign_blocks(g, attentions, ffns)
    missing += no_ffn
    if missing:
        raise UnsupportedGraph("; ".join(reason for reason, _ in missing), missing[0][1])
    norms = find_norms(g, flow, emb.hidden)
    final_norm = attach_norms(flow, blocks, norms, lm_head)

    norm_position = position_of_norms(flow, blocks)
    # parallel residual (GPT-NeoX, GPT-J): attention and FFN read the same residual value
    parallel = bool(norm_position == "pre" and len(blocks[0].norms) == 2
                    and residual_input(blocks[0].norms[0]) is residual_input(blocks[0].norms[1]))
    positional = "learned" if emb.position is not None else (
        "rotary" if has_rotation(blocks[0].attention) else "none")
    ffn_widths = [known_shape(flow, data_input(flow, b.ffn.down), b.ffn.down,
                              "the down projection's input")[-1].root() for b in blocks]
    spec = TransformerSpec(
        model=model, flow=flow, hidden=emb.hidden, heads=heads, kv_heads=kv_heads, group=group,
        head_dim=head_dim, vocab=emb.vocab, ffn=ffn_widths, token_embedding=emb.token,
        position_embedding=emb.position, blocks=blocks, final_norm=final_norm, lm_head=lm_head,
        tied_embeddings=tied, norm=norms[0].kind if norms else "none", norm_position=norm_position,
        positional=positional, activation=activation_of(blocks[0].ffn), parallel_residual=parallel,
        token_type_embedding=emb.token_types, token_ids=emb.ids)
    assign_roles(spec)
    log.debug("matched %d blocks: hidden %s, heads %s, kv_heads %s, ffn %s, vocab %s, %s %s-norm, "
              "%s positions, %s", len(blocks), emb.hidden.size, heads.size, kv_heads.size,
              [d.size for d in ffn_widths], emb.vocab.size, spec.norm, norm_position, positional, spec.activation)
    return spec


@dataclass
class Embeddings:
    """What find_embeddings found: the tables, and the Dims the token table measures."""
    token: ir.Value
    position: ir.Value | None
    hidden: Dim
    vocab: Dim
    token_types: ir.Value | None = None
    ids: ir.Value | None = None  # the graph input holding the token ids


def find_embeddings(g: ir.Graph, flow: ShapeFlow) -> Embeddings:
    """Gathers of rank-2 float tables, told apart by where their ids come from (lookup_role): the
    largest looked up by input ids holds the tokens; positions are computed (Range, CumSum, a slice
    of an arange buffer) or a position-ids input; token types are a constant id or a small input."""
    fused = fused_embedding(g, flow)
    if fused is not None:
        return fused
    # a table stored in another dtype may be gathered from a Cast of it
    gathers, tables = [], {}
    for node in g:
        if node.op_type == "Gather" and attr_axis(node) == 0:
            table = table_of(node)
            t = table.const_value if table is not None else None
            if t is not None and len(t.shape) == 2 and t.dtype.is_floating_point():
                gathers.append(node)
                tables[id(node)] = table
    direct = [n for n in gathers if input_ids_of(n) is not None]
    if not direct:
        raise no_token_embedding(g, gathers, tables)
    # the largest table is the tokens', unless its input is named for positions or token types
    token = max(direct, key=lambda n: (role_by_name(input_ids_of(n).name) is None,
                                       tables[id(n)].const_value.shape[0]))
    token_table = tables[id(token)]
    tie_copies(g, flow, token_table)
    hidden = flow.dims[token_table][1].root()
    vocab = flow.dims[token_table][0].root()
    others = [n for n in gathers if n is not token and same(flow.dims[tables[id(n)]][1], hidden)]
    roles = {id(n): lookup_role(n, tables[id(n)]) for n in others}
    position = next((tables[id(n)] for n in others if roles[id(n)] == "positions"), None)
    types = next((tables[id(n)] for n in others if roles[id(n)] == "token_types"), None)
    if position is None and types is None:
        position, types = folded_lookups(flow, token, hidden)
    log.debug("token embedding %r (vocab %s, hidden %s) at Gather %r; position table %r; token-type table %r",
              token_table.name, vocab.size, hidden.size, token.name, position and position.name,
              types and types.name)
    return Embeddings(token_table, position, hidden, vocab, types, input_ids_of(token))


def input_ids_of(gather: ir.Node) -> ir.Value | None:
    """The graph input a lookup's ids are, directly, reshaped, or wrapped for negative indices (Keras
    writes where(ids < 0, ids + vocab, ids) as Cast, Less, Mul and Add on int32 ids); None for ids
    counted in the graph (positions) or taken from constants."""
    direct = ids_source(gather.inputs[1])
    if direct.is_graph_input():
        return direct
    counters, _, inputs = id_sources(gather.inputs[1])
    return inputs[0] if len(inputs) == 1 and not counters else None


# com.microsoft EmbedLayerNormalization (onnxruntime.transformers.optimizer's BERT): the lookups of all
# three tables and the embedding norm in one node. Inputs: ids, segment ids?, word, position, segment?,
# gamma, beta, mask?, position ids?; outputs: the normed sum, mask_index (read by the fused
# attentions), the sum itself?
EMBED_NORM = "EmbedLayerNormalization"


def is_embed_norm(node: ir.Node) -> bool:
    return node.op_type == EMBED_NORM and node.domain == "com.microsoft"


def fused_embedding(g: ir.Graph, flow: ShapeFlow) -> Embeddings | None:
    """The tables of an EmbedLayerNormalization that reads the input ids, if the graph has one."""
    node = next((n for n in g if is_embed_norm(n) and ids_source(n.inputs[0]).is_graph_input()), None)
    if node is None:
        return None

    def table(index):
        v = node.inputs[index] if len(node.inputs) > index else None
        return None if v is None else (flow.source_initializer(v)[0] or v)

    token = table(2)
    if token is None or token.const_value is None or len(token.const_value.shape) != 2:
        raise UnsupportedGraph("the word table of this EmbedLayerNormalization is not a 2-D initializer", node)
    tie_copies(g, flow, token)
    hidden, vocab = flow.dims[token][1].root(), flow.dims[token][0].root()
    log.debug("token embedding %r in %s %r, position table %r, token-type table %r", token.name, EMBED_NORM,
              node.name, table(3) and table(3).name, table(4) and table(4).name)
    return Embeddings(token, table(3), hidden, vocab, table(4), ids_source(node.inputs[0]))


def embed_norm(flow: ShapeFlow, node: ir.Node) -> Norm:
    """The embedding norm inside an EmbedLayerNormalization (gamma, beta: inputs 5 and 6). Its input, the
    sum of the lookups, is a value of the graph only when the node writes it (output 2); else the
    normed output stands for it (the stream a post-norm model's first block reads)."""
    summed = node.outputs[2] if len(node.outputs) > 2 and node.outputs[2] is not None else node.outputs[0]
    return Norm("layernorm", summed, node.outputs[0], param_name(flow, node, 5), param_name(flow, node, 6))


def folded_lookups(flow: ShapeFlow, token: ir.Node, hidden: Dim) -> tuple[ir.Value | None, ir.Value | None]:
    """(positions, token types) of a static-shape export, where the exporter folded each lookup into a
    constant [..., seq, hidden] added to the token embeddings: a constant whose rows differ holds the
    positions, one whose rows are all equal the (single) token type."""
    seq = {id(d) for d in flow.token_axes()}
    position = types = None
    value = token.outputs[0]
    while len(value.consumers()) == 1 and value.consumers()[0].op_type == "Add":
        add = value.consumers()[0]
        other = next((v for v in add.inputs if v is not value), None)
        dims = flow.dims.get(other) if other is not None else None
        if other is not None and other.const_value is not None and dims and len(dims) >= 2 \
                and same(dims[-1], hidden) and id(dims[-2].root()) in seq:
            rows = other.const_value.numpy().reshape(-1, hidden.size)
            if np.all(rows == rows[:1]):
                types = types or other
            else:
                position = position or other
        value = add.outputs[0]
    return position, types


def no_token_embedding(g: ir.Graph, gathers: list[ir.Node], tables: dict) -> UnsupportedGraph:
    """The refusal when no table is looked up by input ids, at the node where the lookup should be:
    a lookup op of another kind that reads input ids (a quantized or fused embedding), else the
    largest table's Gather (its ids are computed in the graph)."""
    what = "no token embedding found (a Gather of a 2-D float table by input ids)"
    for v in g.inputs:
        if v.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            continue
        lookup = next((n for n in v.consumers() if n not in gathers and ("Gather" in n.op_type or
                                                                         "Embed" in n.op_type)), None)
        if lookup is not None:
            return UnsupportedGraph(f"{what}: input {v.name!r} is looked up by an op onnxgrow does not read "
                                    "as an embedding", lookup)
    if gathers:
        largest = max(gathers, key=lambda n: tables[id(n)].const_value.shape[0])
        return UnsupportedGraph(f"{what}: the largest table, {tables[id(largest)].name!r}, is looked up by "
                                "ids computed in the graph, not by an input", largest)
    return UnsupportedGraph(what)


# Where ids keep their values: the data operand of these ops holds the same ids, resliced or reshaped.
ID_DATA_OPERAND = frozenset({"Slice", "Expand", "Tile", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
                             "Transpose", "Cast", "CastLike", "Identity", "Gather"})
# Ops that count positions: Range(0, seq), and CumSum over a padding mask (OPT).
POSITION_COUNTERS = frozenset({"Range", "CumSum"})
TYPE_TABLE_MAX_ROWS = 16  # an input-indexed table this small, with no telling name, holds token types


def lookup_role(gather: ir.Node, table: ir.Value) -> str:
    """"positions" or "token_types": what the ids a (non-token) table is looked up by stand for.

    Dataflow first: ids counted in the graph (Range, CumSum) or sliced from a buffer of several
    values (BERT's arange position_ids) are positions; ids that are one constant for every token
    (the zeros BERT uses when no token_type_ids are given) are token types. Ids given as a graph
    input say nothing by their flow: the input's name decides, and failing that the table's size."""
    counters, constants, inputs = id_sources(gather.inputs[1])
    if counters:
        return "positions"
    if inputs:
        by_size = "token_types" if table.const_value.shape[0] <= TYPE_TABLE_MAX_ROWS else "positions"
        return role_by_name(inputs[0].name) or by_size
    if constants and all(np.unique(c).size <= 1 for c in constants):
        return "token_types"
    return "positions"


def role_by_name(input_name: str) -> str | None:
    """"positions" or "token_types" when an input's name says so (the tie-breaker), else None."""
    name = input_name.lower()
    if "position" in name:
        return "positions"
    if "token_type" in name or "segment" in name:
        return "token_types"
    return None


def id_sources(ids: ir.Value):
    """(counting nodes, constant arrays, graph inputs) the values of `ids` come from. The walk follows
    data operands only: a Slice's bounds or an Expand's shape say how many ids, not which."""
    counters, constants, inputs = [], [], []
    seen, todo = set(), [ids]
    while todo:
        v = todo.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            inputs.append(v)
            continue
        if v.const_value is not None:
            constants.append(v.const_value.numpy())
            continue
        node = v.producer()
        if node is None or node.op_type in SHAPE_OF:
            continue
        if node.op_type in POSITION_COUNTERS:
            counters.append(node)
        elif node.op_type == "ConstantOfShape":
            value = node.attributes.get("value")
            constants.append(value.value.numpy() if value is not None else np.zeros(1))
        elif node.op_type in ID_DATA_OPERAND:
            todo.append(node.inputs[0])
        else:  # arithmetic on ids (an offset, a Where between two id tensors): every operand counts
            todo.extend(node.inputs)
    return counters, constants, inputs


def find_attentions(g: ir.Graph, flow: ShapeFlow) -> tuple[list[Attention], list[tuple[str, ir.Node]]]:
    """Every Softmax over scores = MatMul(Q, K^T) of two activations, and every opset-23 Attention
    node, with its projections; and (reason, node) for each whose projections were not found."""
    attentions, missing = [], []
    for node in g:
        if is_attention_op(node):
            att, why = attention_op(flow, node)
            if att is None:
                missing.append((why, node))
                continue
        elif node.op_type == "Softmax":
            scores = producers_back(node.inputs[0], lambda n: n.op_type == "MatMul")
            if len(scores) != 1 or not all(is_activation(flow, v) for v in scores[0].inputs):
                continue
            qk = scores[0]
            pv = consumers_forward(node.outputs[0], lambda n: n.op_type == "MatMul")
            if len(pv) != 1:
                continue
            att = attention_projections(flow, node, qk, pv[0])
            if att is None:
                missing.append((f"attention at Softmax {node.name!r}: projections not found", node))
                continue
            att.kv_heads, att.group, att.head_dim = head_geometry(flow, att, qk)
        else:
            continue
        log.debug("attention at %s %r: q=%r, k=%r, v=%r, o=%r, fused_qkv=%s, kv_heads=%s, "
                  "group=%s, head_dim=%s", node.op_type, node.name, att.q_proj.name, att.k_proj.name,
                  att.v_proj.name, att.o_proj.name, att.fused_qkv, att.kv_heads.size,
                  att.group and att.group.size, att.head_dim.size)
        attentions.append(att)
    if not attentions:
        if any(is_attention_op(n) for n in g):  # name the Attention form, never the generic message
            raise UnsupportedGraph("; ".join(r for r, _ in missing), missing[0][1])
        raise UnsupportedGraph("no attention found (Softmax between two activation MatMuls)"
                               + (": " + "; ".join(r for r, _ in missing) if missing else ""),
                               missing[0][1] if missing else None)
    return attentions, missing


# ONNX Runtime's fused attentions (com.microsoft) that take projected Q, K, V and count heads in attributes
CONTRIB_ATTENTIONS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention"})


def is_packed_weight_attention(node: ir.Node) -> bool:
    """com.microsoft Attention: the Q, K and V projections are inside the op, one packed weight."""
    return node.op_type == "Attention" and node.domain == "com.microsoft"


def is_attention_op(node: ir.Node) -> bool:
    """An op that computes a whole attention in one node: the standard-domain Attention (opset 23), or
    ONNX Runtime's GroupQueryAttention / MultiHeadAttention."""
    if node.domain == "com.microsoft":
        return node.op_type in CONTRIB_ATTENTIONS
    return node.op_type == "Attention" and node.domain in ("", "ai.onnx")


def attention_op(flow: ShapeFlow, node: ir.Node) -> tuple[Attention | None, str | None]:
    """(the attention an opset-23 Attention node computes, None) or (None, why it is not one).

    Q, K and V are the node's inputs 0-2: each projection is found by walking back from one of them
    (through Reshape, Transpose, RotaryEmbedding and a grouped-query repeat); the output projection
    by walking forward. The head geometry comes from the Dims the node's dataflow rule gave Q.
    """
    # a soft problem (rotary caches that block resizing head_dim) does not stop the matching
    why = next((p.reason for p in flow.problems if p.node is node and p.reason != ROTARY_HALF), None)
    if why is not None:
        return None, f"{why} ({node.name!r})"
    is_proj = lambda n: is_projection(flow, n)  # noqa: E731
    if is_packed_weight_attention(node):  # its own weight is the q | k | v projection
        o_proj = consumers_forward(node.outputs[0], is_proj)
        if len(o_proj) != 1:
            return None, f"attention at the com.microsoft Attention node {node.name!r}: output projection not found"
        att = Attention(node, node, node, node, o_proj[0], True)
        att.kv_heads, att.group, att.head_dim = contrib_heads(flow, node)
        return att, None
    # a packed query (GroupQueryAttention) holds q | k | v: key and value are left out
    qkv = [node.inputs[i] if len(node.inputs) > i and node.inputs[i] is not None else node.inputs[0]
           for i in range(3)]
    q_proj, k_proj, v_proj = (producers_back(v, is_proj) for v in qkv)
    o_proj = consumers_forward(node.outputs[0], is_proj)
    if not (len(q_proj) == len(k_proj) == len(v_proj) == len(o_proj) == 1):
        return None, f"attention at the {op_label(node.domain, node.op_type)} node {node.name!r}: projections not found"
    att = Attention(node, q_proj[0], k_proj[0], v_proj[0], o_proj[0], q_proj[0] is k_proj[0])
    if node.domain == "com.microsoft":
        att.kv_heads, att.group, att.head_dim = contrib_heads(flow, node)
    else:
        att.kv_heads, att.group, att.head_dim = heads_from(flow, att, *attention_op_query(flow, node))
    return att, None


def contrib_heads(flow: ShapeFlow, node: ir.Node):
    """(kv_heads, group, head_dim) of a GroupQueryAttention / MultiHeadAttention node, as its dataflow
    rule split them: num_heads measures kv_heads x group, kv_num_heads (if any) kv_heads, and the
    output [b, s, num_heads * head_dim]."""
    q_heads = flow.attribute_meanings[(node, "num_heads")].dims[0]
    kv = flow.attribute_meanings.get((node, "kv_num_heads"))
    kv_heads = (kv.dims[0] if kv is not None else q_heads).root()
    q_factors = factors(q_heads)
    n = len(q_factors)
    head_dim = product_of(factors(known_shape(flow, node.outputs[0], node, "the attention output")[-1])[n:])
    if same(q_heads, kv_heads):
        return kv_heads, None, head_dim.root()
    group = [f for f in q_factors if not any(f is k for k in factors(kv_heads))]
    return kv_heads, product_of(group).root(), head_dim.root()


def attention_op_query(flow: ShapeFlow, node: ir.Node) -> tuple[list[Dim], Dim]:
    """(the axes that count query heads, head_dim) of an Attention node's Q: [b, heads, s, head_dim]
    in the 4-D form; in the 3-D form [b, s, heads * head_dim], split as the rule split it."""
    q = known_shape(flow, node.inputs[0], node, "the query")
    if len(q) == 4:
        return q[:-2], q[-1].root()
    q_heads = flow.attribute_meanings[(node, "q_num_heads")].dims[0]
    n = len(factors(q_heads))
    return [q_heads], product_of(factors(q[-1])[n:])


def attention_projections(flow: ShapeFlow, softmax: ir.Node, qk: ir.Node, pv: ir.Node) -> Attention | None:
    """The one projection behind each of Q, K and V, and the one after the output, else None."""
    is_proj = lambda n: is_projection(flow, n)  # noqa: E731
    q_proj = producers_back(qk.inputs[0], is_proj)
    k_proj = producers_back(qk.inputs[1], is_proj)
    v_proj = producers_back(pv.inputs[1], is_proj)
    o_proj = consumers_forward(pv.outputs[0], is_proj)
    if not (len(q_proj) == len(k_proj) == len(v_proj) == len(o_proj) == 1):
        return None
    fused = q_proj[0] is k_proj[0]
    return Attention(softmax, q_proj[0], k_proj[0], v_proj[0], o_proj[0], fused)


def head_layout(attentions: list[Attention]):
    """(heads, kv_heads, group, head_dim) of the model: every attention must have the first's."""
    # exports may compute each layer's sizes separately: each attention has its own Dims
    first = attentions[0]
    kv_heads, group, head_dim = first.kv_heads, first.group, first.head_dim
    for att in attentions[1:]:
        if (att.kv_heads.size, att.group and att.group.size, att.head_dim.size) != (
                kv_heads.size, group and group.size, head_dim.size):
            raise UnsupportedGraph(f"attention {att.softmax.name!r} has a different head layout than the first",
                                   att.softmax)
    heads = kv_heads if group is None else Dim(None)
    if group is not None:
        heads.kind, heads.parts = "prod", [kv_heads, group]
    return heads, kv_heads, group, head_dim


def find_ffns(flow: ShapeFlow, projections: list[ir.Node], hidden: Dim, attention_nodes: set) -> list[FFN]:
    """A down projection goes back to hidden from another width; the projections behind it (not
    attention's) are its up projection, or its up and gate projections."""
    downs = [n for n in projections
             if not same(contracted_dim(flow, n), hidden) and same(output_width(flow, n), hidden)]
    ffns = []
    for down in downs:
        ups = producers_back(data_input(flow, down), lambda n: is_projection(flow, n))
        ups = [u for u in ups if id(u) not in attention_nodes]
        if len(ups) == 1:
            ffns.append(FFN(up=ups[0], down=down))
        elif len(ups) == 2:
            gate, up = order_gate(ups)
            ffns.append(FFN(up=up, down=down, gate=gate))
    for f in ffns:
        log.debug("ffn: up=%r, gate=%r, down=%r", f.up.name, f.gate and f.gate.name, f.down.name)
    return ffns


def find_lm_head(flow: ShapeFlow, projections: list[ir.Node], ffns: list[FFN], emb: Embeddings):
    """(the LM head or None, tied): the last projection left that goes from hidden to another width;
    tied when its weight is the token table (or an equal copy of it)."""
    ffn_nodes = {id(n) for f in ffns for n in (f.up, f.down, f.gate) if n is not None}
    heads_out = [n for n in projections if id(n) not in ffn_nodes and same(contracted_dim(flow, n), emb.hidden)
                 and not same(output_width(flow, n), emb.hidden)]
    if not heads_out:
        log.debug("no LM head")
        return None, False
    lm_head = heads_out[-1]
    lm_weight = weight_of(flow, lm_head)[0]
    tied = lm_weight is emb.token or same_values(lm_weight, emb.token)
    log.debug("LM head %r (weight %r, tied=%s)", lm_head.name, lm_weight.name, tied)
    return lm_head, tied


def assign_blocks(g: ir.Graph, attentions: list[Attention], ffns: list[FFN]):
    """(blocks, missing): each attention with the one FFN whose down projection lies between it and
    the next attention in graph order; missing names the first block that has none."""
    order = {id(n): i for i, n in enumerate(g)}
    ffns = sorted(ffns, key=lambda f: order[id(f.down)])
    blocks = []
    for i, att in enumerate(attentions):
        nxt = order[id(attentions[i + 1].softmax)] if i + 1 < len(attentions) else len(order)
        mine = [f for f in ffns if order[id(att.softmax)] < order[id(f.down)] < nxt]
        blocks.append(Block(att, mine[0] if len(mine) == 1 else None))
    lacking = [b for b in blocks if b.ffn is None]
    log.debug("%d blocks, %d without an FFN", len(blocks), len(lacking))
    return blocks, [("a block without a recognisable FFN", lacking[0].attention.softmax)] if lacking else []


def attach_norms(flow: ShapeFlow, blocks: list[Block], norms: list[Norm], lm_head: ir.Node | None) -> Norm | None:
    """Give each block the norms in front of its Q and up projections; return the final norm (the
    one in front of the LM head, unless a block has it)."""
    for b in blocks:
        for proj in (b.attention.q_proj, b.ffn.up):
            norm = norm_before(data_input(flow, proj), norms)
            if norm is not None and norm not in b.norms:
                b.norms.append(norm)
    final_norm = norm_before(lm_head.inputs[0], norms) if lm_head is not None else None
    if final_norm is not None and any(final_norm is n for b in blocks for n in b.norms):
        final_norm = None
    log.debug("norms per block: %s; final norm: %s", [len(b.norms) for b in blocks],
              final_norm and final_norm.kind)
    return final_norm


def norm_before(value: ir.Value, norms: list[Norm]) -> Norm | None:
    """The norm whose output `value` is computed from (walking back to the nearest ones)."""
    by_output = {id(n.output): n for n in norms}
    found = producers_back(value, lambda n: any(id(o) in by_output for o in n.outputs))
    for n in found:
        for o in n.outputs:
            if id(o) in by_output:
                return by_output[id(o)]
    return None


def tie_copies(g: ir.Graph, flow: ShapeFlow, table: ir.Value) -> None:
    """An export may write a tied embedding twice (once transposed for the head). Equal values mean
    the same parameter, so their axes measure the same Dims."""
    t = table.const_value
    for v in g.initializers.values():
        c = v.const_value
        if v is table or c.size != t.size or not is_matrix(c.shape) or c.dtype != t.dtype:
            continue
        if same_values(v, table):
            rows, cols = flow.dims[table]
            a, b = flow.dims[v][-2:]
            if tuple(c.shape[-2:]) == tuple(t.shape) and np.array_equal(matrix_view(c.numpy()), t.numpy()):
                unify(a, rows), unify(b, cols)
            else:  # stored transposed
                unify(a, cols), unify(b, rows)


def head_geometry(flow: ShapeFlow, att: Attention, qk: ir.Node):
    """(kv_heads, group, head_dim) Dims of one attention. Q is [..., heads, seq, head_dim]; the
    factors of its head axis that also measure the K projection's output are the kv heads, and
    what is left (created by the repeat of K/V for grouped-query attention) is the group size."""
    qshape = known_shape(flow, qk.inputs[0], qk, "the query")
    return heads_from(flow, att, qshape[:-2], qshape[-1].root())


def heads_from(flow: ShapeFlow, att: Attention, head_axes: list[Dim], head_dim: Dim):
    """(kv_heads, group, head_dim) from the axes of the query that count heads (see head_geometry)."""
    k_atoms = {id(a) for d in out_dims(flow, att.k_proj) for a in atoms(d)}
    # a single kv head (multi-query attention) is a real factor of size 1; a static batch is no head
    token_axes = {id(d) for d in flow.token_axes()}
    head_factors = [f for d in head_axes for f in factors(d)
                    if f.size is not None and (f.size != 1 or id(f.root()) in k_atoms)
                    and id(f.root()) not in token_axes]
    if not head_factors:
        return Dim(1), None, head_dim  # a single head: its axis has size 1 everywhere
    kv_part = [f for f in head_factors if id(f.root()) in k_atoms]
    group_part = [f for f in head_factors if id(f.root()) not in k_atoms]
    if not kv_part and len(group_part) == 1:
        kv_part = [Dim(1)]  # multi-query attention: one kv head, an axis of size 1 in the graph
    if len(kv_part) != 1 or len(group_part) > 1:
        raise UnsupportedGraph("cannot tell query heads from key/value heads", att.softmax)
    return kv_part[0].root(), (group_part[0].root() if group_part else None), head_dim


def attr_axis(node):
    a = node.attributes.get("axis")
    return 0 if a is None else a.value


def out_dims(flow, node) -> list[Dim]:
    """The weight's axes that the projection's output keeps (one, or heads and head_dim of an Einsum)."""
    w, i = weight_of(flow, node)
    if node.op_type == "Einsum":
        return [flow.dims[w][a] for a in einsum_axes(node, i)[1]]
    return [flow.dims[w][out_axis(flow, node)]]


def out_axis(flow, node) -> int:
    """Axis of the weight that is the projection's output (the one of its last two not contracted;
    an Einsum's last kept axis)."""
    w, i = weight_of(flow, node)
    if node.op_type == "Einsum":
        return einsum_axes(node, i)[1][-1]
    last = len(w.const_value.shape) - 1
    contracted = flow.contracted.get(w.name, set())
    return (2 * last - 1) - next(iter(contracted)) if contracted else last


def contracted_dim(flow, node) -> Dim:
    w, i = weight_of(flow, node)
    if node.op_type == "Einsum":  # [heads, head_dim, hidden] sums over heads x head_dim
        return product_of([flow.dims[w][a] for a in einsum_axes(node, i)[0]]).root()
    last = len(w.const_value.shape) - 1
    return flow.dims[w][(2 * last - 1) - out_axis(flow, node)]


def order_gate(ups):
    """In a gated FFN the gate is the projection whose output goes through the nonlinearity."""
    def through_nonlinearity(n):
        return any(c.op_type in ("Sigmoid", "Gelu", "Erf", "Tanh", "Relu") + FUSED_ACTIVATIONS
                   for c in n.outputs[0].consumers())
    a, b = ups
    return (a, b) if through_nonlinearity(a) else (b, a)


def same_values(a: ir.Value, b: ir.Value) -> bool:
    ta, tb = a.const_value, b.const_value
    if ta.size != tb.size:
        return False
    x, y = matrix_view(ta.numpy()), matrix_view(tb.numpy())
    if x.ndim != 2 or y.ndim != 2:
        return x.shape == y.shape and np.array_equal(x, y)

    def equal(p, q):  # a few rows first: different tables differ there, and a full pass is costly
        return np.array_equal(p[:4], q[:4]) and np.array_equal(p, q)
    return (x.shape == y.shape and equal(x, y)) or (x.shape == y.T.shape and equal(x.T, y))


def matrix_view(x: np.ndarray) -> np.ndarray:
    """A weight with leading unit axes as the matrix it is."""
    return x.reshape(x.shape[-2:]) if x.ndim > 2 and is_matrix(x.shape) else x


def has_rotation(att: Attention) -> bool:
    """Rotary embeddings rotate half of each head: a Neg on the way from the Q projection to the scores,
    or an opset-23 RotaryEmbedding node, or a fused attention that rotates (GroupQueryAttention's do_rotary)."""
    do_rotary = att.softmax.attributes.get("do_rotary")
    if is_attention_op(att.softmax) and do_rotary is not None and do_rotary.value:
        return True
    seen, todo = set(), deque(att.q_proj.outputs)
    while todo:
        v = todo.popleft()
        for n in v.consumers():
            if id(n) in seen or n.op_type == "MatMul" or is_attention_op(n):
                continue
            seen.add(id(n))
            if n.op_type in ("Neg", "RotaryEmbedding"):
                return True
            todo.extend(n.outputs)
    return False


# ONNX Runtime's fused activations (com.microsoft), by the name inspect reports
FUSED_ACTIVATIONS = ("FastGelu", "BiasGelu", "QuickGelu")
FUSED_ACTIVATION_NAMES = {"FastGelu": "gelu_new", "BiasGelu": "gelu", "QuickGelu": "quick_gelu"}


def activation_of(ffn: FFN) -> str:
    ops = set()
    seen, todo = set(), deque(ffn.up.outputs if ffn.gate is None else ffn.gate.outputs)
    while todo:
        v = todo.popleft()
        for n in v.consumers():
            if id(n) in seen or n is ffn.down:
                continue
            seen.add(id(n))
            ops.add(n.op_type)
            if n.op_type == "Gelu" and n.attributes.get("approximate") and n.attributes["approximate"].value == "tanh":
                ops.add("Tanh")
            todo.extend(n.outputs)
    fused = [FUSED_ACTIVATION_NAMES[op] for op in FUSED_ACTIVATIONS if op in ops]
    if fused:
        return fused[0]
    if "Tanh" in ops:
        return "gelu_new"
    if "Erf" in ops or "Gelu" in ops:
        return "gelu"
    if "Sigmoid" in ops:
        return "silu"
    if "Relu" in ops:
        return "relu"
    return "unknown"


def find_norms(g: ir.Graph, flow: ShapeFlow, hidden: Dim) -> list[Norm]:
    norms = []
    for node in g:
        if is_skip_norm(node):
            norms.append(skip_norm(flow, node))
        elif is_embed_norm(node):
            norms.append(embed_norm(flow, node))
        elif node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
            kind = "layernorm" if node.op_type == "LayerNormalization" else "rmsnorm"
            scale, bias = (param_name(flow, node, i) for i in (1, 2))
            out, scale2, bias2 = affine_after(flow, node.outputs[0], hidden)
            norms.append(Norm(kind, node.inputs[0], out, scale or scale2, bias or bias2))
        elif node.op_type in MEAN_POOLS and (moments := moments_norm(flow, node, hidden)) is not None:
            norms.append(moments)
        elif node.op_type == "ReduceMean":
            x = node.inputs[0]
            src = x.producer()
            consumers = [c for c in node.outputs[0].consumers()]
            if any(c.op_type == "Sub" and c.inputs[0] is x for c in consumers):
                # LayerNorm: x - mean(x), divided by the std of that
                centred = next(c for c in consumers if c.op_type == "Sub").outputs[0]
                normed = [c for c in centred.consumers() if c.op_type in ("Div", "Mul") and
                          len(flow.dims.get(c.outputs[0]) or []) == len(flow.dims.get(x) or [])]
                if normed:
                    out, scale, bias = affine_after(flow, normed[-1].outputs[0], hidden)
                    norms.append(Norm("layernorm", x, out, scale, bias))
            elif src is not None and (src.op_type == "Pow" or (src.op_type == "Mul" and src.inputs[0] is src.inputs[1])):
                base = src.inputs[0]
                p = base.producer()
                if p is not None and p.op_type == "Sub" and p.inputs[1].producer() is not None \
                        and p.inputs[1].producer().op_type in MEAN_POOLS:
                    continue  # the variance inside a decomposed LayerNorm
                normed = [c for c in base.consumers() if c.op_type in ("Mul", "Div") and c is not src]
                if normed:
                    out, scale, bias = affine_after(flow, normed[0].outputs[0], hidden)
                    norms.append(Norm("rmsnorm", base, out, scale, bias))
    return norms


# A mean over the hidden axis: ReduceMean, or (tf2onnx) GlobalAveragePool of [batch, seq, hidden]
MEAN_POOLS = frozenset({"ReduceMean", "GlobalAveragePool"})


def moments_norm(flow: ShapeFlow, mean: ir.Node, hidden: Dim) -> Norm | None:
    """A LayerNorm as TensorFlow's batch-norm arithmetic writes it (tf.nn.moments, then
    x * f + (beta - mean * f) with f = gamma / sqrt(var + eps)), at the node of its mean: the mean
    also feeds the variance, a mean of (x - mean)^2. Found by dataflow: the output is the Add after
    x * f where f comes from that variance; gamma multiplies into f, beta is added on the other side."""
    x = mean.inputs[0]
    shape = flow.dims.get(x) or []
    if not shape or not same(shape[-1], hidden):
        return None
    variance = next((v for c in mean.outputs[0].consumers() if c.op_type == "Sub" and c.inputs[0] is x
                     for sq in c.outputs[0].consumers() if is_square(sq, c.outputs[0])
                     for v in sq.outputs[0].consumers() if v.op_type in MEAN_POOLS), None)
    if variance is None:
        return None
    from_variance = lambda v: v is not None and bool(producers_back(v, lambda n: n is variance))  # noqa: E731
    scaled = next((c for c in x.consumers() if c.op_type == "Mul" and c is not mean
                   and from_variance(c.inputs[1] if c.inputs[0] is x else c.inputs[0])), None)
    if scaled is None or len(scaled.outputs[0].consumers()) != 1:
        return None
    out_add = scaled.outputs[0].consumers()[0]
    if out_add.op_type != "Add":
        return None
    factor = scaled.inputs[1] if scaled.inputs[0] is x else scaled.inputs[0]
    shift = out_add.inputs[1] if out_add.inputs[0] is scaled.outputs[0] else out_add.inputs[0]
    scale = hidden_operand(flow, factor, hidden, ("Mul",), (mean, variance))
    bias = hidden_operand(flow, shift, hidden, ("Add", "Sub"), (mean, variance))
    out, scale2, bias2 = affine_after(flow, out_add.outputs[0], hidden)
    return Norm("layernorm", x, out, scale or scale2, bias or bias2)


def is_square(node: ir.Node, v: ir.Value) -> bool:
    return (node.op_type == "Mul" and node.inputs[0] is v and node.inputs[1] is v) or (
        node.op_type == "Pow" and node.inputs[0] is v)


def hidden_operand(flow: ShapeFlow, v: ir.Value, hidden: Dim, ops: tuple, moments: tuple) -> str | None:
    """The initializer measuring hidden that an `ops` node between the norm's `moments` and `v`
    takes (gamma, beta); the walk stops at the moments, so it never reaches an earlier layer."""
    def weight(n):
        for i in n.inputs:
            init = flow.source_initializer(i)[0] if i is not None else None
            if init is not None and flow.dims.get(i) and same(flow.dims[i][-1], hidden):
                return init
        return None
    found = producers_back(v, lambda n: n in moments or (n.op_type in ops and weight(n) is not None))
    return next((weight(n).name for n in found if n not in moments), None)


def skip_norm(flow: ShapeFlow, node: ir.Node) -> Norm:
    """A Skip*Normalization: a norm of input + skip (+ bias), that sum being its output 3 (when written)."""
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    stream = node.outputs[3] if len(node.outputs) > 3 else node.inputs[0]
    return Norm("rmsnorm" if simplified else "layernorm", stream, node.outputs[0], param_name(flow, node, 2),
                None if simplified else param_name(flow, node, 3), node=node)


def param_name(flow: ShapeFlow, node: ir.Node, index: int) -> str | None:
    """The initializer behind a node's input (through Cast/Transpose), if there is one."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    init, _ = flow.source_initializer(node.inputs[index])
    return None if init is None else init.name


def affine_after(flow, value, hidden):
    """Follow the elementwise scale (and shift) by hidden-sized weights that end a norm."""
    scale = bias = None
    while True:
        consumers = value.consumers()
        if len(consumers) != 1:
            break
        n = consumers[0]
        if n.op_type == "Cast":
            value = n.outputs[0]
            continue
        if n.op_type not in ("Mul", "Add"):
            break
        other = n.inputs[1] if n.inputs[0] is value else n.inputs[0]
        init, _ = flow.source_initializer(other)
        shape = flow.dims.get(other) or []
        if init is None or not shape or not same(shape[-1], hidden) or \
                (n.op_type == "Mul" and scale is not None) or (n.op_type == "Add" and bias is not None):
            break
        if n.op_type == "Mul":
            scale = init.name
        else:
            bias = init.name
        value = n.outputs[0]
    return value, scale, bias


def residual_input(norm: Norm) -> ir.Value:
    return skip_view(norm.input)


def position_of_norms(flow, blocks) -> str:
    """Pre-norm: the residual Add takes the norm's input. Post-norm: it takes the norm's output."""
    b = blocks[0]
    if not b.norms:
        return "none"
    norm = b.norms[0]
    if norm.input is norm.output:
        # an EmbedLayerNormalization without its sum output: the first block reads the embedding norm's
        # output with no norm of its own in between, which is post-norm
        return "post"
    residual_adds = consumers_forward(b.attention.o_proj.outputs[0], lambda n: is_skip_norm(n) or (
        n.op_type == "Add" and all(is_activation(flow, v) for v in n.inputs)))
    if not residual_adds:
        return "none"
    # parallel blocks add attention, FFN and the stream in some order: look through the chain of Adds
    chain, todo = [], list(residual_adds[:1])
    while todo and len(chain) < 4:
        add = todo.pop()
        chain.append(add)
        todo.extend(c for c in add.outputs[0].consumers() if c.op_type == "Add"
                    and all(is_activation(flow, v) for v in c.inputs))
    stream_in = {id(skip_view(norm.input))}
    if norm.node is not None:  # a Skip norm: the stream it reads is the sum of its first two inputs
        stream_in |= {id(skip_view(v)) for v in norm.node.inputs[:2]}
    if any(id(skip_view(v)) in stream_in for add in chain for v in add.inputs[:2]):
        return "pre"
    return "post"


def parameter_names(spec: TransformerSpec) -> list[str]:
    """Float weights that carry a model dimension (buffers like rotary frequencies are not
    parameters); a tied weight stored twice counts once."""
    model_dims = {id(d.root()) for d in [spec.hidden, spec.vocab, *spec.ffn] + [
        d for b in spec.blocks for d in (b.attention.kv_heads, b.attention.group) if d is not None]}
    tied_copy = None
    if spec.tied_embeddings and spec.lm_head is not None:
        head = weight_of(spec.flow, spec.lm_head)[0]
        tied_copy = None if head is spec.token_embedding else head.name
    names = []
    for name, v in spec.model.graph.initializers.items():
        t = v.const_value
        if not t.dtype.is_floating_point() or len(t.shape) == 0 or name == tied_copy:
            continue
        if any(id(a.root()) in model_dims for d in spec.flow.dims[v] for a in atoms(d)):
            names.append(name)
    return names


def count_parameters(spec: TransformerSpec) -> int:
    g = spec.model.graph
    return int(sum(g.initializers[n].const_value.size for n in parameter_names(spec)))


def assign_roles(spec: TransformerSpec) -> None:
    spec.hidden.root().role = "hidden"
    for b in spec.blocks:
        att = b.attention
        att.kv_heads.root().role = "kv_heads" if att.group is not None else "heads"
        if att.group is not None:
            att.group.root().role = "group"
    for d in spec.ffn:
        d.root().role = "ffn"


def distinct(dims) -> list[Dim]:
    """The different Dims among `dims` (layers often share one through a shared constant)."""
    return list({id(d.root()): d.root() for d in dims if d is not None}.values())
