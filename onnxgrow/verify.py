"""Check that a rewritten model computes the same function as its source.

Both models run in ONNX Runtime on the same inputs and every source output is compared. Inputs are
generated from the source graph itself: which input holds token ids, which a mask, which positions
is read from how the graph uses them, and symbolic sizes (batch, sequence, past length) from the
dim_param names the exporter wrote. A user can instead give an .npz of arrays, or a text and a
tokenizer.

A rewrite may change widths. It then records in the target's metadata (key "onnxgrow.io_map") how
each changed input/output axis maps to the source: a list, one entry per new index, of the source
index it copies (-1: a new slot with no source).

    {"inputs":  {NAME: {"AXIS": [new-to-old index, ...]}},
     "outputs": {NAME: {"AXIS": [new-to-old index, ...]}}}

Mapped inputs are built from the source's inputs (new slots zero). Mapped outputs are compared at the
first copy of every source index; every further copy must match too ("copies"), because the exact
growth methods duplicate activations and a wrong duplicate is a real failure even when the first copy
is right.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from . import modelio
from . import tolerance as tol
from .errors import NOT_PRESERVED, OnnxgrowError, RuntimeRefused, first_line
from .metadata import IO_MAP_KEY, IO_NAMES_KEY, stream_map
# Sessions live in onnxgrow/runtime.py (providers, CUDA preload, no silent fallback); these names stay
# importable from validate for the callers that know them from there.
from .runtime import NO_KERNEL, one_line, open_session, resolve_providers, run_model  # noqa: F401
from .views import CASTS, IDS_FORWARD, look_through

log = logging.getLogger(__name__)

DEFAULT_SHAPES = ((1, 5), (2, 9), (3, 16))

# Tolerances: onnxgrow/tolerance.py (one rule per dtype, relative to each output's scale). A float
# output of a model that stores its weights in a half type (float16 weights behind Casts in a float32
# graph) gets the weights' rule: a rewrite that scales them (HyperCloning's 1/3) rounds to that type.

FALLBACK_VOCAB = 100  # token ids for a model whose embedding table could not be found
TYPE_TABLE_MAX_ROWS = 16  # a small table indexed by an int input holds token types, not positions


# --- running models ------------------------------------------------------------------------------


# --- generating inputs -----------------------------------------------------------------------------


@dataclass
class InputSpec:
    name: str
    kind: str  # tokens | token_types | positions | mask | float | seqlens_k | total_length
    dtype: np.dtype
    dims: list  # per axis: a fixed int, a dim_param string, or None when unknown
    rows: int | None = None  # rows of the embedding table this input indexes, when it indexes one


@dataclass
class InputPlan:
    """How to make each source input for any (batch, seq, past)."""

    specs: list[InputSpec]
    batch_dim: str | None  # the dim_param names shared with the token ids' axes
    seq_dim: str | None
    past_dims: set[str]  # dim_params of cache inputs that are neither batch nor sequence

    def make(self, batch: int, seq: int, past_length: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
        past = past_length if self.past_dims else 0
        rng = np.random.default_rng([seed, batch, seq, past])
        return {s.name: self._make_one(s, batch, seq, past, rng) for s in self.specs}

    def _make_one(self, spec: InputSpec, batch: int, seq: int, past: int, rng) -> np.ndarray:
        shape = tuple(self._size(spec, axis, dim, batch, seq, past) for axis, dim in enumerate(spec.dims))
        if spec.kind == "float":
            return rng.standard_normal(shape).astype(spec.dtype)
        if spec.kind == "tokens":
            return rng.integers(0, spec.rows or FALLBACK_VOCAB, shape).astype(spec.dtype)
        if spec.kind == "token_types":
            high = 2 if (spec.rows or 0) >= 2 else 1
            return rng.integers(0, high, shape).astype(spec.dtype)
        if spec.kind == "positions":
            return _positions(spec, shape, past + seq)
        if spec.kind == "seqlens_k":
            return np.full(shape, past + seq - 1, dtype=spec.dtype)
        if spec.kind == "total_length":
            return np.full(shape, past + seq, dtype=spec.dtype)
        mask = np.ones(shape, dtype=spec.dtype)
        # one padded slot in the first row, so the masking path is exercised (but never a whole row)
        if len(shape) >= 2 and shape[0] > 1 and shape[-1] > 1:
            mask[0, ..., -1] = 0
        return mask

    def _size(self, spec: InputSpec, axis: int, dim, batch: int, seq: int, past: int) -> int:
        if isinstance(dim, int):
            return dim
        if dim is not None:
            if dim == self.batch_dim:
                return batch
            if dim == self.seq_dim:
                return seq
            # Optimum names a mask that spans cache plus new tokens "past_sequence_length +
            # sequence_length" (older releases "past_sequence_length + 1", others
            # "total_sequence_length"); all of them mean past + seq for the inputs we feed.
            names = set(re.findall(r"[A-Za-z_]\w*", dim))
            if _is_total(dim) or (names & self.past_dims and dim not in self.past_dims):
                return past + seq
            if dim in self.past_dims:
                return past
        # unnamed or unknown: fall back on where the axis sits
        if axis == 0:
            return batch
        if spec.kind == "mask" and axis == len(spec.dims) - 1:
            return past + seq
        if axis == 1 and spec.kind != "float":
            return seq
        raise OnnxgrowError(f"cannot tell what size to give dimension {dim!r} (axis {axis}) of input "
                            f"{spec.name!r}; pass the inputs as an .npz instead")


def _is_total(dim: str) -> bool:
    return "total" in dim.lower()  # "total_sequence_length", "total_seq_len": cache plus new tokens


def _positions(spec: InputSpec, shape: tuple, total: int) -> np.ndarray:
    n = shape[-1] if shape else 1
    start = max(total - n, 0)  # after a cache of `past` tokens the new ones sit at past..past+seq-1
    if spec.rows is not None and start + n > spec.rows:
        raise OnnxgrowError(f"input {spec.name!r} indexes a table of {spec.rows} positions, too few for "
                            f"{start + n} tokens; use shorter shapes")
    return np.broadcast_to(np.arange(start, start + n, dtype=spec.dtype), shape).copy()


def plan_inputs(model: ir.Model) -> InputPlan:
    graph = model.graph
    inputs = [v for v in graph.inputs if v.const_value is None]  # old IRs list initializers as inputs
    tables = {v.name: _indexed_table_rows(v) for v in inputs if not _is_float(v)}
    largest = max((rows for rows in tables.values() if rows), default=None)
    specs = []
    for v in inputs:
        dims = [d if isinstance(d, int) else d.value for d in v.shape] if v.shape is not None else []
        kind, rows = ("float", None) if _is_float(v) else _classify_int_input(v, tables[v.name], largest)
        if kind == "float" and "mask" in v.name.lower():
            kind = "mask"  # a float mask looks like any float input; only its name tells (last resort)
        specs.append(InputSpec(v.name, kind, np.dtype(v.dtype.numpy()), dims, rows))

    ids = next((s for s in specs if s.kind == "tokens"), None)
    ids = ids or next((s for s in specs if s.kind != "float" and len(s.dims) >= 2), None)
    ids = ids or (specs[0] if specs else None)
    axes = [d if isinstance(d, str) else None for d in (ids.dims if ids else [])] + [None, None]
    batch_dim, seq_dim = axes[0], axes[1]
    # Whatever else is a plain symbol in a float input (a KV cache) is the cache length, in any layout.
    sizes = cache_head_sizes(graph)
    for s in specs:  # a cache axis named for a model size (genai's kv_cache_dim) has that size
        s.dims = [sizes.get(d, d) if isinstance(d, str) else d for d in s.dims]
    past_dims = {d for s in specs if s.kind == "float" for d in s.dims
                 if isinstance(d, str) and d not in (batch_dim, seq_dim) and re.fullmatch(r"[A-Za-z_]\w*", d)}
    return InputPlan(specs, batch_dim, seq_dim, past_dims)


# ONNX Runtime's fused attentions and the input index of their past key (the past value follows it)
FUSED_ATTENTION_PAST = {"GroupQueryAttention": 3, "MultiHeadAttention": 6}


def cache_head_sizes(graph: ir.Graph) -> dict[str, int]:
    """{dim name: head size} for the last axis of past key/value inputs read by GroupQueryAttention or
    MultiHeadAttention, where it is a name ("kv_cache_dim") and not a number. The head size is the
    query's width over its heads: for a packed query, (num_heads + 2 kv_num_heads) heads."""
    sizes = {}
    for node in graph:
        past = FUSED_ATTENTION_PAST.get(node.op_type) if node.domain == "com.microsoft" else None
        if past is None or len(node.inputs) <= past + 1:
            continue
        width = _static_width(node.inputs[0])
        heads = node.attributes.get("num_heads")
        kv = node.attributes.get("kv_num_heads")
        if width is None or heads is None:
            continue
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        n = heads.value + (2 * kv.value if packed and kv is not None else 0)
        for v in node.inputs[past:past + 2]:
            if v is not None and v.is_graph_input() and v.shape is not None and len(v.shape) == 4:
                last = v.shape[3]
                if not isinstance(last, int) and last.value and width % n == 0:
                    sizes[last.value] = width // n
    return sizes


