"""The Python API: inspect and widen (deepen and subclone build on the same pieces).

    import onnxgrow
    spec = onnxgrow.inspect("model.onnx")              # a dict like `onnxgrow inspect --json`
    wide = onnxgrow.widen("model.onnx", factor=2)      # an onnx.ModelProto
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import modelio
from .errors import OnnxgrowError
from .resize import Resizer
from .structure import TransformerSpec, distinct, load_structure

WIDEN_METHODS = ("hypercloning", "fpi", "aki", "pad")
DEEPEN_METHODS = ("identity", "stack", "interleave")


def as_ir(model) -> ir.Model:
    """Accept a path, an onnx.ModelProto or an onnx-ir Model; always work on a private copy."""
    if isinstance(model, (str, os.PathLike)):
        return modelio.load(model)
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    if isinstance(model, ir.Model):
        copy = ir.from_proto(ir.to_proto(model))
        # external tensors are read relative to the model's folder, which the proto does not carry
        base = next((v.const_value.base_dir for v in model.graph.initializers.values()
                     if isinstance(v.const_value, ir.ExternalTensor)), None)
        if base is not None:
            ir.external_data.set_base_dir(copy.graph, base)
        return copy
    raise OnnxgrowError(f"expected a model path or ModelProto, got {type(model).__name__}")


def structure(model) -> TransformerSpec:
    return load_structure(as_ir(model))


def inspect(model) -> dict:
    return structure(model).config()


def widen_sizes(spec: TransformerSpec, factor: float | None = None, hidden: int | None = None,
                heads: int | None = None, kv_heads: int | None = None, ffn: int | None = None) -> dict:
    """Target size of every role Dim. head_dim is kept: heads follow hidden unless given."""
    if factor is None and hidden is None:
        raise OnnxgrowError("give --factor or --hidden")
    if factor is not None and hidden is not None:
        raise OnnxgrowError("give either --factor or --hidden, not both")
    old_hidden, old_heads, old_kv = spec.hidden.size, spec.heads.size, spec.kv_heads.size
    if factor is not None:
        if factor <= 0:
            raise OnnxgrowError(f"--factor must be positive, got {factor}")
        hidden = round(old_hidden * factor)
        heads = heads or round(old_heads * factor)
        # multi-query attention stays multi-query: its one kv head serves more query heads
        kv_heads = kv_heads or (heads if spec.group is None else 1 if old_kv == 1 else round(old_kv * factor))
    ratio = hidden / old_hidden
    if heads is None:
        heads = old_heads * ratio
        if heads != int(heads):
            raise OnnxgrowError(f"hidden {hidden} does not give a whole number of heads; pass --heads")
        heads = int(heads)
    if kv_heads is None:
        kv_heads = heads if spec.group is None else heads // (old_heads // old_kv)
    if spec.group is None and kv_heads != heads:
        raise OnnxgrowError("this model has as many key/value heads as query heads; --kv-heads must equal --heads")
    if heads % kv_heads:
        raise OnnxgrowError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    if old_kv == 1 and kv_heads > 1:
        what = "single-head attention" if spec.group is None else "multi-query attention (one key/value head)"
        raise OnnxgrowError(f"{what}: the key/value head cannot be copied (its axis has size 1 in the graph); "
                            "keep --kv-heads 1")
    sizes = {spec.hidden: hidden}
    for d in distinct(b.attention.kv_heads for b in spec.blocks):
        sizes[d] = kv_heads
    for d in distinct(b.attention.group for b in spec.blocks):
        sizes[d] = heads // kv_heads
    for d in distinct(spec.ffn):
        sizes[d] = ffn if ffn is not None else round(d.size * ratio)
    for d, n in sizes.items():
        if n < d.size:
            raise OnnxgrowError(f"widen cannot shrink ({d.role} {d.size} -> {n}); use subclone")
    return sizes


def load_pass(method: str, choices=WIDEN_METHODS):
    if method not in choices:
        raise OnnxgrowError(f"unknown method {method!r}; choose one of {', '.join(choices)}")
    return importlib.import_module(f"passes.{method}")


def widen(model, factor: float | None = None, *, hidden: int | None = None, heads: int | None = None,
          kv_heads: int | None = None, ffn: int | None = None, method: str = "hypercloning",
          noise: float = 0.0, seed: int = 0) -> onnx.ModelProto:
    """A wider model that starts from the source's knowledge (function-preserving for hypercloning)."""
    wide = widen_ir(as_ir(model), factor, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn,
                    method=method, noise=noise, seed=seed)
    return ir.to_proto(wide)


