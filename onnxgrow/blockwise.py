"""Run a model one block at a time, so that checking a rewrite needs the memory of one block.

Whole-model validation holds two ONNX Runtime sessions, the source's and the target's: 10 GB for
a 537M model widened x2, and more than any one machine for a 7B model widened x2. Here a model is
cut at its residual stream, as the matcher finds it, into segments run one after another:

    embeddings -> block 0 -> block 1 -> ... -> block L-1 -> head
             r_0        r_1        r_2                r_L

Each segment is a small model of its own: its nodes, the initializers they read (left in the
model's external data file, which ONNX Runtime reads for this segment only) and, as inputs, the
values it reads from earlier segments or the graph's inputs (the stream, and shared values such as
masks and rotary tables). All input cases go through one segment before the next is opened, and a
segment's session is freed before the next one is built. The graph's outputs come out exactly as
a whole-model run gives them, and the stream r_b at every boundary is kept for the comparison
(verify.py compares the target's r_b with the source's, block by block).

Nodes are placed as the blocks own them (blocks.block_graphs); the embeddings' segment holds what
block 0's input depends on; any other node goes in the earliest segment that reads it, or the head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import progress
from .blocks import ancestors, block_graphs
from .errors import InternalError, RuntimeRefused, first_line
from .runtime import open_from_bytes, run_model
from .resize import release
from .structure import load_structure

log = logging.getLogger(__name__)

INLINE_BYTES = 64 * 2**10  # ONNX Runtime's shape inference cannot read shape constants from a file


@dataclass
class Segment:
    label: str  # "embeddings", "block 3", "head"
    nodes: list[ir.Node] = field(default_factory=list)
    inputs: list[ir.Value] = field(default_factory=list)  # graph inputs and values of earlier segments
    outputs: list[ir.Value] = field(default_factory=list)  # graph outputs and values later segments read
    initializers: list[ir.Value] = field(default_factory=list)
    stream: ir.Value | None = None  # the residual stream where it ends; None for the head


@dataclass
class Runs:
    """What running every case gave: the graph's outputs and the stream at each boundary."""
    outputs: list[dict[str, np.ndarray]]
    streams: list[list[np.ndarray]]  # per case, per boundary
    ran: list[int]  # the indices of the cases that ran (ORT may refuse a batch above 1)
    provider: str


# --- cutting ----------------------------------------------------------------------------------------


def cut(model: ir.Model) -> list[Segment]:
    """The model's segments, in order (it is normalized IN PLACE first, computing the same)."""
    spec = load_structure(model)
    blocks = block_graphs(spec)  # splits ONNX Runtime's Skip norms at block boundaries: same function
    head = len(blocks) + 1
    segments = [Segment("embeddings", stream=blocks[0].r_in)]
    segments += [Segment(f"block {b.index}", stream=b.r_out) for b in blocks]
    segments.append(Segment("head"))

    where = {id(n): b.index + 1 for b in blocks for n in b.nodes}
    embedding = ancestors(blocks[0].r_in)
    order = list(model.graph)
    readers = readers_of(order)
    for node in reversed(order):  # a node's readers are placed before the node is
        if id(node) in where:
            continue
        if id(node) in embedding:
            where[id(node)] = 0
            continue
        later = [where[id(r)] for o in node.outputs for r in readers.get(id(o), ())]
        if not later or any(o.is_graph_output() for o in node.outputs):
            later.append(head)
        where[id(node)] = min(later)
    for node in order:
        segments[where[id(node)]].nodes.append(node)
    wire(segments, where, readers)
    return segments


def wire(segments: list[Segment], where: dict[int, int], readers: dict[int, list[ir.Node]]) -> None:
    """Each segment's inputs, initializers and outputs."""
    for k, segment in enumerate(segments):
        seen = set()
        for node in segment.nodes:
            for v in reads(node):
                if id(v) in seen:
                    continue
                seen.add(id(v))
                producer = v.producer()
                if v.is_initializer():
                    segment.initializers.append(v)
                elif producer is None or where[id(producer)] < k:
                    segment.inputs.append(v)
                elif where[id(producer)] > k:
                    raise InternalError(f"cannot cut the model at its blocks: {node.op_type} node {node.name!r} "
                                        f"in {segment.label} reads {v.name!r} from {segments[where[id(producer)]].label}")
            for o in node.outputs:
                if o.is_graph_output() or any(where[id(r)] > k for r in readers.get(id(o), ())):
                    segment.outputs.append(o)


def readers_of(nodes: list[ir.Node]) -> dict[int, list[ir.Node]]:
    """value id -> the top-level nodes that read it (a node reads what its subgraphs read from outside)."""
    readers: dict[int, list[ir.Node]] = {}
    for node in nodes:
        for v in reads(node):
            readers.setdefault(id(v), []).append(node)
    return readers


