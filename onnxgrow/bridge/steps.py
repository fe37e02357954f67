"""From graph nodes to interpreter steps: each node's torch op, picked by the model's opset, with its
attributes read once at build time.

A step is (fn, host, input names, output names, attrs); `OnnxModule.forward` runs them in order.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import onnx_ir as ir
import torch

from ..errors import OnnxgrowError
from ..registry import canonical_domain
from .ops import OPS
from .tensors import tensor_from_ir

log = logging.getLogger(__name__)


class Step(NamedTuple):
    fn: object  # fn(dev, attrs, *inputs)
    host: object  # host(attrs, *inputs) when every input is a host value, or None
    inputs: list  # value names (None for an omitted optional input)
    outputs: list
    attrs: dict


def opset_of(graph: ir.Graph, domain: str) -> int | None:
    """The model's opset for `domain` ('' and 'ai.onnx' are one domain); None if not imported, which
    makes the lookup take the newest implementation."""
    imports = {canonical_domain(d): v for d, v in graph.opset_imports.items()}
    return imports.get(canonical_domain(domain))


def plan_steps(graph: ir.Graph, add_constant) -> list[Step]:
    """The steps that run `graph`; Constant nodes go to `add_constant(name, tensor)` instead.

    Every op without a torch implementation at the model's opset is named in one error.
    """
    missing, steps = set(), []
    for node in graph:
        if canonical_domain(node.domain) == "" and node.op_type == "Constant":
            add_constant(node.outputs[0].name, constant_value(node))
            continue
        entry = OPS.lookup_entry(node.domain, node.op_type, opset_of(graph, node.domain))
        if entry is None:
            missing.add((canonical_domain(node.domain), node.op_type))
            continue
        fn, extra = entry
        steps.append(Step(fn, extra.get("host"), [v.name if v is not None else None for v in node.inputs],
                          [v.name if v is not None and v.name else None for v in node.outputs],
                          attributes(node)))
    if missing:
        raise OnnxgrowError(missing_ops_message(missing))
    log.debug("%d steps for %d nodes", len(steps), len(graph))
    return steps


def missing_ops_message(missing: set[tuple[str, str]]) -> str:
    """Standard ops in one list; an op of another domain (ONNX Runtime's contrib ops) is named with
    its domain, so the user can tell which form of the op their export holds."""
    standard = sorted(op_type for domain, op_type in missing if domain == "")
    parts = [f"the torch bridge does not implement these ops: {', '.join(standard)}"] if standard else []
    parts += [OPS.missing(domain, op_type) for domain, op_type in sorted(missing) if domain != ""]
    return "; ".join(parts)


def attributes(node: ir.Node) -> dict:
    out = {"_op": node.op_type, "_name": node.name, "_nout": len(node.outputs)}
    for name, attr in node.attributes.items():
        value = attr.value
        if isinstance(value, ir.TensorProtocol):
            value = tensor_from_ir(value)
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[name] = value
    if node.op_type == "ConstantOfShape":  # read at build time: .item() in forward breaks a compiled graph
        fill = out.get("value")
        out["_fill"] = (fill.reshape(-1)[0].item(), fill.dtype) if fill is not None else (0.0, torch.float32)
    return out


def constant_value(node: ir.Node) -> torch.Tensor:
    name, attr = next(iter(node.attributes.items()))
    value = attr.value
    if name == "value":
        return tensor_from_ir(value)
    if name in ("value_int", "value_ints"):
        return torch.tensor(value, dtype=torch.int64)
    if name in ("value_float", "value_floats"):
        return torch.tensor(value, dtype=torch.float32)
    raise OnnxgrowError(f"the torch bridge does not implement Constant with {name!r}")


def last_uses(steps: list[Step], keep: set) -> list[list[str]]:
    """For each step, the values no later step reads: dropped from the environment to free memory."""
    last = {}
    for i, step in enumerate(steps):
        for n in step.inputs:
            if n is not None:
                last[n] = i
    drops = [[] for _ in steps]
    for n, i in last.items():
        if n not in keep:
            drops[i].append(n)
    return drops


def node_label(a: dict | None) -> str:
    """How a failing step is named: `node '/h.1/attn/Gemm' (Gemm)`, `a Gemm node` if unnamed."""
    if a is None:
        return "the graph"
    return f"node {a['_name']!r} ({a['_op']})" if a.get("_name") else f"a {a['_op']} node"
