"""Load and save models safely.

Models are held as onnx-ir models: onnx-ir keeps external data memory-mapped until a tensor is read,
keeps bf16/fp8 initializers intact, and gives use-def links that the analysis walks. Writing is atomic
(temporary file in the target folder, then rename) and never touches the input files.

Loading refuses, in one line that names the problem, anything the rest of the tool could trip over:
a file that is not an ONNX model, a graph with a cycle, a name nobody produces or two producers of one
name, a tensor whose bytes disagree with its dims, an op or opset that ONNX does not define, types and
ranks that do not fit the ops, and external data that leaves the model's folder or is missing or
short. The checks read the protobuf's structure, not the weights: no weight is copied and no external
data is read.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from . import progress
from .errors import InternalError, OnnxgrowError, first_line
from .singlefile import merge_external

log = logging.getLogger(__name__)

TWO_GB = 2**31
# ONNX Runtime releases accept IR versions up to a limit; exporters may write newer ones.
MAX_IR_VERSION = 10
# Initializers up to this many elements (shape constants, not weights) are kept whole in the copy of
# the graph that onnx.checker and shape inference see.
SMALL_TENSOR = 1024


def load(path: str | os.PathLike) -> ir.Model:
    """The model at `path`, checked (see above); an OnnxgrowError naming the problem if it is unusable."""
    path = Path(path)
    if not path.exists():
        raise OnnxgrowError(f"no such file: {path}")
    if not path.is_file():
        raise OnnxgrowError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise OnnxgrowError(f"{path} is empty (0 bytes)")
    with progress.task(f"loading {path.name}"):
        return _load(path)


def _load(path: Path) -> ir.Model:
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # protobuf gives many kinds of parse errors, none of them useful to a user
        raise OnnxgrowError(f"{path} is not a readable ONNX model (the protobuf does not parse: "
                            "truncated or corrupt?)") from None
    sorted_ = check_proto(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise OnnxgrowError(f"{path} is not a readable ONNX model: {first_line(e) or type(e).__name__}") from None
    del proto  # the ir tensors keep what they need of it
    ir.external_data.set_base_dir(model.graph, path.parent)
    check_external_data(model, path.parent)
    if not sorted_:
        model.graph.sort()  # valid up to node order, which the analysis's one walk relies on
    return model


def as_ir(model, *, copy: bool = True) -> ir.Model:
    """A path, an onnx.ModelProto or an onnx-ir Model, as an onnx-ir Model.

    A path is loaded (and checked, see above); a proto is wrapped. An onnx-ir Model is copied unless
    `copy=False` (callers that rewrite in place and own the model); a copy keeps reading its external
    data from the original's folder.
    """
    if isinstance(model, (str, os.PathLike)):
        return load(model)
    if isinstance(model, onnx.ModelProto):
        # onnx-ir wraps the proto's tensors without copying them, and a copied block shares its
        # source's tensor objects: serializing the result would rename tensors in the caller's proto
        return ir.from_proto(as_proto(model)) if copy else ir.from_proto(model)
    if isinstance(model, ir.Model):
        if not copy:
            return model
        duplicate = ir.from_proto(ir.to_proto(model))
        # external tensors are read relative to the model's folder, which the proto does not carry
        base = next((v.const_value.base_dir for v in model.graph.initializers.values()
                     if isinstance(v.const_value, ir.ExternalTensor)), None)
        if base is not None:
            ir.external_data.set_base_dir(duplicate.graph, base)
        return duplicate
    raise OnnxgrowError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def as_proto(model) -> onnx.ModelProto:
    """A private ModelProto copy of a path, proto or onnx-ir model, with its weights in memory."""
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise OnnxgrowError(f"no such file: {model}")
        try:
            return onnx.load(str(model))
        except Exception as e:  # protobuf's parse errors say nothing useful to a user
            raise OnnxgrowError(f"{model} is not a readable ONNX model") from e
    if isinstance(model, onnx.ModelProto):
        duplicate = onnx.ModelProto()
        duplicate.CopyFrom(model)
        return duplicate
    if isinstance(model, ir.Model):
        # weights still in an external data file would be written as references to a file the
        # proto's new home does not have: read them in (the tensors' values do not change)
        return ir.to_proto(ir.external_data.load_to_model(model))
    raise OnnxgrowError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def same_kind(result: ir.Model, given):
    """`result` in the form the caller gave its model in: a ModelProto for a path or a proto."""
    return result if isinstance(given, ir.Model) else as_proto(result)


# --- the protobuf, before anything uses it ----------------------------------------------------------------


def check_proto(proto: onnx.ModelProto, path: Path) -> bool:
    """Refuse a ModelProto the rest of the tool could not handle; True if its nodes are in order.

    Reads names, dims and data sizes only, so it is cheap on any model, and reads no external data.
    """
    if not proto.HasField("graph"):
        raise OnnxgrowError(f"{path} is not an ONNX model: it has no graph (another kind of protobuf?)")
    if len(proto.graph.node) == 0:
        raise OnnxgrowError(f"{path} has an empty graph")
    if not 1 <= proto.ir_version <= onnx.IR_VERSION:
        raise OnnxgrowError(f"{path}: IR version {proto.ir_version} is not one this ONNX release knows "
                            f"(1 to {onnx.IR_VERSION})")
    if len(proto.graph.output) == 0:
        raise OnnxgrowError(f"{path}: the graph has no outputs")
    check_text(proto, path)
    check_opsets(proto, path)
    for where, tensor in _proto_tensors(proto.graph):
        check_tensor(tensor, where, path)
    order = check_graph(proto.graph, set(), path)
    check_with_onnx_checker(weightless_copy(proto, order), path)
    return order == list(range(len(order)))


def check_opsets(proto: onnx.ModelProto, path: Path) -> None:
    """Every opset of a domain ONNX defines must be one this ONNX release knows (ONNX Runtime refuses
    a newer one). Other domains (ONNX Runtime's contrib ops, custom ops) are left to whoever runs the
    model: inspect and an unverified rewrite do not need to run them."""
    known = onnx.defs.C.schema_version_map()  # domain -> (first, last) opset version
    imports = set()
    for opset in proto.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        imports.add(domain)
        name = f"domain {opset.domain!r}" if opset.domain else "the ONNX domain"
        if domain in known and not 1 <= opset.version <= known[domain][1]:
            raise OnnxgrowError(f"{path}: opset {opset.version} of {name} is not one this ONNX release "
                                f"knows (1 to {known[domain][1]})")
    if "" not in imports:
        raise OnnxgrowError(f"{path} imports no ONNX opset (its opset_import has no default domain)")
    for node in _all_nodes(proto.graph):
        if ("" if node.domain == "ai.onnx" else node.domain) not in imports:
            raise OnnxgrowError(f"{path}: node {_node_name(node)} uses domain {node.domain!r}, which the "
                                "model does not import")


def check_tensor(t: onnx.TensorProto, where: str, path: Path) -> None:
    """A tensor's data must have exactly the size its dims and type say (ONNX Runtime refuses it
    otherwise, and numpy would fail on it mid-rewrite)."""
    texts = [t.name, t.doc_string] + [x for e in t.external_data for x in (e.key, e.value)]
    if any(not isinstance(x, str) for x in texts):
        raise OnnxgrowError(f"{path}: {where} has a name or external data entry that is not UTF-8 text")
    try:
        dtype = ir.DataType(t.data_type)
        bits = dtype.bitwidth if dtype != ir.DataType.STRING else None
    except (ValueError, TypeError):
        raise OnnxgrowError(f"{path}: {where} has unknown data type {t.data_type}") from None
    if any(d < 0 for d in t.dims):
        raise OnnxgrowError(f"{path}: {where} has a negative dim {list(t.dims)}")
    count = math.prod(t.dims)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if not info.get("location") or "\0" in info["location"]:
            raise OnnxgrowError(f"{path}: {where} is stored as external data without a location")
        for key in ("offset", "length"):
            if key in info and not (info[key].isascii() and info[key].isdigit()):
                raise OnnxgrowError(f"{path}: {where} has external data {key} {info[key]!r}, not a byte count")
        return  # the file itself is checked against the dims in check_external_data
    if bits is None:
        values = len(t.string_data)
        if values != count:
            raise OnnxgrowError(f"{path}: {where} has {values} strings but its dims {list(t.dims)} need {count}")
        return
    if t.HasField("raw_data"):
        have, need = len(t.raw_data), math.ceil(count * bits / 8)
        if have != need:
            raise OnnxgrowError(f"{path}: {where} has {have} bytes of data but its dims {list(t.dims)} "
                                f"and type {dtype.name} need {need}")
        return
    # typed fields: one value per element (two for complex), sub-byte types packed into bytes
    have = sum(len(getattr(t, f)) for f in ("float_data", "int32_data", "int64_data", "double_data",
                                            "uint64_data"))
    need = count * 2 if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else \
        math.ceil(count * bits / 8) if bits < 8 and bits != 6 else count
    if have != need:
        raise OnnxgrowError(f"{path}: {where} has {have} values but its dims {list(t.dims)} need {need}")


def check_graph(graph: onnx.GraphProto, outer: set[str], path: Path) -> list[int]:
    """Names are defined once, every read name is defined, and there is no cycle.

    Returns a topological order of the graph's nodes (indices). `outer`: names visible from the
    enclosing graphs, which a subgraph (If/Loop/Scan body) may read.
    """
    defined: dict[str, str] = {}  # name -> what defines it
    for v in graph.input:
        if v.name in defined:
            raise OnnxgrowError(f"{path}: graph input {v.name!r} is listed more than once")
        defined[v.name] = "a graph input"
    initializers = set()
    for name in [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]:
        if name in initializers:
            raise OnnxgrowError(f"{path}: initializer {name!r} is defined more than once")
        initializers.add(name)
        defined.setdefault(name, "an initializer")  # an input may share its initializer's name (a default)
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue  # an optional output left out
            if name in producer:
                raise OnnxgrowError(f"{path}: value {name!r} is written by two nodes, "
                                    f"{_node_name(graph.node[producer[name]])} and {_node_name(node)}")
            if name in defined:
                raise OnnxgrowError(f"{path}: node {_node_name(node)} writes {name!r}, which is also "
                                    f"{defined[name]} (a value written more than once)")
            producer[name] = i
    visible = outer | set(defined) | set(producer)

    needs: list[set[int]] = []  # node index -> indices of the nodes it reads from
    for i, node in enumerate(graph.node):
        reads = [n for n in node.input if n]
        for sub in _subgraphs(node):
            reads += sorted(_free_names(sub))  # a subgraph reads the enclosing scope implicitly
            check_graph(sub, visible, path)
        for name in reads:
            if name not in visible:
                raise OnnxgrowError(f"{path}: node {_node_name(node)} reads {name!r}, which no node, graph "
                                    "input or initializer produces")
        needs.append({producer[n] for n in reads if n in producer})
    for v in graph.output:
        if v.name not in visible:
            raise OnnxgrowError(f"{path}: graph output {v.name!r} is not produced by any node, input or "
                                "initializer")
    return _topological_order(graph, needs, path)


def _topological_order(graph: onnx.GraphProto, needs: list[set[int]], path: Path) -> list[int]:
    """Kahn's algorithm, stable (keeps the file's order where it is already valid)."""
    import heapq
    users: list[list[int]] = [[] for _ in needs]
    waiting = [len(n) for n in needs]
    for i, deps in enumerate(needs):
        for d in deps:
            users[d].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(needs):
        # walk back along unfinished inputs until a node repeats: that node lies on a cycle
        stuck = {i for i, w in enumerate(waiting) if w > 0}
        i, seen = min(stuck), set()
        while i not in seen:
            seen.add(i)
            i = min(d for d in needs[i] if d in stuck)
        raise OnnxgrowError(f"{path}: the graph has a cycle through node {_node_name(graph.node[i])}")
    return order


def weightless_copy(proto: onnx.ModelProto, order: list[int]) -> onnx.ModelProto:
    """The model without its weights, nodes in topological order: what onnx.checker needs to see.

    Each initializer but the smallest becomes a graph input of its type and shape (its bytes were
    checked by check_tensor), so the copy costs what the graph's nodes cost, whatever the size of
    the weights.
    """
    skeleton = onnx.ModelProto()
    for field, value in proto.ListFields():
        if field.name == "graph":
            continue
        if _repeated(field):
            getattr(skeleton, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(skeleton, field.name).CopyFrom(value)
        else:
            setattr(skeleton, field.name, value)
    graph, g = proto.graph, skeleton.graph
    for field, value in graph.ListFields():
        if field.name in ("node", "initializer"):
            continue
        if _repeated(field):
            getattr(g, field.name).extend(value)
        else:
            setattr(g, field.name, value)
    g.node.extend(graph.node[i] for i in order)
    inputs = {v.name for v in graph.input}
    for t in graph.initializer:
        if math.prod(t.dims) <= SMALL_TENSOR and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)  # shape constants: shape inference reads their values
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return skeleton


def check_text(message, path: Path) -> None:
    """Every string field must hold UTF-8 text. Protobuf hands invalid UTF-8 back as bytes, which
    onnx-ir accepts on reading but fails on when writing the model out (found by fuzzing).

    Initializers are skipped (check_tensor looks at their few text fields without touching the data).
    """
    for field, value in message.ListFields():
        if field.name == "initializer":
            continue
        values = value if _repeated(field) else [value]
        if field.type == field.TYPE_STRING:
            if any(not isinstance(v, str) for v in values):
                raise OnnxgrowError(f"{path}: a {field.full_name.removeprefix('onnx.')} field is not UTF-8 "
                                    "text (corrupt file?)")
        elif field.type == field.TYPE_MESSAGE:
            for v in values:
                check_text(v, path)


def check_with_onnx_checker(skeleton: onnx.ModelProto, path: Path) -> None:
    """onnx.checker and strict shape inference on the weightless copy.

    The checker covers op schemas, attributes and input counts; shape inference covers types and
    ranks that do not fit an op (a MatMul of a scalar, a Gather index beyond the rank), which
    ONNX Runtime would refuse too, and which the dataflow analysis should not have to meet.
    """
    if skeleton.ByteSize() > TWO_GB - 2**20:
        return  # a graph this large in its nodes alone cannot be serialized for the checker
    # The checker wants a type and shape on every graph input and output, ONNX Runtime does not (a
    # shape left out is unknown). Outputs without one are left out of the check (check_graph made
    # sure they are produced); with such an input, the nodes are checked one by one instead.
    g = skeleton.graph
    set_aside_runtime_ops(skeleton)
    outputs = [v for v in g.output if _typed(v)]
    del g.output[:]
    g.output.extend(outputs)
    try:
        if all(_typed(v) for v in g.input):
            onnx.checker.check_model(skeleton)
        else:
            ctx = onnx.checker.C.CheckerContext()
            ctx.ir_version = skeleton.ir_version
            ctx.opset_imports = {o.domain: o.version for o in skeleton.opset_import}
            for node in g.node:
                onnx.checker.check_node(node, ctx)
    except Exception as e:
        raise OnnxgrowError(f"could not load {path}: not valid ONNX: {first_line(e) or type(e).__name__}") from None
    # Shapes recorded in value_info and on the outputs are hints that exporters get wrong and ONNX
    # Runtime merges leniently: only what the ops themselves imply is held against the model.
    g.ClearField("value_info")
    for v in g.output:
        v.type.tensor_type.ClearField("shape")
    try:
        onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        why = (first_line(e) or type(e).__name__).replace("[ShapeInferenceError] Inference error(s): ", "")
        raise OnnxgrowError(f"could not load {path}: shapes or types do not fit: {why}") from None


# ONNX Runtime registers these in the default domain although ONNX defines no such op. Exporters and
# ORT's own tools write them there (onnxruntime-genai's SimplifiedLayerNormalization); the model runs.
# Read from onnxruntime's schemas when it is installed; this list is what onnxruntime 1.32 registers.
RUNTIME_DEFAULT_DOMAIN_OPS = frozenset({
    "Affine", "Crop", "DynamicSlice", "GRUUnit", "GivenTensorFill", "ImageScaler", "MemcpyFromHost",
    "MemcpyToHost", "ParametricSoftplus", "Scale", "ScaledTanh", "SimplifiedLayerNormalization"})
RUNTIME_CHECK_DOMAIN = "onnxgrow.runtime_op"  # where the skeleton parks them: a domain the checker skips


def runtime_default_domain_ops() -> frozenset[str]:
    """Ops ONNX Runtime runs in the default domain that ONNX does not define."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
        known = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
        return frozenset(s.name for s in ort_state.get_all_operator_schema() if s.domain == "") - known
    except (ImportError, AttributeError):
        return RUNTIME_DEFAULT_DOMAIN_OPS