def reads(node: ir.Node) -> list[ir.Value]:
    """The values `node` reads: its inputs and, for If/Loop/Scan, what its subgraphs take from outside."""
    found = [v for v in node.inputs if v is not None]
    for graph in subgraphs(node):
        inside = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
        for inner in graph.all_nodes():
            inside.update(id(o) for o in inner.outputs)
        for inner in graph.all_nodes():
            found += [v for v in inner.inputs if v is not None and id(v) not in inside]
    return list({id(v): v for v in found}.values())


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.value)
    return graphs


# --- building a segment's model ----------------------------------------------------------------------


def segment_model(model: ir.Model, segment: Segment, example: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model of `segment` alone; `example` holds one case's values of its inputs (their types)."""
    graph = onnx.GraphProto(name=segment.label.replace(" ", "_"))
    graph.node.extend(ir.serde.serialize_node(n) for n in segment.nodes)
    graph.initializer.extend(initializer_proto(v) for v in segment.initializers)
    for v in segment.inputs:
        dtype = ir.DataType.from_numpy(example[v.name].dtype).value
        graph.input.append(onnx.helper.make_tensor_value_info(v.name, dtype, None))
    graph.output.extend(onnx.helper.make_value_info(v.name, onnx.TypeProto()) for v in segment.outputs)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                         for d, v in model.opset_imports.items()])
    proto.ir_version = model.ir_version
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return proto


def initializer_proto(value: ir.Value) -> onnx.TensorProto:
    """A weight stays where it is on disk; a small tensor is read in (shape constants must be inline)."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= INLINE_BYTES:
        small = ir.tensor(tensor.numpy().copy())
        release(tensor)
        tensor = small
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = value.name
    return proto


def data_folder(model: ir.Model) -> Path | None:
    for v in model.graph.initializers.values():
        if isinstance(v.const_value, ir.ExternalTensor):
            return Path(v.const_value.base_dir)
    return None


# --- running -------------------------------------------------------------------------------------------


def run(model: ir.Model, segments: list[Segment], cases: list[dict[str, np.ndarray]], provider: str,
        path: Path, may_drop: bool = True) -> Runs:
    """Every case through every segment, one segment's session at a time. `may_drop`: a case ONNX
    Runtime refuses at a batch above 1 is left out (see can_drop) rather than failing the run."""
    values = [dict(case) for case in cases]
    streams: list[list[np.ndarray]] = [[] for _ in cases]
    ran = list(range(len(cases)))
    last_reader = last_readers(segments)
    folder = data_folder(model)
    used, label = "?", Path(path).name
    with progress.task(f"verifying {label} block by block", total=len(segments), unit="segments") as advance:
        for k, segment in enumerate(segments):
            if segment.nodes:  # an encoder's head can be empty: its output is the last block's
                try:
                    used = run_segment(model, segment, values, ran, folder, provider, f"{label} ({segment.label})",
                                       may_drop)
                except RuntimeRefused as e:  # said of the model, so a caller knows which of two refused
                    raise RuntimeRefused(str(e), path) from e
            for i in ran:
                if segment.stream is not None:
                    streams[i].append(values[i][segment.stream.name])
            forget(values, last_reader, k, model)
            advance()
    outputs = [{o.name: values[i][o.name] for o in model.graph.outputs} for i in ran]
    return Runs(outputs, [streams[i] for i in ran], ran, used)


def run_segment(model, segment, values, ran, folder, provider, label, may_drop) -> str:
    """Every case that still runs through one segment (its session freed on return); the provider."""
    proto = segment_model(model, segment, values[ran[0]])
    session = open_from_bytes(proto.SerializeToString(), folder, provider, label)
    del proto
    for i in list(ran):
        try:
            values[i].update(run_model(session, {v.name: values[i][v.name] for v in segment.inputs}))
        except RuntimeRefused as e:
            if not (may_drop and can_drop(values[i], len(ran), e)):
                raise
            ran.remove(i)
    return session.onnxgrow_provider


def can_drop(values: dict[str, np.ndarray], cases_left: int, error: RuntimeRefused) -> bool:
    """ONNX Runtime 1.32's RotaryEmbedding kernel runs batch 1 only: a case at a larger batch is left
    out while others remain to compare (as whole-model validation does)."""
    batch = max((a.shape[0] for a in values.values() if a.ndim), default=1)
    if batch == 1 or cases_left == 1:
        return False
    log.warning("ONNX Runtime cannot run a segment at batch %d (%s); compared at the other shapes",
                batch, first_line(error)[:160])
    return True


def last_readers(segments: list[Segment]) -> dict[str, int]:
    last = {}
    for k, segment in enumerate(segments):
        for v in segment.inputs:
            last[v.name] = k
    return last


def forget(values: list[dict], last_reader: dict[str, int], k: int, model: ir.Model) -> None:
    """Drop the values no later segment reads (the graph's outputs are kept)."""
    keep = {o.name for o in model.graph.outputs}
    for case in values:
        for name in [n for n, last in last_reader.items() if last == k and n not in keep]:
            case.pop(name, None)
