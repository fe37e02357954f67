"""Transformer blocks as subgraphs of the residual stream, and how to copy one.

A block reads the residual stream at `r_in` and writes it at `r_out`; its nodes are those that
depend on `r_in` and that `r_out` depends on, plus the weight-side nodes (a float16 weight's Cast
to float, a Transpose of a weight, a Constant) that only those read. Values the block reads from
outside (masks, rotary tables, shapes of the inputs) stay shared by its copies; initializers only
the block uses are copied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import onnx_ir as ir

from .errors import UnsupportedGraph
from .metadata import IO_MAP_KEY, IO_NAMES_KEY
from .normalize import unique_name
from .fusednorms import MARK, fuse_split_norms, is_skip_norm, mark_plain_norms, optional, split_skip_norms
from .structure import TransformerSpec, consumers_forward, find_structure, skip_view, weight_of
from .views import PASS_THROUGH, RESHAPES, look_through, reshaped_forward


@dataclass
class BlockGraph:
    index: int
    r_in: ir.Value
    r_out: ir.Value
    nodes: list[ir.Node]  # in graph order
    zero_outputs: list[str]  # initializers that, zeroed, make the block add nothing to the stream
    cache_inputs: list[ir.Value] = field(default_factory=list)  # its own graph inputs (past K/V)
    cache_outputs: list[ir.Value] = field(default_factory=list)  # its own graph outputs (present K/V)


def descendants(value: ir.Value, through_shapes: bool = True) -> set[int]:
    seen, todo = set(), [value]
    while todo:
        v = todo.pop()
        for n in v.consumers():
            if id(n) not in seen:
                seen.add(id(n))
                if through_shapes or n.op_type not in ("Shape", "Size"):
                    todo.extend(n.outputs)
    return seen


def ancestors(value: ir.Value) -> set[int]:
    seen, todo = set(), [value]
    while todo:
        n = todo.pop().producer()
        if n is not None and id(n) not in seen:
            seen.add(id(n))
            todo.extend(i for i in n.inputs if i is not None)
    return seen


def own_nodes(candidates: set[int], data: set[int], graph: ir.Graph, r_out: ir.Value) -> set[int]:
    """The block's nodes: every node on a data path from r_in to r_out, plus the shape computations
    only it uses. A shape computation that other blocks use too (a mask built from the stream's
    shape) stays shared by the copies."""
    inside = set(candidates)
    changed = True
    while changed:
        changed = False
        for node in graph:
            if id(node) not in inside or id(node) in data:
                continue
            for out in node.outputs:
                if out is r_out:
                    continue
                if out.is_graph_output() or any(id(c) not in inside for c in out.consumers()):
                    inside.discard(id(node))
                    changed = True
                    break
    return inside


def weight_side(graph: ir.Graph) -> list[ir.Node]:
    """The nodes computed from initializers and constants alone (a float16 weight's Cast to float, a
    Transpose of a weight, a Constant), in graph order: they read no activation, so the walks from
    r_in miss them."""
    side: list[ir.Node] = []
    ids: set[int] = set()
    for node in graph:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            continue
        if all(v is None or (v.is_initializer() and not v.is_graph_input())
               or (v.producer() is not None and id(v.producer()) in ids) for v in node.inputs):
            side.append(node)
            ids.add(id(node))
    return side


def with_weight_side(inside: set[int], side: list[ir.Node]) -> set[int]:
    """`inside` plus the weight-side nodes that only it reads (through chains: Cast -> Transpose ->
    MatMul), so that a block's copies get their own weights and a removed block takes them along."""
    inside = set(inside)
    changed = True
    while changed:
        changed = False
        for node in reversed(side):  # consumers first: a chain joins in one sweep
            if id(node) in inside:
                continue
            readers = [c for out in node.outputs for c in out.consumers()]
            if readers and all(id(c) in inside for c in readers) \
                    and not any(out.is_graph_output() for out in node.outputs):
                inside.add(id(node))
                changed = True
    return inside