def _static_width(value: ir.Value) -> int | None:
    """The last axis of an activation: declared, or the output width of the projection behind it."""
    if value is None:
        return None
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    while node is not None and node.op_type in ("Add", "Cast", "Identity") and node.inputs[0] is not None:
        if node.op_type == "Add" and node.inputs[0].producer() is None:
            break
        node = node.inputs[0].producer()
    if node is not None and node.op_type == "MatMul" and node.inputs[1] is not None \
            and node.inputs[1].const_value is not None and len(node.inputs[1].const_value.shape) == 2:
        return int(node.inputs[1].const_value.shape[1])
    return None


# What a padding mask goes through on its way to the attention scores: 1 - m, m * -inf, where(m, ...).
MASK_ARITHMETIC = frozenset({"Sub", "Mul", "Where", "Equal", "Not", "Less", "Greater", "And", "Or", "Xor"})


# GroupQueryAttention (com.microsoft) input index -> kind: seqlens_k holds, per row, the count of
# cached and new tokens less one; total_sequence_length the count of cached and new tokens
GQA_LENGTHS = {5: "seqlens_k", 6: "total_length"}


def _classify_int_input(value: ir.Value, rows: int | None, largest: int | None) -> tuple[str, int | None]:
    """An int input's role, read from what the graph does with it; its name breaks the ties."""
    by_name = _role_by_name(value.name)
    for node, idx in value.uses():  # GroupQueryAttention's lengths, given as graph inputs
        if node.op_type == "GroupQueryAttention" and idx in GQA_LENGTHS:
            return GQA_LENGTHS[idx], None
    if rows is not None:
        # the largest table looked up is the token embedding, a tiny one the token types; a name that
        # says which breaks the tie the sizes cannot (a vocabulary smaller than the position table)
        if by_name in ("tokens", "positions", "token_types"):
            return by_name, rows
        if rows == largest:
            return "tokens", rows
        if rows <= TYPE_TABLE_MAX_ROWS:
            return "token_types", rows
        return "positions", rows
    uses = {node.op_type for node, _ in _forward_uses(value)}
    # Rotary embeddings multiply positions by the inverse frequencies (Cast, Unsqueeze, MatMul);
    # a mask is turned into a bias with Sub/Mul/Where, never into a matmul operand.
    if uses & {"MatMul", "Einsum"}:
        return "positions", None
    if uses & MASK_ARITHMETIC and by_name in (None, "mask"):
        return "mask", None
    return by_name or "mask", None  # the graph gave no clue: names are the last resort


