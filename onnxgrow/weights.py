"""Weights by structural role, in safetensors: the same names whatever the exporter called them.

    export_weights("model.onnx", "model.safetensors")
    proto = load_weights("other-export.onnx", "model.safetensors")   # same architecture, any exporter
    load_into_module(bridge_module, "model.safetensors")

Tensor names come from the TransformerSpec, not from initializer names:

    embed.tokens [vocab, hidden]         embed.positions [positions, hidden]
    embed.token_types [types, hidden]    (BERT's segment table)
    layers.{i}.attn.q / .k / .v / .o     (.qkv when the export fuses them)
    layers.{i}.ffn.up / .gate / .down    each with a .bias variant when the projection has one
    layers.{i}.norm{j}.weight / .bias    the block's norms, in the order the analysis found them
    final_norm.weight / .bias            lm_head [vocab, hidden] (+ lm_head.bias)
    other.<initializer name>             every other float initializer, so nothing is lost

Projections are stored as [out_features, in_features] (the torch.nn.Linear layout) whatever layout
the export used (TorchScript GPT-2 stores Conv1D weights [in, out], dynamo a Transpose of [out, in]),
so a file written from one export loads into another export of the same architecture. The
metadata key "onnxgrow.roles" maps each tensor name to {"initializer": name, "transposed": bool}
(transposed: the file holds the transpose of the stored initializer).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from . import api, modelio, progress
from .bridge import FLOAT_TYPES, as_proto, load_ir, store, tensor_from_ir
from .errors import OnnxgrowError
from .metadata import ROLES_KEY
from .structure import TransformerSpec, is_packed_weight_attention, out_axis, weight_of
from .views import reshaped_forward


def projection(spec: TransformerSpec, node: ir.Node, role: str, roles: dict) -> None:
    """The weight (as [out, in]) and the bias of one projection node."""
    weight, _ = weight_of(spec.flow, node)
    # an Einsum kernel ([hidden, heads, head_dim]) is written as stored
    roles[role] = (weight.name, node.op_type != "Einsum" and out_axis(spec.flow, node) == len(weight.const_value.shape) - 1)
    bias = bias_of(spec, node)
    if bias is not None:
        roles[role + ".bias"] = (bias.name, False)


# ONNX Runtime's fused ops that add a projection's bias inside: op -> the bias's input index
BIAS_INSIDE = {"SkipLayerNormalization": 4, "SkipSimplifiedLayerNormalization": 3, "FastGelu": 1, "BiasGelu": 1,
               "BiasAdd": 1}


def bias_of(spec: TransformerSpec, node: ir.Node) -> ir.Value | None:
    """Gemm's C, the 1-D initializer a MatMul's only consumer adds, or the bias of the fused op (a
    SkipLayerNormalization, a FastGelu) that is its only consumer."""
    flow = spec.flow
    if node.op_type == "Gemm" or is_packed_weight_attention(node):  # com.microsoft Attention's bias is its input 2
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            init, _ = flow.source_initializer(node.inputs[2])
            return init
        return None
    consumers = node.outputs[0].consumers()
    if len(consumers) == 1 and consumers[0].domain == "com.microsoft" and consumers[0].op_type in BIAS_INSIDE:
        fused, index = consumers[0], BIAS_INSIDE[consumers[0].op_type]
        if len(fused.inputs) <= index or fused.inputs[index] is None:
            return None
        init, _ = flow.source_initializer(fused.inputs[index])
        return init
    out = reshaped_forward(node.outputs[0])
    consumers = out.consumers()
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return None
    add = consumers[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    init, _ = flow.source_initializer(other)
    return init if init is not None and len(init.const_value.shape) == 1 else None


def roles_of(spec: TransformerSpec, float_names) -> dict[str, tuple[str, bool]]:
    """role -> (initializer name, transposed) for every float initializer in `float_names`."""
    roles: dict[str, tuple[str, bool]] = {"embed.tokens": (spec.token_embedding.name, False)}
    if spec.position_embedding is not None:
        roles["embed.positions"] = (spec.position_embedding.name, False)
    if spec.token_type_embedding is not None:
        roles["embed.token_types"] = (spec.token_type_embedding.name, False)
    for i, block in enumerate(spec.blocks):
        att = block.attention
        if att.fused_qkv:
            projection(spec, att.q_proj, f"layers.{i}.attn.qkv", roles)
        else:
            for name in ("q", "k", "v"):
                projection(spec, getattr(att, f"{name}_proj"), f"layers.{i}.attn.{name}", roles)
        projection(spec, att.o_proj, f"layers.{i}.attn.o", roles)
        if block.ffn is not None:
            for name in ("up", "gate", "down"):
                node = getattr(block.ffn, name)
                if node is not None:
                    projection(spec, node, f"layers.{i}.ffn.{name}", roles)
        for j, norm in enumerate(block.norms):
            norm_roles(norm, f"layers.{i}.norm{j}", roles)
    if spec.final_norm is not None:
        norm_roles(spec.final_norm, "final_norm", roles)
    if spec.lm_head is not None:
        projection(spec, spec.lm_head, "lm_head", roles)
    named = {name for name, _ in roles.values()}
    for name in float_names:
        if name not in named:
            roles[f"other.{name}"] = (name, False)
    return roles


def norm_roles(norm, prefix: str, roles: dict) -> None:
    if norm.scale is not None:
        roles[prefix + ".weight"] = (norm.scale, False)
    if norm.bias is not None:
        roles[prefix + ".bias"] = (norm.bias, False)


def model_roles(model) -> tuple[ir.Model, dict[str, tuple[str, bool]]]:
    m, _, roles = spec_and_roles(model)
    return m, roles


def spec_and_roles(model, extra=None) -> tuple[ir.Model, TransformerSpec, dict[str, tuple[str, bool]]]:
    """The model, its TransformerSpec and its roles; `extra(spec)` may add roles (same form) that
    only one consumer of the roles needs (export-hf's post-norm BERT output norm)."""
    m = load_ir(model)
    floats = [name for name, v in m.graph.initializers.items()
              if v.const_value is not None and int(v.const_value.dtype) in FLOAT_TYPES]
    spec = api.structure(m)  # matched on a normalized copy, whose deduplicated parameters have own names
    aliases = spec.model.graph.meta.get("onnxgrow_aliases", {})
    roles = roles_of(spec, floats)
    if extra is not None:
        added = extra(spec)
        roles = {r: v for r, v in roles.items() if not (r.startswith("other.") and v in added.values())} | added
    # in the graph as exported such a parameter is its twin: the roles share that initializer
    relaid = spec.model.graph.meta.get("onnxgrow_relaid", set())
    exported = {role: as_exported(name, aliases) for role, (name, _) in roles.items()}
    # a kernel reshaped at run time (Keras' MultiHeadAttention) is written in its stored layout
    return m, spec, {role: (exported[role], t and exported[role] not in relaid) for role, (_, t) in roles.items()}


def as_exported(name: str, aliases: dict) -> str:
    """The initializer a normalized copy's parameter is in the model as exported (aliases chain:
    an unshared copy of a weight folded from a kernel's reshape)."""
    seen = set()
    while name in aliases and name not in seen:
        seen.add(name)
        name = aliases[name]
    return name


def export_weights(model, out_path, *, force: bool = False) -> Path:
    """Write the model's float weights to a safetensors file, named by structural role."""
    from safetensors.torch import save_file
    out_path = Path(out_path)
    modelio.guard_output_path(out_path, (), force)
    m, roles = model_roles(model)
    tensors, meta = {}, {}
    with progress.task("reading the weights", total=len(roles), unit="tensors") as advance:
        for role, (name, transposed) in roles.items():
            t = tensor_from_ir(m.graph.initializers[name].const_value)
            tensors[role] = t.transpose(-1, -2).contiguous() if transposed else t  # [1, in, out] too
            meta[role] = {"initializer": name, "transposed": transposed}
            advance()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".onnxgrow-", suffix=".safetensors", dir=out_path.parent)
    os.close(fd)
    try:
        with progress.task(f"writing {out_path.name}"):
            save_file(tensors, tmp, metadata={ROLES_KEY: json.dumps(meta)})
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path