def residual_values(spec: TransformerSpec) -> list[ir.Value]:
    """r_0 ... r_L: the residual stream before each block and after the last one."""
    blocks = spec.blocks
    if spec.norm_position == "pre":
        values = [skip_view(b.norms[0].input) for b in blocks]
        if spec.final_norm is None:
            raise UnsupportedGraph("pre-norm model without a final norm: cannot find where the last block ends")
        values.append(skip_view(spec.final_norm.input))
    elif spec.norm_position == "post":
        # post-norm: each block reads the previous norm's output; the last ends at the norm after its FFN
        norm_outputs = {id(nrm.output) for nrm in all_norms(spec)}
        values = [stream_behind(proj_input(spec, b.attention.q_proj), norm_outputs) for b in blocks]
        after = consumers_forward(blocks[-1].ffn.down.outputs[0],
                                  lambda n: any(id(o) in norm_outputs for o in n.outputs))
        if not after:
            raise UnsupportedGraph("cannot find the output norm of the last post-norm block")
        values.append(next(o for o in after[0].outputs if id(o) in norm_outputs))
    else:
        raise UnsupportedGraph("blocks without norms are not supported")
    return values


def stream_behind(value: ir.Value, norm_outputs: set[int]) -> ir.Value:
    """The norm output a post-norm block's projection reads, through a Reshape in between (a
    static-shape export flattens the stream to [tokens, hidden] for Gemm; the residual Add still reads
    the norm's own output, so that is where the block starts); else `value` behind casts."""
    behind = look_through(value, PASS_THROUGH | RESHAPES)
    return behind if id(behind) in norm_outputs else skip_view(value)


def all_norms(spec):
    from .structure import find_norms
    return find_norms(spec.model.graph, spec.flow, spec.hidden)


def proj_input(spec, node):
    return node.inputs[0] if weight_of(spec.flow, node)[1] == 1 else node.inputs[1]


def block_graphs(spec: TransformerSpec) -> list[BlockGraph]:
    """The blocks' subgraphs, with the graph inputs and outputs that belong to one block alone
    (the past and present K/V of a KV-cache export).

    A pre-norm model whose blocks meet inside an ONNX Runtime Skip norm is split there first (see
    fusednorms.py; the model changes IN PLACE, computing the same): insert_after and remove_blocks
    fuse the split norms again, and a caller that only reads the blocks calls fuse_split_norms."""
    spec = split_boundary_norms(spec)
    stream = residual_values(spec)
    order = {id(n): i for i, n in enumerate(spec.model.graph)}
    side = weight_side(spec.model.graph)
    result = []
    for i, b in enumerate(spec.blocks):
        r_in, r_out = stream[i], stream[i + 1]
        upstream = ancestors(r_out)
        data = descendants(r_in, through_shapes=False) & upstream
        inside = own_nodes(descendants(r_in) & upstream, data, spec.model.graph, r_out)
        inside = with_weight_side(inside, side)
        nodes = sorted((n for n in spec.model.graph if id(n) in inside), key=lambda n: order[id(n)])
        # the block's own inputs: read by its nodes, and elsewhere only for their shape (the past
        # length that masks and positions are built from)
        cache_in = [v for v in spec.model.graph.inputs if v.const_value is None
                    and any(id(u.node) in inside for u in v.uses())
                    and all(id(u.node) in inside or u.node.op_type in ("Shape", "Size") for u in v.uses())]
        cache_out = [o for n in nodes for o in n.outputs if o.is_graph_output() and o is not r_out]
        result.append(BlockGraph(i, r_in, r_out, nodes, output_projections(spec, b), cache_in, cache_out))
    return result


def split_boundary_norms(spec: TransformerSpec) -> TransformerSpec:
    """The spec of the model with its boundary Skip norms split (itself when there are none)."""
    if spec.norm_position != "pre":
        return spec  # post-norm: the stream between blocks is a norm's output, a value of its own
    boundary = [b.norms[0] for b in spec.blocks if b.norms] + ([spec.final_norm] if spec.final_norm else [])
    fused = [n.node for n in boundary if n.node is not None]
    if not fused:
        return spec
    # a plain norm at a boundary (block 0's, on the embeddings) is fused in a copy that reads a split sum
    live = [n for n in fused if n.graph is not None]  # an earlier call with this spec may have split them
    if live:
        mark_plain_norms([n.output.producer() for n in boundary if n.node is None], fused[0].op_type)
        split_skip_norms(spec.model.graph, live)
    return find_structure(spec.model)


