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

import onnx
import onnx_ir as ir

from . import modelio
from .errors import OnnxgrowError
from .resize import Resizer
from .structure import TransformerSpec, load_structure

WIDEN_METHODS = ("hypercloning", "fpi", "pad")


def as_ir(model) -> ir.Model:
    """Accept a path, an onnx.ModelProto or an onnx-ir Model; always work on a private copy."""
    if isinstance(model, (str, os.PathLike)):
        return modelio.load(model)
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    if isinstance(model, ir.Model):
        return ir.from_proto(ir.to_proto(model))
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
        kv_heads = kv_heads or (heads if spec.group is None else round(old_kv * factor))
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
    sizes = {spec.hidden: hidden, spec.kv_heads: kv_heads}
    if spec.group is not None:
        sizes[spec.group] = heads // kv_heads
    for d in {id(d.root()): d.root() for d in spec.ffn}.values():
        sizes[d] = ffn if ffn is not None else round(d.size * ratio)
    for d, n in sizes.items():
        if n < d.size:
            raise OnnxgrowError(f"widen cannot shrink ({d.role} {d.size} -> {n}); use subclone")
    return sizes


def load_pass(method: str):
    if method not in WIDEN_METHODS:
        raise OnnxgrowError(f"unknown method {method!r}; choose one of {', '.join(WIDEN_METHODS)}")
    return importlib.import_module(f"passes.{method}")


def widen(model, factor: float | None = None, *, hidden: int | None = None, heads: int | None = None,
          kv_heads: int | None = None, ffn: int | None = None, method: str = "hypercloning",
          noise: float = 0.0, seed: int = 0) -> onnx.ModelProto:
    """A wider model that starts from the source's knowledge (function-preserving for hypercloning)."""
    wide = widen_ir(as_ir(model), factor, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn,
                    method=method, noise=noise, seed=seed)
    return ir.to_proto(wide)


def widen_ir(model: ir.Model, factor=None, *, hidden=None, heads=None, kv_heads=None, ffn=None,
             method="hypercloning", noise=0.0, seed=0) -> ir.Model:
    method_pass = load_pass(method)
    if noise < 0:
        raise OnnxgrowError(f"--noise must be non-negative, got {noise}")
    spec = load_structure(model)
    sizes = widen_sizes(spec, factor, hidden, heads, kv_heads, ffn)
    plans = method_pass.plans(spec, sizes, seed=seed)
    model = Resizer(spec, plans).apply(method_pass.rule(noise=noise, seed=seed))
    model.metadata_props["onnxgrow.history"] = (
        model.metadata_props.get("onnxgrow.history", "") + f"widen:{method}:" +
        ",".join(f"{d.role}={n}" for d, n in sizes.items()) + ";")
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