def _role_by_name(name: str) -> str | None:
    """The matcher's tie-breaker (positions, token types), plus the two roles only inputs have."""
    from .structure import role_by_name
    role = role_by_name(name)
    if role is not None:
        return role
    name = name.lower()
    return "mask" if "mask" in name else "tokens" if "ids" in name else None


def _forward_uses(value: ir.Value):
    """Every (node, input index) that reads `value`, directly or through ops that keep the ids
    (views.IDS_FORWARD)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        for node, idx in v.uses():
            yield node, idx
            # only the data operand carries the ids through (not a Reshape's shape, say)
            if node.op_type in IDS_FORWARD and idx == 0 and id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.outputs)


# ONNX Runtime's EmbedLayerNormalization: (input index of the ids, input index of the table they index)
EMBED_LOOKUPS = {0: 2, 1: 4}  # input_ids -> word table, segment_ids -> segment table


def _indexed_table_rows(value: ir.Value) -> int | None:
    """Rows of the largest 2-D float table that `value` indexes through a Gather (or ONNX Runtime's
    EmbedLayerNormalization), if any."""
    rows = []
    for node, idx in _forward_uses(value):
        if node.op_type == "Gather" and idx == 1:
            rows.append(_table_rows(node.inputs[0]))
        elif node.op_type == "EmbedLayerNormalization" and idx in EMBED_LOOKUPS \
                and len(node.inputs) > EMBED_LOOKUPS[idx]:
            rows.append(_table_rows(node.inputs[EMBED_LOOKUPS[idx]]))
    rows = [r for r in rows if r is not None]
    return max(rows, default=None)


def _table_rows(value: ir.Value) -> int | None:
    tensor = _constant(value)
    if tensor is None or len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
        return None
    return int(tensor.shape[0])


def _constant(value: ir.Value | None):
    """The tensor behind `value` when it is a constant, looking through casts (half-precision
    exports store a table in one dtype and gather from a cast of it)."""
    if value is None:
        return None
    value = look_through(value, CASTS)
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant":
        attribute = node.attributes.get("value")
        return attribute.value if attribute is not None else None
    return None


def _is_float(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point()


def make_inputs(model_path, batch: int, seq: int, past_length: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for the model at `model_path` (or an already loaded ir.Model)."""
    model = model_path if isinstance(model_path, ir.Model) else modelio.load(model_path)
    return plan_inputs(model).make(batch, seq, past_length, seed)