def output_projections(spec: TransformerSpec, block) -> list[str]:
    """Weights (and biases) of the projections that write into the residual stream."""
    names = []
    for proj in (block.attention.o_proj, block.ffn.down if block.ffn else None):
        if proj is None:
            continue
        names.append(weight_of(spec.flow, proj)[0].name)
        if proj.op_type == "Gemm" and len(proj.inputs) > 2 and proj.inputs[2] is not None:
            bias, _ = spec.flow.source_initializer(proj.inputs[2])  # through its Cast, if any
            names.append(proj.inputs[2].name if bias is None else bias.name)  # none: refused as shared
        names += fused_output_biases(spec, proj.outputs[0])
        out = reshaped_forward(proj.outputs[0])
        for c in out.consumers():
            if c.op_type == "Add":
                other = c.inputs[1] if c.inputs[0] is out else c.inputs[0]
                init, _ = spec.flow.source_initializer(other)
                if init is not None:
                    names.append(init.name)
    return names


def fused_output_biases(spec: TransformerSpec, out: ir.Value) -> list[str]:
    """The bias a Skip norm adds to a projection's output: its own bias input, or, split (fusednorms.py),
    the Add of it after the sum."""
    names = []
    for c in out.consumers():
        bias = None
        if is_skip_norm(c) and out in c.inputs[:2]:
            bias = optional(c, 3 if c.op_type == "SkipSimplifiedLayerNormalization" else 4)
        elif c.metadata_props.get(MARK) == "sum":
            bias_add = next((b for b in c.outputs[0].consumers() if b.metadata_props.get(MARK) == "bias"), None)
            bias = bias_add.inputs[1] if bias_add is not None else None
        init = spec.flow.source_initializer(bias)[0] if bias is not None else None
        if init is not None:
            names.append(init.name)
        elif bias is not None and bias.is_initializer():
            names.append(bias.name)
    return names


def shared_data(tensor):
    """A tensor with its own name that reads `tensor`'s data when needed: a copied weight costs no
    memory until it is written or changed, and naming the copy never renames the source (onnx-ir
    names a tensor after its value when it serializes it)."""
    return ir.LazyTensor(lambda: tensor, tensor.dtype, tensor.shape)


def clone_block(graph: ir.Graph, block: BlockGraph, new_input: ir.Value, tag: str):
    """Append a copy of `block` reading the stream from `new_input`.

    Returns its output value, the renamed initializers {original: copy}, and its cache values as
    (copy, original) pairs: a copy of a KV-cache block gets past inputs and present outputs of its own.
    """
    inside = {id(n) for n in block.nodes}
    mapping: dict[int, ir.Value] = {id(block.r_in): new_input}
    renamed_inits: dict[str, str] = {}
    caches = []
    for v in block.cache_inputs:
        copy = ir.Value(name=unique_name(graph, f"{v.name}.{tag}"), shape=v.shape, type=v.type)
        graph.inputs.append(copy)
        mapping[id(v)] = copy
        caches.append((copy, v))
    for node in block.nodes:
        inputs = []
        for v in node.inputs:
            if v is None:
                inputs.append(None)
            elif id(v) in mapping:
                inputs.append(mapping[id(v)])
            elif v.is_initializer() and all(id(u.node) in inside for u in v.uses()):
                copy = ir.Value(name=unique_name(graph, f"{v.name}.{tag}"), shape=v.shape, type=v.type,
                                const_value=shared_data(v.const_value))
                graph.register_initializer(copy)
                renamed_inits[v.name] = copy.name
                mapping[id(v)] = copy
                inputs.append(copy)
            else:
                inputs.append(v)  # shared: masks, rotary tables, input shapes, other blocks' constants
        attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        new = ir.Node(node.domain, node.op_type, inputs, attrs, num_outputs=len(node.outputs),
                      name=unique_name(graph, f"{node.name or node.op_type}.{tag}"), version=node.version)
        new.metadata_props.update(node.metadata_props)  # a split Skip norm's mark (fusednorms.py)
        for old_out, new_out in zip(node.outputs, new.outputs):
            new_out.name = unique_name(graph, f"{old_out.name}.{tag}")
            new_out.type = old_out.type
            mapping[id(old_out)] = new_out
        graph.append(new)
    for v in block.cache_outputs:
        copy = mapping[id(v)]
        copy.shape = v.shape
        graph.outputs.append(copy)
        caches.append((copy, v))
    return mapping[id(block.r_out)], renamed_inits, caches