def widen_ir(model: ir.Model, factor=None, *, hidden=None, heads=None, kv_heads=None, ffn=None,
             method="hypercloning", noise=0.0, seed=0, spec: TransformerSpec | None = None) -> ir.Model:
    """Widen `model` in place (`spec`: its structure, when the caller has found it already)."""
    method_pass = load_pass(method)
    if noise < 0:
        raise OnnxgrowError(f"--noise must be non-negative, got {noise}")
    spec = spec or load_structure(model)
    sizes = widen_sizes(spec, factor, hidden, heads, kv_heads, ffn)
    plans = method_pass.plans(spec, sizes, seed=seed)
    resizer = Resizer(spec, plans)
    model = resizer.apply(method_pass.rule(noise=noise, seed=seed))
    if hasattr(method_pass, "after"):
        method_pass.after(spec, resizer)
    model.metadata_props["onnxgrow.history"] = (
        model.metadata_props.get("onnxgrow.history", "") + f"widen:{method}:" +
        ",".join(sorted({f"{d.role}={n}" for d, n in sizes.items()})) + ";")
    return model


def default_output(path: Path, suffix: str) -> Path:
    name = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{name}.{suffix}.onnx")


def factor_label(factor: float) -> str:
    return str(int(factor)) if float(factor).is_integer() else f"{factor:g}"


def describe_sizes(spec: TransformerSpec) -> str:
    c = spec.config()
    return (f"hidden {c['hidden_size']}, {c['num_layers']} layers, {c['num_heads']} heads "
            f"({c['num_kv_heads']} kv), ffn {c['ffn_size']}")


def is_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def deepen(model, layers: int | None = None, *, factor: int | None = None, method: str = "identity",
           at: list[int] | None = None, noise: float = 0.0, seed: int = 0) -> onnx.ModelProto:
    """A deeper model: new blocks are identities (exact), or copies of trained blocks."""
    return ir.to_proto(deepen_ir(as_ir(model), layers, factor=factor, method=method, at=at,
                                 noise=noise, seed=seed))


def deepen_ir(model: ir.Model, layers=None, *, factor=None, method="identity", at=None, noise=0.0,
              seed=0, spec: TransformerSpec | None = None) -> ir.Model:
    """Deepen `model` in place (`spec`: its structure, when the caller has found it already)."""
    from .blocks import block_graphs, insert_after, record_io_names
    from .resize import set_tensor
    method_pass = load_pass(method, DEEPEN_METHODS)
    spec = spec or load_structure(model)
    num = len(spec.blocks)
    if layers is not None and factor is not None:
        raise OnnxgrowError("give --layers or --factor, not both")
    if layers is None and factor is None and at is None:
        raise OnnxgrowError("give --layers, --factor or --at")
    target = layers if layers is not None else num * factor if factor is not None else num + len(at)
    if at is not None:
        bad = [p for p in at if not 0 <= p < num]
        if bad:
            raise OnnxgrowError(f"--at positions must be block indices 0..{num - 1}, got {bad}")
        if target != num + len(at):
            raise OnnxgrowError(f"--at lists {len(at)} new blocks but the target adds {target - num}")
    if target <= num:
        raise OnnxgrowError(f"deepen needs more layers than the model's {num}; got {target}")
    plan = method_pass.plan(spec, target, at)
    blocks = block_graphs(spec)
    before = set(model.graph.initializers)
    zeroed = insert_after(model.graph, blocks, plan)
    record_io_names(model)
    for name in zeroed:
        v = model.graph.initializers[name]
        set_tensor(v, np.zeros_like(v.const_value.numpy()))
    if noise > 0:
        rng = np.random.default_rng(seed)
        for name in sorted(set(model.graph.initializers) - before - set(zeroed)):
            v = model.graph.initializers[name]
            w = v.const_value.numpy()
            # by the ONNX type: numpy files bfloat16 (ml_dtypes) under kind "V", not "f"
            if v.const_value.dtype.is_floating_point() and w.ndim >= 1:
                x = w.astype(np.float64)
                set_tensor(v, (x + rng.normal(0, noise * float(x.std()), w.shape)).astype(w.dtype))
    model.metadata_props["onnxgrow.history"] = (
        model.metadata_props.get("onnxgrow.history", "") + f"deepen:{method}:layers={target};")
    return model
