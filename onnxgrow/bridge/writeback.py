"""Writing a module's weights back into the ONNX model it was built from.

`write_back` gives a ModelProto (the same graph, the module's weights in its initializers);
`write_into` puts them into an onnx-ir model in place, for saving without a proto of the whole model.
Tied copies are written from their one Parameter, so they stay equal.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.tensor_adapters import TorchTensor

from ..errors import OnnxgrowError
from ..modelio import as_proto
from .module import OnnxModule
from .tensors import TORCH_DTYPE, tensor_to_bytes


def store(tp: onnx.TensorProto, value) -> None:
    """Put `value` (a torch tensor) into initializer `tp`, in tp's type. An unchanged value leaves tp
    as it was, so a round trip without training is bit-identical whatever encoding the exporter chose."""
    if tuple(value.shape) != tuple(tp.dims):
        raise OnnxgrowError(f"initializer {tp.name!r} is {list(tp.dims)}, the value is {list(value.shape)}")
    if tp.data_location == onnx.TensorProto.EXTERNAL:
        raise OnnxgrowError(f"initializer {tp.name!r} has its data outside the model; load it first")
    data = tensor_to_bytes(value, tp.data_type)
    if tp.HasField("raw_data"):
        if tp.raw_data != data:
            tp.raw_data = data
        return
    if onnx.numpy_helper.to_array(tp).tobytes() == data:
        return
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tp.ClearField(field)
    tp.raw_data = data


def write_back(module: OnnxModule, model=None) -> onnx.ModelProto:
    """`model` (default: what the module was built from) with the module's weights in its
    initializers. Tied copies are written from their one Parameter, so they stay equal."""
    model = module.source if model is None else model
    if model is None:
        raise OnnxgrowError("write_back needs the model the module was built from")
    proto = as_proto(model)
    by_name = {tp.name: tp for tp in proto.graph.initializer}
    missing = [n for n in module.float_initializers() if n not in by_name]
    if missing:
        raise OnnxgrowError(f"the model has no initializer {missing[0]!r}: the module was built from another model")
    for name in module.float_initializers():
        store(by_name[name], module.initializer(name))
    return proto


def write_into(module: OnnxModule, m: ir.Model) -> ir.Model:
    """Put the module's weights into onnx-ir model `m`, in place (train saves through this: the
    tensors stream to disk with modelio.save, with no ModelProto of the whole model in memory)."""
    for name in module.float_initializers():
        value = m.graph.initializers.get(name)
        if value is None:
            raise OnnxgrowError(f"the model has no initializer {name!r}: the module was built from another model")
        t = module.initializer(name).detach().to("cpu", TORCH_DTYPE[module.onnx_types[name]]).contiguous().clone()
        if tuple(t.shape) != tuple(value.const_value.shape):
            raise OnnxgrowError(f"initializer {name!r} is {list(value.const_value.shape)}, "
                                f"the module's {list(t.shape)}")
        value.const_value = TorchTensor(t, name=name)
    return m