def insert_after(graph: ir.Graph, blocks: list[BlockGraph], plan: dict[int, list[tuple[int, bool]]]):
    """plan[i] = [(source block, zeroed?), ...]: copies to place after original block i, in order.

    Returns the names of the initializers to zero (the output projections of identity copies).
    """
    to_zero = []
    sequence = [[(b, b.cache_inputs + b.cache_outputs, None)] for b in blocks]  # per original block
    for i in sorted(plan, reverse=True):
        after = blocks[i]
        inside = {id(n) for n in after.nodes}
        readers = [(u.node, u.idx) for u in after.r_out.uses() if id(u.node) not in inside]
        was_output = after.r_out.is_graph_output()
        stream = after.r_out
        for k, (j, zeroed) in enumerate(plan[i]):
            stream, renamed, caches = clone_block(graph, blocks[j], stream, tag=f"b{i}c{k}")
            sequence[i].append((blocks[j], [c for c, _ in caches], dict((id(c), o) for c, o in caches)))
            if zeroed:
                for name in blocks[j].zero_outputs:
                    if name not in renamed:
                        raise UnsupportedGraph(f"output projection {name!r} is shared outside its block")
                    to_zero.append(renamed[name])
        for node, idx in readers:
            node.replace_input_with(idx, stream)
        if was_output:
            k = list(graph.outputs).index(after.r_out)
            name = after.r_out.name
            after.r_out.name = unique_name(graph, name + ".inner")
            stream.name = name
            stream.type, stream.shape = after.r_out.type, after.r_out.shape
            graph.outputs[k] = stream
    renumber_caches(graph, [entry for per_block in sequence for entry in per_block])
    graph.sort()
    fuse_split_norms(graph)
    return to_zero


CACHE_NAME = re.compile(r"^(.*?)(\d+)(\D*)$")  # past_key_values.3.key -> ("past_key_values.", "3", ".key")


def renumber_caches(graph: ir.Graph, order) -> None:
    """Give cache inputs/outputs the layer index of their block's new position, keeping the
    exporter's naming convention, and record which source name each one stands for (for validate).

    `order`: per block in its new position, (original BlockGraph, its cache values, {id(copy):
    original value} or None for an original block).
    """
    model_meta = graph.meta.setdefault("onnxgrow_io_names", {"inputs": {}, "outputs": {}})
    plans = []
    for position, (block, values, origin) in enumerate(order):
        for v in values:
            source = v if origin is None else origin[id(v)]
            match = CACHE_NAME.match(source.name)
            if match is None:
                continue
            plans.append((v, f"{match.group(1)}{position}{match.group(3)}", source.name, origin is None))
    for v, _, _, _ in plans:
        v.name = f"{v.name}.renumbering"  # two steps, so no two values ever share a name
    for v, new_name, source_name, original in plans:
        v.name = new_name
        side = "inputs" if v.is_graph_input() else "outputs"
        model_meta[side][new_name] = source_name if (original or side == "inputs") else None


