"""Calibration data and activation statistics measured in ONNX Runtime.

Token ids come from a text file through a tokenizer.json (the `tokenizers` library), from raw bytes
(id = byte value), or from a .npy array. Statistics are gathered by exposing intermediate tensors as
extra graph outputs of a copy of the model and running it batch by batch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import progress
from .errors import OnnxgrowError
from .modelio import as_ir
from .static_shapes import batches, fixed_token_shape
from .verify import open_session, plan_inputs, run_model


def windows(tokens: np.ndarray, seq: int, count: int) -> np.ndarray:
    """`count` windows of `seq` tokens, evenly spread over the stream."""
    if len(tokens) < seq:
        raise OnnxgrowError(f"calibration data has {len(tokens)} tokens, fewer than one window of {seq}")
    starts = np.linspace(0, len(tokens) - seq, count).astype(np.int64)
    return np.stack([tokens[s:s + seq] for s in starts])


def feeds_for(plan, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs for these token ids: the generated plan gives masks, types and positions."""
    feeds = plan.make(ids.shape[0], ids.shape[1], past_length=0, seed=0)
    for spec in plan.specs:
        if spec.kind == "tokens":
            feeds[spec.name] = ids.astype(spec.dtype)
        elif spec.kind == "mask":
            feeds[spec.name] = np.ones_like(feeds[spec.name])  # real text: no padding
        elif spec.kind == "token_types":
            feeds[spec.name] = np.zeros_like(feeds[spec.name])
    return feeds


def mean_abs(model: ir.Model, probes: dict[str, ir.Value], ids: np.ndarray, batch: int = 8,
             provider: str = "auto", label: str = "calibrating",
             updates: list[tuple[str, str]] = ()) -> dict[str, np.ndarray]:
    """Mean |activation| over batch and tokens of each probe, per index of its last axis.

    Under "key^2" also the mean square per index. For each (before, after) pair in `updates` also
    the mean relative update ||after - before|| / ||before|| per token, under the key
    "before->after": how much a block changes the stream.
    """
    plan = plan_inputs(model)
    probe_model = as_ir(model)  # a copy that still finds its external data
    by_name = {v.name: v for n in probe_model.graph for v in n.outputs}
    for v in probe_model.graph.inputs:
        by_name[v.name] = v
    exposed = []
    for key, value in probes.items():
        v = by_name[value.name]
        if not v.is_graph_output():
            if v.type is None:
                v.type = ir.TensorType(value_dtype(v))
            probe_model.graph.outputs.append(v)
        exposed.append((key, v.name))
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        ir.save(probe_model, path, external_data="probe.onnx.data")
        session = open_session(path, provider)
        with progress.task(label, total=len(ids), unit="windows") as advance:
            for chunk, real in batches(ids, batch, fixed_token_shape(plan)[0]):
                outputs = run_model(session, feeds_for(plan, chunk), provider)
                named = {key: real_rows(outputs[name], len(chunk), real).astype(np.float64) for key, name in exposed}
                for key, x in named.items():
                    flat = x.reshape(-1, x.shape[-1])
                    sums[key] = sums.get(key, 0) + np.abs(flat).sum(axis=0)
                    squares[key] = squares.get(key, 0) + (flat * flat).sum(axis=0)
                for before, after in updates:
                    a, b = named[before], named[after]
                    change = np.linalg.norm(b - a, axis=-1) / (np.linalg.norm(a, axis=-1) + 1e-9)
                    key = f"{before}->{after}"
                    sums[key] = sums.get(key, 0) + change.sum()
                advance(real)
    tokens = ids.size
    stats = {key: total / tokens for key, total in sums.items()}
    stats.update({f"{key}^2": total / tokens for key, total in squares.items()})
    return stats


def value_dtype(value: ir.Value) -> ir.DataType:
    """The element type of an activation whose type the graph does not declare: a Cast's target,
    else the type of the data it is computed from (fp16 and bf16 graphs compute in their own type;
    an exposed output must declare it or ONNX Runtime refuses the model)."""
    seen = set()
    while value is not None and id(value) not in seen:
        seen.add(id(value))
        if value.dtype is not None:
            return value.dtype
        node = value.producer()
        if node is None:
            break
        if node.op_type == "Cast":
            return ir.DataType(node.attributes["to"].value)
        if node.op_type in ("Shape", "Size", "ArgMax", "ArgMin", "NonZero"):
            return ir.DataType.INT64
        if node.op_type == "Pow":  # the exponent may have another type
            value = node.inputs[0]
            continue
        # elementwise ops, matmuls, norms and views keep the type of their (first) float input
        typed = [v for v in node.inputs if v is not None and v.dtype is not None and v.dtype.is_floating_point()]
        value = typed[0] if typed else next((v for v in node.inputs if v is not None), None)
    return ir.DataType.FLOAT


def run_outputs(path: os.PathLike, ids: np.ndarray, batch: int = 8, provider: str = "auto") -> list[dict]:
    """Every output of the model at `path`, batch by batch, for evaluation."""
    import onnx_ir as _ir
    plan = plan_inputs(_ir.load(path))
    session = open_session(path, provider)
    runs = []
    for chunk, real in batches(ids, batch, fixed_token_shape(plan)[0]):
        outputs = run_model(session, feeds_for(plan, chunk), provider)
        runs.append({name: real_rows(x, len(chunk), real) for name, x in outputs.items()})
    return runs


def real_rows(x: np.ndarray, fed: int, real: int) -> np.ndarray:
    """The part of an output that belongs to the first `real` of `fed` windows; its first axis is the
    batch, or the batch times the tokens (an activation a static-shape export flattened)."""
    if real == fed or x.ndim == 0 or x.shape[0] % fed:
        return x
    return x[:real * (x.shape[0] // fed)]