def set_aside_runtime_ops(skeleton: onnx.ModelProto) -> None:
    """Move the default-domain nodes that only ONNX Runtime defines out of the checker's way (in the
    weightless copy the checker reads): a model ONNX Runtime runs is not invalid ONNX. Contrib ops
    (com.microsoft) need nothing: the checker leaves domains it has no schemas for alone."""
    runtime_ops = runtime_default_domain_ops()
    moved = False
    for node in _all_nodes(skeleton.graph):
        if node.domain in ("", "ai.onnx") and node.op_type in runtime_ops:
            node.domain, moved = RUNTIME_CHECK_DOMAIN, True
    if moved:
        skeleton.opset_import.append(onnx.helper.make_opsetid(RUNTIME_CHECK_DOMAIN, 1))


def _proto_tensors(graph: onnx.GraphProto):
    """(description, TensorProto) for every initializer and tensor attribute, subgraphs included."""
    for t in graph.initializer:
        yield f"initializer {t.name!r}", t
    for node in graph.node:
        for a in node.attribute:
            label = f"attribute {a.name!r} of node {_node_name(node)}"
            if a.HasField("t"):
                yield label, a.t
            for t in a.tensors:
                yield label, t
            for sub in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                yield from _proto_tensors(sub)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the scopes around it."""
    inside = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    inside |= {t.values.name for t in graph.sparse_initializer}
    inside |= {o for n in graph.node for o in n.output}
    read = {v.name for v in graph.output}
    for node in graph.node:
        read |= {n for n in node.input if n}
        for sub in _subgraphs(node):
            read |= _free_names(sub)
    return read - inside


def _typed(v: onnx.ValueInfoProto) -> bool:
    """A graph input/output with the type (and, for a tensor, the shape) the checker insists on."""
    if not v.HasField("type"):
        return False
    return not v.type.HasField("tensor_type") or v.type.tensor_type.HasField("shape")


def _repeated(field) -> bool:
    # protobuf 6 has `is_repeated`; `label`, which older releases have, was removed in 7
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def _node_name(node) -> str:
    return repr(node.name) if node.name else f"({node.op_type})"


# --- external data ------------------------------------------------------------------------------------------


def check_external_data(model: ir.Model, base_dir: Path) -> None:
    """Refuse external-data references that leave the model's folder or point at missing bytes.

    Only names and file sizes are looked at: the data is never read, so checking a model of any size is
    cheap, and a reference outside the folder is refused before anything could open it.
    """
    base = Path(base_dir).resolve()
    for where, tensor in _ir_tensors(model.graph):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = Path(tensor.location)
        file = base / location  # as open() will see it: "missing/../w.bin" does not exist
        if location.is_absolute() or base not in Path(os.path.normpath(file)).parents:
            raise OnnxgrowError(f"{where} has external data outside the model's folder: {tensor.location}")
        if base not in Path(os.path.realpath(file)).parents:
            raise OnnxgrowError(f"{where} has external data that is a symlink to a file outside the model's "
                                f"folder: {tensor.location}")
        if not file.is_file():
            raise OnnxgrowError(f"{where} external data file is missing: {tensor.location}")
        need = tensor.nbytes
        if tensor.length is not None and tensor.length != need:
            raise OnnxgrowError(f"{where} declares {tensor.length} bytes of external data but its shape and "
                                f"type need {need}")
        end, size = (tensor.offset or 0) + need, file.stat().st_size
        if size < end:
            raise OnnxgrowError(f"{where} external data file is too short: {tensor.location} has {size} bytes, "
                                f"the tensor ends at byte {end}")


def _ir_tensors(graph: ir.Graph):
    """(description, tensor) for every initializer and tensor attribute, subgraphs included."""
    for value in graph.initializers.values():
        yield f"initializer {value.name!r}", value.const_value
    for node in graph:
        for attr in node.attributes.values():
            label = f"attribute {attr.name!r} of node {node.name!r}"
            if attr.type == ir.AttributeType.TENSOR:
                yield label, attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                for t in attr.value:
                    yield label, t
            elif attr.type == ir.AttributeType.GRAPH:
                yield from _ir_tensors(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    yield from _ir_tensors(g)


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None,
         input_paths: tuple[Path, ...] = (), force: bool = False, verify=None) -> Path:
    """Write `model` to `path` atomically, with external data above 2 GB (or when asked).

    The written file is checked with onnx.checker (and by `verify(temp_path)`, when given, which
    raises to refuse) before it is moved into place, so a failed write or a failed check leaves
    nothing under the output name.
    """
    path = Path(path)
    guard_output_path(path, input_paths, force)
    if external_data is None:
        external_data = weight_bytes(model) > TWO_GB - 64 * 2**20
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path, weight_bytes(model), external_data)
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxgrow-", dir=path.parent))
    try:
        # Weights are streamed to an external data file first (one tensor in memory at a time); the
        # checker and `verify` see that staged model, and a single-file output is then assembled
        # from it without ever holding the whole serialized model (onnxgrow/singlefile.py).
        staged = tmp_dir / path.name
        with progress.task(f"writing {path.name}", total=weight_bytes(model), unit="bytes") as advance:
            ir.save(model, staged, external_data=data_name, callback=lambda tensor, _: advance(tensor.nbytes))
        release_external(model)  # what was read to write it stays mapped otherwise, through `verify` too
        give_back_freed_memory()
        check_written(staged)
        if verify is not None:
            verify(staged)
        if external_data:
            os.replace(tmp_dir / data_name, path.parent / data_name)
            os.replace(staged, path)
        else:
            merged = tmp_dir / (path.name + ".single")
            merge_external(staged, merged)
            os.replace(merged, path)
    except OSError as e:  # the disk or the folder, not the model: full, read-only, gone
        raise OnnxgrowError(f"could not write {path}: {first_line(e)}") from e
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink()
        tmp_dir.rmdir()
    return path


def give_back_freed_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them for reuse): the verification that
    follows a write should not start from the rewrite's high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def release_external(model: ir.Model) -> None:
    from .resize import release
    for v in model.graph.initializers.values():
        release(v.const_value)


SPACE_MARGIN = 64 * 2**20  # the graph itself, and room for the filesystem's own bookkeeping


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def check_free_space(path: Path, weights: int, external_data: bool) -> None:
    """Refuse before writing anything when the output's filesystem cannot hold it: the weights are
    staged next to the output, and a single-file output is assembled from them (twice the weights
    at the peak); external data is moved into place instead."""
    need = weights * (1 if external_data else 2) + SPACE_MARGIN
    free = free_bytes(path.parent)
    log.info("writing %s: %s of weights%s", path, human_bytes(weights), " (external data)" if external_data else "")
    if free < need:
        how = "" if external_data else ", twice the weights while the single file is assembled"
        raise OnnxgrowError(f"not enough space to write {path}: it needs {human_bytes(need)}{how}; "
                            f"{human_bytes(free)} free on its filesystem; nothing written")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def check_written(staged: Path) -> None:
    """A model onnxgrow wrote must pass onnx.checker; if it does not, that is onnxgrow's fault."""
    try:
        skeleton = onnx.load(str(staged), load_external_data=False)
        runtime_ops = runtime_default_domain_ops()
        if any(n.domain in ("", "ai.onnx") and n.op_type in runtime_ops for n in _all_nodes(skeleton.graph)):
            # ops ONNX Runtime defines in the default domain (a fused model's SimplifiedLayerNormalization)
            set_aside_runtime_ops(skeleton)
            beside = staged.with_name(staged.name + ".check")  # beside it: external data paths still resolve
            try:
                onnx.save(skeleton, str(beside))
                onnx.checker.check_model(str(beside))
            finally:
                beside.unlink(missing_ok=True)
        else:
            onnx.checker.check_model(str(staged))
    except onnx.checker.ValidationError as e:
        raise InternalError(f"the model written fails onnx.checker ({first_line(e)}); nothing written") from e


def guard_output_path(path: Path, input_paths: tuple[Path, ...], force: bool) -> None:
    if path.is_symlink():
        raise OnnxgrowError(f"refusing to write through a symlink: {path}")
    for src in input_paths:
        src = Path(src)
        if path.resolve() == src.resolve() or path.resolve() == Path(str(src) + ".data").resolve():
            raise OnnxgrowError(f"refusing to overwrite the input model: {path}")
    if path.exists() and not force:
        raise OnnxgrowError(f"output exists: {path} (use --force to replace it)")