def record_io_names(model: ir.Model) -> None:
    """Store the cache renaming in the model's metadata, composed with earlier rewrites: io_names
    maps each renamed input/output to the source model's name (null: a new output to skip), and
    the io_map of an earlier widen follows the renaming."""
    names = model.graph.meta.get("onnxgrow_io_names")
    if not names or not (names["inputs"] or names["outputs"] or names.get("dropped")):
        return
    previous = json.loads(model.metadata_props.get(IO_NAMES_KEY, '{"inputs": {}, "outputs": {}}'))
    io_map = json.loads(model.metadata_props.get(IO_MAP_KEY, '{"inputs": {}, "outputs": {}}'))
    composed = {"inputs": {}, "outputs": {}}
    for side in ("inputs", "outputs"):
        axes_before = dict(io_map.get(side, {}))
        for new, before in names[side].items():
            composed[side][new] = None if before is None else previous[side].get(before, before)
            if before is not None and before in axes_before:
                io_map.setdefault(side, {})[new] = axes_before[before]
        current = {v.name for v in (model.graph.inputs if side == "inputs" else model.graph.outputs)}
        for name in list(io_map.get(side, {})):
            if name not in current:
                del io_map[side][name]
        for name, source in previous[side].items():
            if name in current and name not in composed[side]:
                composed[side][name] = source
    # outputs of removed blocks, by their source names: validate does not expect them
    composed["dropped"] = previous.get("dropped", []) + [
        previous["outputs"].get(name, name) for name in names.get("dropped", [])]
    model.metadata_props[IO_NAMES_KEY] = json.dumps(composed)
    model.metadata_props[IO_MAP_KEY] = json.dumps(io_map)
    model.graph.meta["onnxgrow_io_names"] = {"inputs": {}, "outputs": {}}


def remove_blocks(spec: TransformerSpec, blocks: list[BlockGraph], indices: list[int]) -> None:
    """Delete blocks: the stream skips them (r_out's readers read r_in), then their nodes go.

    Exporters often read the size of a value inside the first block to build masks for all layers
    (Shape of a norm's output, say). Such a read moves to r_in when the two have the same Dims.
    A removed block's own cache inputs and outputs go with it; the others are renumbered.
    """
    graph = spec.model.graph
    removed = set(indices)
    for i in sorted(removed, reverse=True):
        block = blocks[i]
        inside = {id(n) for n in block.nodes}
        if block.r_out.is_graph_output():
            raise UnsupportedGraph(f"block {i} writes the graph output {block.r_out.name!r}; "
                                   "keep the last block (use --keep-layers)")
        for use in list(block.r_out.uses()):
            if id(use.node) not in inside:
                use.node.replace_input_with(use.idx, block.r_in)
        stream_dims = spec.flow.dims.get(block.r_in)
        for node in block.nodes:
            for out in node.outputs:
                dims = spec.flow.dims.get(out)
                for use in list(out.uses()):
                    if id(use.node) in inside or use.node.op_type not in ("Shape", "Size"):
                        continue
                    if dims and stream_dims and len(dims) == len(stream_dims) and all(
                            a.root() is b.root() for a, b in zip(dims, stream_dims)):
                        use.node.replace_input_with(use.idx, block.r_in)
        for v in block.cache_outputs:
            graph.outputs.remove(v)
            dropped = graph.meta.setdefault("onnxgrow_io_names", {"inputs": {}, "outputs": {}})
            dropped.setdefault("dropped", []).append(v.name)
        for node in reversed(block.nodes):
            if not any(out.uses() or out.is_graph_output() for out in node.outputs):
                graph.remove(node, safe=True)
        survivor = next((b for b in blocks if b.index not in removed
                         and len(b.cache_inputs) == len(block.cache_inputs)), None)
        for k, v in enumerate(block.cache_inputs):
            # the past length read from this cache's shape can be read from a kept block's cache
            for use in list(v.uses()):
                if survivor is not None and use.node.op_type in ("Shape", "Size"):
                    use.node.replace_input_with(use.idx, survivor.cache_inputs[k])
            if not v.uses():
                graph.inputs.remove(v)
    kept = [b for b in blocks if b.index not in removed]
    renumber_caches(graph, [(b, b.cache_inputs + b.cache_outputs, None) for b in kept])
    fuse_split_norms(graph)
    used = {id(v) for n in graph for v in n.inputs if v is not None} | {id(v) for v in graph.outputs}
    for name, value in list(graph.initializers.items()):
        if id(value) not in used:
            del graph.initializers[name]