def _load_npz(path: Path, plan: InputPlan) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise OnnxgrowError(f"no such inputs file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as e:
        raise OnnxgrowError(f"{path} is not a readable .npz file ({type(e).__name__})") from None
    feeds = {}
    for spec in plan.specs:
        if spec.name not in arrays:
            raise OnnxgrowError(f"inputs file {path} lacks input {spec.name!r}")
        feeds[spec.name] = arrays[spec.name].astype(spec.dtype, copy=False)
    return feeds


def _text_inputs(text: str, tokenizer: Path, plan: InputPlan, past_length: int, seed: int) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer  # only this path needs it

    if not Path(tokenizer).is_file():
        raise OnnxgrowError(f"no such tokenizer file: {tokenizer}")
    try:
        ids = Tokenizer.from_file(str(tokenizer)).encode(text).ids
    except Exception as e:
        raise OnnxgrowError(f"could not tokenize with {tokenizer}: {one_line(e)}") from None
    if not ids:
        raise OnnxgrowError("the text encodes to no tokens")
    feeds = plan.make(1, len(ids), past_length, seed)  # masks, positions and caches as usual
    for spec in plan.specs:
        if spec.kind == "tokens":
            if spec.rows is not None and max(ids) >= spec.rows:
                raise OnnxgrowError(f"the tokenizer gives id {max(ids)} but the model has {spec.rows} tokens")
            feeds[spec.name] = np.array([ids], dtype=spec.dtype)
        elif spec.kind == "token_types":
            feeds[spec.name] = np.zeros_like(feeds[spec.name])
        elif spec.kind == "mask":
            feeds[spec.name] = np.ones_like(feeds[spec.name])
    return feeds


# --- the io map --------------------------------------------------------------------------------------


def read_io_map(model: ir.Model, path: Path) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    """The target's io map as {"inputs"|"outputs": {name: {axis: new-to-old index array}}}."""
    raw = model.metadata_props.get(IO_MAP_KEY)
    io_map = {"inputs": {}, "outputs": {}}
    if raw is None:
        return io_map
    bad = f"{path} has a malformed {IO_MAP_KEY}"
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise OnnxgrowError(f"{bad} (not JSON)") from None
    if not isinstance(data, dict) or not set(data) <= {"inputs", "outputs"}:
        raise OnnxgrowError(f"{bad} (expected keys 'inputs' and 'outputs')")
    for side in ("inputs", "outputs"):
        for name, axes in (data.get(side) or {}).items():
            if not isinstance(axes, dict):
                raise OnnxgrowError(f"{bad} ({side} {name!r} is not an axis map)")
            io_map[side][name] = {}
            for axis, index in axes.items():
                ok = str(axis).isdigit() and isinstance(index, list) and \
                    all(isinstance(i, int) and i >= -1 for i in index)
                if not ok:
                    raise OnnxgrowError(f"{bad} ({side} {name!r} axis {axis!r})")
                io_map[side][name][int(axis)] = np.array(index, dtype=np.int64)
    return io_map


def map_input(array: np.ndarray, axes: dict[int, np.ndarray], name: str) -> np.ndarray:
    """The target's input: source slices gathered per the map, new slots zero."""
    for axis, index in axes.items():
        if axis >= array.ndim or (index.size and index.max() >= array.shape[axis]):
            raise OnnxgrowError(f"io map for input {name!r} axis {axis} does not fit its shape {array.shape}")
        taken = np.take(array, np.maximum(index, 0), axis=axis)
        new_slot = (index < 0).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
        array = np.where(new_slot, np.zeros((), dtype=array.dtype), taken)
    return array


def _first_copies(index: np.ndarray, old_size: int, name: str, axis: int) -> np.ndarray:
    """For each source index j, the first new index i with index[i] == j."""
    first = np.full(old_size, -1, dtype=np.int64)
    for i in range(len(index) - 1, -1, -1):  # backwards, so the first copy is written last
        if index[i] >= old_size:
            raise OnnxgrowError(f"io map for output {name!r} axis {axis} points past the source size {old_size}")
        if index[i] >= 0:
            first[index[i]] = i
    missing = np.nonzero(first < 0)[0]
    if missing.size:
        raise OnnxgrowError(f"io map for output {name!r} axis {axis} has no slot for source index {missing[0]}")
    return first


def _check_map_fits(target: np.ndarray, axes: dict[int, np.ndarray], name: str) -> None:
    for axis, index in axes.items():
        if axis >= target.ndim or len(index) != target.shape[axis]:
            raise OnnxgrowError(f"io map for output {name!r} axis {axis} has {len(index)} entries but the "
                                f"target output has shape {target.shape}")


def _at_first_copies(target: np.ndarray, axes: dict[int, np.ndarray], source_shape: tuple, name: str,
                     skip: int | None = None) -> np.ndarray:
    for axis, index in axes.items():
        if axis != skip:
            target = np.take(target, _first_copies(index, source_shape[axis], name, axis), axis=axis)
    return target


def _copies_max_abs(target: np.ndarray, source: np.ndarray, axes: dict[int, np.ndarray], name: str) -> float:
    """Largest difference between any copy of a source slice and that slice, over all mapped axes."""
    worst = 0.0
    for axis, index in axes.items():
        # the other mapped axes are taken at their first copies so the shapes line up
        others = _at_first_copies(target, axes, source.shape, name, skip=axis)
        copies = np.nonzero(index >= 0)[0]
        diff = _abs_diff(np.take(others, copies, axis=axis), np.take(source, index[copies], axis=axis))
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


# --- comparing outputs --------------------------------------------------------------------------------


@dataclass
class OutputCheck:
    """One output's agreement over all input cases."""

    name: str
    shape: tuple  # the source output's shape in the last case
    dtype: str  # the lower precision of source and target: the one the tolerance is for
    rule: tol.Tolerance
    scale: float = 0.0  # max |source| over the cases and compared entries: what rtol is relative to
    max_abs_diff: float = 0.0
    # max |target - source| / (max |source| + 1e-6): the worst error relative to the output's scale.
    # Elementwise ratios are not used because they explode on entries near zero and say nothing there.
    max_rel_diff: float = 0.0
    cosine: float | None = 1.0  # the smallest over the cases, of the flattened outputs
    top1_agreement: float | None = None  # share of positions where argmax over the last axis agrees
    copies_max_abs: float | None = None  # only for outputs the io map widened
    note: str = ""  # why the output could not be compared
    weights_dtype: str | None = None  # set when the models' weight dtype, not `dtype`, set the tolerance
    # mapped axis -> [source indices compared, source size]: less than all only for a shrunk target
    indices_compared: dict[int, list[int]] = field(default_factory=dict)
    _top1_hits: int = field(default=0, repr=False)
    _top1_total: int = field(default=0, repr=False)

    @property
    def tolerance(self) -> float:
        """The abs difference allowed on this output: atol + rtol * scale."""
        return self.rule.bound(self.scale)

    @property
    def passed(self) -> bool:
        within = self.max_abs_diff <= self.tolerance  # NaN compares False, so a NaN fails
        return within and not self.note and (self.copies_max_abs is None or self.copies_max_abs <= self.tolerance)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "tolerance": self.tolerance,
                "atol": self.rule.atol, "rtol": self.rule.rtol, "scale": _json_float(self.scale),
                "max_abs_diff": _json_float(self.max_abs_diff), "max_rel_diff": _json_float(self.max_rel_diff),
                "cosine": _json_float(self.cosine), "top1_agreement": _json_float(self.top1_agreement),
                "copies_max_abs": _json_float(self.copies_max_abs), "note": self.note or None,
                "weights_dtype": self.weights_dtype,
                "indices_compared": {str(a): n for a, n in self.indices_compared.items()}, "passed": self.passed}


def _json_float(x: float | None):
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)  # strict JSON has no inf/nan