def read_weights(path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise OnnxgrowError(f"no such weights file: {path}")
    try:
        with progress.task(f"reading {path.name}"):
            return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise OnnxgrowError(f"{path} is not a readable safetensors file ({e})".splitlines()[0]) from None


def assignments(roles: dict, tensors: dict, strict: bool) -> dict[str, torch.Tensor]:
    """initializer name -> value in its stored layout, from a file's role tensors."""
    if strict:
        extra = sorted(set(tensors) - set(roles))
        missing = sorted(set(roles) - set(tensors))
        if extra or missing:
            parts = ([f"the model has no {', '.join(extra[:5])}"] if extra else []) + (
                [f"the file lacks {', '.join(missing[:5])}"] if missing else [])
            raise OnnxgrowError(f"weights do not fit the model: {'; '.join(parts)}")
    out = {}
    for role, value in tensors.items():
        if role not in roles:
            continue
        name, transposed = roles[role]
        value = value.transpose(-1, -2) if transposed else value
        if name in out and not torch.equal(out[name], value):
            raise OnnxgrowError(f"{role} and another role share initializer {name!r} but hold different values")
        out[name] = value
    return out


def load_weights(model, path, *, strict: bool = True) -> onnx.ModelProto:
    """`model` with its initializers replaced from a file written by export_weights. Shapes must
    match; `strict` also requires the file and the model to have the same roles."""
    _, roles = model_roles(model)
    return write_assignments(model, roles, assignments(roles, read_weights(path), strict))


def write_assignments(model, roles: dict, values: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """A copy of `model` with initializers replaced by `values` (name -> tensor in stored layout)."""
    proto = as_proto(model)
    by_name = {tp.name: tp for tp in proto.graph.initializer}
    with progress.task("placing the weights", total=len(values), unit="tensors") as advance:
        for name, value in values.items():
            tp = by_name[name]
            if tuple(value.shape) != tuple(tp.dims):
                role = next(r for r, (n, _) in roles.items() if n == name)
                raise OnnxgrowError(f"{role}: the file holds {list(value.shape)}, the model {list(tp.dims)}")
            store(tp, value)
            advance()
    return proto


def load_into_module(module, path, *, strict: bool = True) -> None:
    """Load a role-named weights file into a bridge module (built by bridge.to_torch)."""
    if getattr(module, "source", None) is None:
        raise OnnxgrowError("load_into_module needs a module built by bridge.to_torch")
    _, roles = model_roles(module.source)
    module.set_initializers(assignments(roles, read_weights(path), strict))