def _abs_diff(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    t, s = target.astype(np.float64), source.astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(t == s, 0.0, np.abs(t - s))  # equal infinities agree
    diff[np.isnan(t) & np.isnan(s)] = 0.0
    return np.nan_to_num(diff, nan=np.inf)  # a NaN on one side only is as wrong as it gets


def _cosine(target: np.ndarray, source: np.ndarray) -> float:
    t, s = target.astype(np.float64).ravel(), source.astype(np.float64).ravel()
    nt, ns = np.linalg.norm(t), np.linalg.norm(s)
    if nt == 0 and ns == 0:
        return 1.0
    if nt == 0 or ns == 0:
        return 0.0
    return float(np.dot(t, s) / (nt * ns))


def _is_floating(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == ml_dtypes.bfloat16  # numpy files bfloat16 under kind "V"


def new_check(name: str, expected: np.ndarray, got: np.ndarray, weights: str | None,
              given: float | None) -> OutputCheck:
    """An output's check with its rule: given by the user, else by the lower precision of the two
    outputs, or of the weights when those are stored in a lower one (and the output is float)."""
    dtype, rule = tol.loosest(str(expected.dtype), str(got.dtype))
    by_weights = None
    if given is not None:
        rule = tol.given(given)
    elif rule != tol.EXACT and weights and tol.looser(tol.by_dtype(weights), rule):
        by_weights, rule = weights, tol.by_dtype(weights)
    return OutputCheck(name, expected.shape, dtype, rule, weights_dtype=by_weights)


def weights_dtype(*models: ir.Model) -> str | None:
    """The lowest precision any of the models stores a weight in (a float initializer of rank >= 2,
    wherever a Cast takes it afterwards), by the names onnxgrow.tolerance uses."""
    found = set()
    for model in models:
        for v in model.graph.initializers.values():
            t = v.const_value
            if t is not None and len(t.shape) >= 2 and t.dtype.is_floating_point():
                name = str(np.dtype(t.dtype.numpy()))
                if name in tol.BY_DTYPE:
                    found.add(name)
    return tol.loosest(*found)[0] if found else None


def _kept_slices(source: np.ndarray, axes: dict[int, np.ndarray], check: OutputCheck,
                 partial_ok: bool) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """A shrunk target (subclone) keeps some source slices: compare on those only. Any other target
    must keep every source index, or the comparison would silently skip what the map leaves out."""
    axes = dict(axes)
    for axis, index in axes.items():
        if axis >= source.ndim:
            continue
        kept = np.unique(index[index >= 0])
        check.indices_compared[axis] = [int(len(kept)), int(source.shape[axis])]
        if len(kept) < source.shape[axis]:
            if not partial_ok:
                missing = sorted(set(range(source.shape[axis])) - set(kept.tolist()))
                check.note = (f"the io map of axis {axis} covers {len(kept)} of {source.shape[axis]} source "
                              f"indices (first missing: {missing[0]}); only a subclone may drop indices")
            source = np.take(source, kept, axis=axis)
            axes[axis] = np.where(index >= 0, np.searchsorted(kept, index), -1)
    return source, axes


def _compare(check: OutputCheck, target: np.ndarray, source: np.ndarray, axes: dict[int, np.ndarray],
             partial_ok: bool = False) -> None:
    check.shape = source.shape
    source, axes = _kept_slices(source, axes, check, partial_ok)
    _check_map_fits(target, axes, check.name)
    expected_shape = tuple(len(axes[a]) if a in axes else n for a, n in enumerate(source.shape))
    if target.shape != expected_shape:
        check.note = f"target shape {target.shape} where the source and io map give {expected_shape}"
        check.max_abs_diff = check.max_rel_diff = math.inf
        check.cosine = None
        return
    if axes:
        copies = _copies_max_abs(target, source, axes, check.name)
        check.copies_max_abs = max(check.copies_max_abs or 0.0, copies)
        target = _at_first_copies(target, axes, source.shape, check.name)
    diff = _abs_diff(target, source)
    max_abs = float(diff.max(initial=0.0))
    finite = np.abs(source[np.isfinite(source)].astype(np.float64))
    scale = float(finite.max(initial=0.0))
    check.scale = max(check.scale, scale)
    check.max_abs_diff = max(check.max_abs_diff, max_abs)
    check.max_rel_diff = max(check.max_rel_diff, max_abs / (scale + 1e-6))
    check.cosine = min(check.cosine, _cosine(target, source)) if check.cosine is not None else None
    last = source.ndim - 1
    if source.ndim >= 1 and source.shape[-1] > 1 and last not in axes and _is_floating(source.dtype):
        hits = np.argmax(target.astype(np.float32), axis=-1) == np.argmax(source.astype(np.float32), axis=-1)
        check._top1_hits += int(hits.sum())
        check._top1_total += int(hits.size)
        check.top1_agreement = check._top1_hits / max(check._top1_total, 1)


def shrinks(source_model: ir.Model, target_model: ir.Model) -> bool:
    """Whether the target was made smaller from the source (a subclone in the steps that lead from
    one to the other): only then may its io map leave source indices out."""
    from .metadata import history
    before, after = history(source_model), history(target_model)
    steps = after[len(before):] if after[:len(before)] == before else after
    return any(step.startswith("subclone") for step in steps)


# --- the report -----------------------------------------------------------------------------------------


@dataclass
class Report:
    source: str
    target: str
    provider: str
    cases: list[dict[str, list[int]]]  # the source input shapes of each case
    past_length: int | None
    tolerance_note: str
    outputs: list[OutputCheck]
    fixed_shapes: bool = False  # a static-shape export: every shape asked for became its own
    blocks: list[OutputCheck] = field(default_factory=list)  # the stream after each block (blockwise)
    mode: str = "whole"  # or "blockwise"

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs + self.blocks)

    @property
    def first_differing_block(self) -> str | None:
        return next((b.name for b in self.blocks if not b.passed), None)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else NOT_PRESERVED

    @property
    def tolerances(self) -> dict[str, dict[str, float]]:
        """The rule ({"atol", "rtol"}) used for each dtype the outputs were compared in."""
        return {o.dtype: {"atol": o.rule.atol, "rtol": o.rule.rtol} for o in self.outputs}

    def to_dict(self) -> dict:
        return {"passed": self.passed, "exit_code": self.exit_code, "source": self.source, "target": self.target,
                "provider": self.provider, "cases": self.cases, "past_length": self.past_length,
                "tolerance": self.tolerance_note, "tolerances": self.tolerances, "fixed_shapes": self.fixed_shapes,
                "outputs": [o.to_dict() for o in self.outputs], "mode": self.mode,
                "blocks": [b.to_dict() for b in self.blocks], "first_differing_block": self.first_differing_block}

    def print(self, console) -> None:
        from rich import box
        from rich.markup import escape
        from rich.table import Table

        console.print(f"[bold]{escape(self.source)}[/] -> [bold]{escape(self.target)}[/] on {self.provider}, "
                      f"{len(self.cases)} input case(s)"
                      + (" (the inputs' static shape)" if self.fixed_shapes else "")
                      + f"; tolerance {escape(self.tolerance_note)}")
        show_copies = any(o.copies_max_abs is not None for o in self.outputs)
        show_dtype = len({(o.dtype, o.rule) for o in self.outputs}) > 1  # else the line above says it
        # no vertical rules and a whole name column: KV-cache models have many long output names
        table = Table(show_header=True, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
                      collapse_padding=True)
        table.add_column("output", no_wrap=True, min_width=min(max(len(o.name) for o in self.outputs), 32))
        table.add_column("shape", overflow="fold")
        if show_dtype:
            table.add_column("dtype", no_wrap=True)
        for column in ("tol", "max abs", "max rel", "cosine", "top-1") + (("copies",) if show_copies else ()):
            table.add_column(column, justify="right", no_wrap=True)
        table.add_column("verdict")
        for o in self.outputs:
            row = [escape(o.name), "x".join(map(str, o.shape))]
            if show_dtype:
                row.append(o.dtype + (f" ({o.weights_dtype} weights)" if o.weights_dtype else ""))
            row += [_tol(o.tolerance), _fmt(o.max_abs_diff), _fmt(o.max_rel_diff),
                   "-" if o.cosine is None else f"{o.cosine:.6f}",
                   "-" if o.top1_agreement is None else f"{o.top1_agreement:.1%}"]
            if show_copies:
                row.append("-" if o.copies_max_abs is None else _fmt(o.copies_max_abs))
            row.append("[green]pass[/]" if o.passed else "[red]FAIL[/]")
            table.add_row(*row)
        console.print(table)
        for o in self.outputs:
            if not o.passed:
                console.print(f"{escape(o.name)}: {escape(o.note) if o.note else _why(o)}")
        self.print_blocks(console)
        console.print("[green]outputs preserved[/]" if self.passed else "[red]outputs NOT preserved[/]")

    def print_blocks(self, console) -> None:
        if self.mode != "blockwise":
            return
        from rich.markup import escape
        if not self.blocks:
            console.print("checked block by block; no residual stream stands for the source's (blocks changed)")
            return
        worst = max(self.blocks, key=lambda b: b.max_rel_diff)
        console.print(f"checked block by block: the residual stream after {len(self.blocks)} boundaries, "
                      f"worst {escape(worst.name)} (max abs {_fmt(worst.max_abs_diff)}, rel {_fmt(worst.max_rel_diff)})")
        first = next((b for b in self.blocks if not b.passed), None)
        if first is not None:
            console.print(f"[red]first block that differs: {escape(first.name)}[/] "
                          f"({escape(first.note) if first.note else _why(first)})")


def _why(o: OutputCheck) -> str:
    bound = f"tolerance {_tol(o.tolerance)} ({o.rule.describe()}, max|source| {_fmt(o.scale)})"
    if not o.max_abs_diff <= o.tolerance:
        return f"max abs diff {_fmt(o.max_abs_diff)} > {bound}"
    return f"a duplicated slice differs from its source by {_fmt(o.copies_max_abs)} > {bound}"


def _fmt(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


_tol = tol.short


def tolerance_note(outputs: list[OutputCheck], given: float | None) -> str:
    """The rule each dtype's outputs were held to, e.g. "float32: max abs diff <= 1e-6 + 1e-5 x
    max|source| (default for float32)" or "float32: max abs diff <= 1e-2 (given)"."""
    used = list({(o.dtype, o.rule, o.weights_dtype): None for o in outputs})
    if not used:
        return tol.given(given).describe() if given is not None else "by dtype (onnxgrow.tolerance)"
    parts = []
    for dtype, rule, weights in used:
        why = "" if rule.given else f" (default for {weights} weights)" if weights else f" (default for {dtype})"
        parts.append(f"{dtype}: {rule.describe()}{why}")
    return "; ".join(parts)


# --- validate ---------------------------------------------------------------------------------------------


def validate(source: Path, target: Path, *, provider: str = "auto", inputs: Path | None = None,
             tolerance: float | None = None, shapes=DEFAULT_SHAPES, past_length: int = 3, seed: int = 0,
             text: str | None = None, tokenizer: Path | None = None, blockwise: bool | None = None) -> Report:
    """Run `source` and `target` on the same inputs and compare every source output.

    `blockwise`: run each model one block at a time (onnxgrow/blockwise.py) and compare the residual
    stream after every block too; None chooses it for models too big to hold two at once."""
    source, target = Path(source), Path(target)
    if inputs is not None and text is not None:
        raise OnnxgrowError("give either an inputs file or a text, not both")
    if (text is None) != (tokenizer is None):
        raise OnnxgrowError("a text needs a tokenizer and a tokenizer needs a text")
    source_model, target_model = modelio.load(source), modelio.load(target)
    io_names = read_io_names(target_model, target)
    _check_same_interface(source_model, target_model, source, target, io_names)
    io_map = read_io_map(target_model, target)
    _check_io_map_names(io_map, source_model, target_model, target)
    plan = plan_inputs(source_model)
    cases = make_cases(plan, inputs, text, tokenizer, shapes, past_length, seed)

    # target name -> the source name it stands for (a deepened KV-cache model renumbers its caches;
    # a copied block's new past inputs are fed its original's past)
    feeds_from = {v.name: io_names["inputs"].get(v.name, v.name)
                  for v in target_model.graph.inputs if v.const_value is None}

    def to_target(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: map_input(feeds[src], io_map["inputs"].get(name, {}), name) for name, src in feeds_from.items()}

    weights = weights_dtype(source_model, target_model)
    partial_ok = shrinks(source_model, target_model)
    runs = None
    if choose_blockwise(blockwise, source_model, target_model):
        runs = try_blockwise(source, target, source_model, target_model, cases, to_target, provider, blockwise)
    if runs is None:
        runs = whole_runs(source, target, cases, to_target, provider)
    if not runs.cases:
        raise RuntimeRefused(f"ONNX Runtime cannot run {source} at any of the shapes asked ("
                             f"{', '.join('x'.join(map(str, s)) for s in shapes)}); try batch 1", source)

    compared = {o.name: io_names["outputs"].get(o.name, o.name) for o in target_model.graph.outputs}
    compared = {t: s for t, s in compared.items() if s is not None}
    checks: dict[str, OutputCheck] = {}
    for expected, got in zip(runs.expected, runs.got):
        for name, src in compared.items():
            if name not in checks:
                checks[name] = new_check(name, expected[src], got[name], weights, tolerance)
            _compare(checks[name], got[name], expected[src], io_map["outputs"].get(name, {}), partial_ok)
    blocks = stream_checks(runs, stream_map(target_model), weights, tolerance, partial_ok)

    note = tolerance_note(list(checks.values()), tolerance)
    shapes_fed = [{name: list(array.shape) for name, array in feeds.items()} for feeds in runs.cases]
    fixed = inputs is None and text is None and len(shapes) > 1 and len(cases) == 1
    return Report(str(source), str(target), runs.provider, shapes_fed,
                  past_length if plan.past_dims and inputs is None else None, note, list(checks.values()), fixed,
                  blocks, "blockwise" if runs.streams else "whole")


def make_cases(plan: InputPlan, inputs, text, tokenizer, shapes, past_length: int, seed: int) -> list[dict]:
    """The source inputs to compare on: the user's .npz or text, else generated at each shape."""
    if inputs is not None:
        return [_load_npz(Path(inputs), plan)]
    if text is not None:
        return [_text_inputs(text, Path(tokenizer), plan, past_length, seed)]
    return distinct_shapes([plan.make(batch, seq, past_length, seed) for batch, seq in shapes])


# --- running both models ------------------------------------------------------------------------------


BLOCKWISE_ABOVE = 2 * 2**30  # source + target weights, bytes: above this both models are not held at once


@dataclass
class Runs:
    cases: list[dict[str, np.ndarray]]  # the source inputs of the cases that ran
    expected: list[dict[str, np.ndarray]]  # the source's outputs, per case
    got: list[dict[str, np.ndarray]]  # the target's
    provider: str
    streams: list[tuple[list, list]] = field(default_factory=list)  # blockwise: (source's, target's) per case


def choose_blockwise(asked: bool | None, source_model: ir.Model, target_model: ir.Model) -> bool:
    """Blockwise when asked, or, unasked, when the two models' weights together pass BLOCKWISE_ABOVE
    or a third of the memory available now."""
    if asked is not None:
        return asked
    pair = modelio.weight_bytes(source_model) + modelio.weight_bytes(target_model)
    big = pair > min(BLOCKWISE_ABOVE, available_memory() / 3)
    if big:
        log.info("verifying block by block: the two models hold %.1f GB of weights", pair / 1e9)
    return big


def available_memory() -> float:
    """Bytes of memory available now (Linux's MemAvailable); infinite where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def whole_runs(source: Path, target: Path, cases, to_target, provider: str) -> Runs:
    """Both models whole, each in one session (bfloat16 graphs ONNX Runtime cannot run on this
    provider run in the torch bridge; the report says so)."""
    source_session = open_session(source, provider, bridge_fallback=True)
    target_session = open_session(target, provider, bridge_fallback=True)
    runs = Runs([], [], [], source_session.onnxgrow_provider)
    for feeds in cases:
        expected = run_source(source_session, feeds, len(cases))
        if expected is not None:
            runs.cases.append(feeds)
            runs.expected.append(expected)
            runs.got.append(run_model(target_session, to_target(feeds)))
    return runs


def cut_both(source_model: ir.Model, target_model: ir.Model, forced: bool):
    """Both models' segments; None, when not forced, for a pair the matcher cannot cut at its blocks
    (it is then compared whole, as any pair of models can be)."""
    from . import blockwise
    try:
        segments = blockwise.cut(source_model), blockwise.cut(target_model)
    except OnnxgrowError as e:
        if forced:
            raise OnnxgrowError(f"cannot verify block by block: {first_line(e)} (use --whole-model)") from e
        log.warning("comparing the models whole: cannot cut them at their blocks (%s)", first_line(e))
        return None
    for model in (source_model, target_model):  # what the analysis read (tied tables) need not stay mapped
        modelio.release_external(model)
    return segments


def try_blockwise(source, target, source_model, target_model, cases, to_target, provider, asked) -> Runs | None:
    """The blockwise runs; None, unless they were asked for, where the pair is better compared whole."""
    segments = cut_both(source_model, target_model, forced=asked is True)
    if segments is None:
        return None
    try:
        return blockwise_runs(source, target, source_model, target_model, segments, cases, to_target, provider)
    except RuntimeRefused as e:
        if asked is True or NO_KERNEL not in str(e):
            raise
        # bfloat16 on ONNX Runtime's CPU: only the torch bridge runs it, and only whole
        log.warning("comparing the models whole: %s", first_line(e)[:200])
        return None


def blockwise_runs(source: Path, target: Path, source_model: ir.Model, target_model: ir.Model, segments,
                   cases, to_target, provider: str) -> Runs:
    """Each model one segment at a time (onnxgrow/blockwise.py): the source first, then the target on
    the cases the source ran."""
    from . import blockwise
    ran = blockwise.run(source_model, segments[0], cases, provider, source)
    kept = [cases[i] for i in ran.ran]
    got = blockwise.run(target_model, segments[1], [to_target(f) for f in kept], provider, target, may_drop=False)
    return Runs(kept, ran.outputs, got.outputs, ran.provider, list(zip(ran.streams, got.streams)))


def stream_checks(runs: Runs, maps: dict, weights: str | None, tolerance: float | None,
                  partial_ok: bool) -> list[OutputCheck]:
    """The residual stream after each target block against the source boundary it stands for
    (metadata "onnxgrow.stream_map"; the same index when neither model was deepened or cut)."""
    if not runs.streams:
        return []
    source_count, target_count = len(runs.streams[0][0]), len(runs.streams[0][1])
    boundaries = maps["boundaries"] or (list(range(target_count)) if target_count == source_count else [0])
    checks = {}
    for source_streams, target_streams in runs.streams:
        for b, sb in enumerate(boundaries[:target_count]):
            if sb is None or sb >= source_count:
                continue
            expected, got = source_streams[sb], target_streams[b]
            axes = {got.ndim - 1: np.asarray(maps["hidden"])} if maps["hidden"] is not None else {}
            if not axes and got.shape != expected.shape:
                continue  # a width changed by something that left no map: nothing to compare by
            name = "embeddings" if b == 0 else f"block {b - 1}"
            check = checks.setdefault(name, new_check(name, expected, got, weights, tolerance))
            _compare(check, got, expected, axes, partial_ok)
            check.top1_agreement = None  # an argmax over hidden units means nothing
    return list(checks.values())


def run_source(session, feeds: dict[str, np.ndarray], cases: int) -> dict[str, np.ndarray] | None:
    """The source's outputs on `feeds`; None where ONNX Runtime cannot run the source itself at a batch
    above 1 (1.32's RotaryEmbedding kernel takes batch 1 only) and other cases remain to compare."""
    try:
        return run_model(session, feeds)
    except RuntimeRefused as e:
        batch = max((a.shape[0] for a in feeds.values() if a.ndim), default=1)
        if batch == 1 or cases == 1:
            raise
        log.warning("ONNX Runtime cannot run the source at batch %d (%s); compared at the other shapes",
                    batch, first_line(e)[:160])
        return None


def distinct_shapes(cases: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """One case per set of input shapes: a static-shape export makes every requested shape its own."""
    seen, kept = set(), []
    for feeds in cases:
        key = tuple((name, a.shape) for name, a in sorted(feeds.items()))
        if key not in seen:
            seen.add(key)
            kept.append(feeds)
    if len(kept) < len(cases):  # the report says so; a warning here would precede a refusal's one line
        log.info("the inputs have static shapes: compared at %s only",
                    ", ".join(f"{n} {'x'.join(map(str, a.shape))}" for n, a in kept[0].items()))
    return kept


def read_io_names(model: ir.Model, path: Path) -> dict:
    """{"inputs"|"outputs": {target name: source name or None}} from the target's metadata."""
    raw = model.metadata_props.get(IO_NAMES_KEY)
    if raw is None:
        return {"inputs": {}, "outputs": {}}
    try:
        data = json.loads(raw)
        return {"inputs": dict(data.get("inputs", {})), "outputs": dict(data.get("outputs", {})),
                "dropped": list(data.get("dropped", []))}
    except (json.JSONDecodeError, AttributeError, TypeError):
        raise OnnxgrowError(f"{path} has a malformed {IO_NAMES_KEY}") from None


def _check_same_interface(source_model: ir.Model, target_model: ir.Model, source: Path, target: Path,
                          io_names: dict | None = None) -> None:
    io_names = io_names or {"inputs": {}, "outputs": {}}

    def names(values, side=None):  # a target's names are read as the source names they stand for
        return [io_names[side].get(v.name, v.name) if side else v.name for v in values if v.const_value is None]

    src_in, tgt_in = names(source_model.graph.inputs), names(target_model.graph.inputs, "inputs")
    dropped = set(io_names.get("dropped", []))
    if dropped:  # a model with blocks removed no longer reads their caches
        src_in = [n for n in src_in if n in tgt_in]
    if set(src_in) != set(tgt_in):
        only_src = sorted(set(src_in) - set(tgt_in))
        only_tgt = sorted(set(tgt_in) - set(src_in))
        raise OnnxgrowError(f"{source} and {target} have different inputs (only in source: {only_src}, "
                            f"only in target: {only_tgt})")
    missing = sorted(set(names(source_model.graph.outputs)) - set(names(target_model.graph.outputs, "outputs"))
                     - dropped)
    if missing:
        raise OnnxgrowError(f"{target} lacks the source outputs {missing}")


def _check_io_map_names(io_map: dict, source_model: ir.Model, target_model: ir.Model, target: Path) -> None:
    inputs = {v.name for v in target_model.graph.inputs}
    outputs = {v.name for v in target_model.graph.outputs}
    for side, known in (("inputs", inputs), ("outputs", outputs)):
        unknown = sorted(set(io_map[side]) - known)
        if unknown:
            raise OnnxgrowError(f"{target}'s {IO_MAP_KEY} names {side} the models do not have: {unknown}")
