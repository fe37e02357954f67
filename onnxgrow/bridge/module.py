"""OnnxModule: an ONNX graph as a torch.nn.Module, and `to_torch`, which builds one.

The module is an interpreter: initializers become Parameters (the trainable ones, see `trainable`) or
buffers and host values (constants), and `forward` runs the planned steps (see `steps`) in order.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from .. import modelio
from ..errors import OnnxgrowError, first_line
from .steps import last_uses, node_label, plan_steps
from .tensors import FLOAT_TYPES, T, from_numpy, host_or_tensor, tensor_from_ir
from .trainable import weight_plan

log = logging.getLogger(__name__)

# What an op raises when the graph cannot run as given (shapes that do not fit, an index out of range,
# a division by zero in shape arithmetic): reported as the node that failed, like ONNX Runtime does.
# Other exceptions (TypeError, AttributeError, ...) are bugs of the bridge and stay unforeseen errors.
RUN_ERRORS = (RuntimeError, ValueError, IndexError, ZeroDivisionError, OverflowError)


def param_key(name: str, taken: set) -> str:
    """A free attribute name for initializer `name` (torch wants identifiers without dots)."""
    key = re.sub(r"\W", "_", name) or "w"
    key = "w_" + key if key[0].isdigit() else key
    base, i = key, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    taken.add(key)
    return key


class OnnxModule(nn.Module):
    """An ONNX graph run with torch ops. Build it with `to_torch`.

    forward(*inputs, **named_inputs) takes the graph inputs by position (graph-input order) or by
    name; numpy arrays are accepted, and inputs are moved to the module's device. It returns a dict
    {output name: tensor} in graph-output order (`list(out.values())` gives the tuple form).
    """

    def __init__(self, m: ir.Model, trainable: set[str], ties: dict[str, tuple[str, bool]], source=None):
        super().__init__()
        self.source = source  # what to_torch was given: write_back's default target
        graph = m.graph
        self.input_names = [v.name for v in graph.inputs if not v.is_initializer()]
        self.output_names = [v.name for v in graph.outputs]
        self.onnx_types: dict[str, int] = {}  # float initializer -> ONNX type, for writing back
        self.keys: dict[str, str] = {}  # initializer -> parameter/buffer attribute
        self.tied = dict(ties)  # tied copy -> (base initializer, stored transposed)
        self._host: dict[str, object] = {}
        self._float_constants: dict[str, torch.Tensor] = {}  # buffer -> its value as the graph has it
        taken: set = set()
        for name, v in graph.initializers.items():
            if v.const_value is None:
                continue
            if int(v.const_value.dtype) in FLOAT_TYPES:
                self.onnx_types[name] = int(v.const_value.dtype)
            if name not in ties:  # a tied copy is served from its base's Parameter
                self._add_constant(name, tensor_from_ir(v.const_value), name in trainable, taken)

        self._steps = plan_steps(graph, lambda name, t: self._add_constant(name, t, False, taken))
        self._device_key = next(iter(self.keys.values()), None)
        self._drops = last_uses(self._steps, set(self.output_names))
        produced = {n for step in self._steps for n in step.outputs}
        missing = [n for n in self.output_names if n not in self.keys and n not in self._host
                   and n not in self.input_names and n not in ties and n not in produced]
        if missing:
            raise OnnxgrowError(f"graph outputs with no producer: {', '.join(missing)}")

    def _add_constant(self, name, t, trainable, taken):
        if trainable:
            self.keys[name] = key = param_key(name, taken)
            self.register_parameter(key, nn.Parameter(t))
            return
        value = host_or_tensor(t)
        if isinstance(value, torch.Tensor):
            self.keys[name] = key = param_key(name, taken)
            self.register_buffer(key, t, persistent=False)  # a graph constant: nothing to save
            if t.dtype.is_floating_point:
                self._float_constants[key] = t
        else:
            self._host[name] = value

    def _apply(self, fn, recurse=True):
        # module.to(dtype) / .bfloat16() casts the weights, not the graph's constants: a float32 mask
        # fill value like -3.4e38 is -inf in bf16, and 0 * -inf makes NaNs. They follow the device only.
        super()._apply(fn, recurse)
        for key, original in self._float_constants.items():
            buffer = self._buffers[key]
            if buffer.dtype != original.dtype:
                self._buffers[key] = original.to(buffer.device)
        return self

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return (f"{len(self._steps)} nodes, {n:,} trainable weights in {len(list(self.parameters()))} "
                f"parameters, inputs {self.input_names}, outputs {self.output_names}")

    # --- weights by initializer name ---

    def initializer(self, name: str) -> torch.Tensor:
        """The current value of a float initializer, in the layout the graph stores it."""
        if name in self.tied:
            base, transposed = self.tied[name]
            t = getattr(self, self.keys[base])
            return t.t() if transposed else t
        if name not in self.keys:
            raise OnnxgrowError(f"the module holds no initializer {name!r}")
        return getattr(self, self.keys[name])

    def parameter(self, name: str) -> nn.Parameter | None:
        """The Parameter that holds initializer `name` (the shared one for a tied copy)."""
        name = self.tied[name][0] if name in self.tied else name
        t = getattr(self, self.keys[name]) if name in self.keys else None
        return t if isinstance(t, nn.Parameter) else None

    def float_initializers(self) -> list[str]:
        return list(self.onnx_types)

    @torch.no_grad()
    def set_initializers(self, values: dict[str, torch.Tensor]) -> None:
        """Write values (in the initializers' stored layouts) into the module's weights."""
        done = {}
        for name, value in values.items():
            if name not in self.onnx_types:
                raise OnnxgrowError(f"the module holds no float initializer {name!r}")
            target_name, transposed = self.tied.get(name, (name, False))
            value = value.t() if transposed else value
            target = getattr(self, self.keys[target_name])
            if tuple(value.shape) != tuple(target.shape):
                raise OnnxgrowError(f"{name}: shape {list(value.shape)} does not fit {list(target.shape)}")
            value = value.to(target.device, target.dtype)
            if target_name in done and not torch.equal(done[target_name], value):
                raise OnnxgrowError(f"{name} is tied to {target_name} but the values given differ")
            target.copy_(value)
            done[target_name] = value

    # --- running ---

    def device(self) -> torch.device:
        # by attribute name: torch.compile cannot trace next(iter(self.parameters()))
        return getattr(self, self._device_key).device if self._device_key else torch.device("cpu")

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        dev = self.device()
        env = dict(self._host)
        for name, key in self.keys.items():
            env[name] = getattr(self, key)
        for name, (base, transposed) in self.tied.items():
            env[name] = env[base].t() if transposed else env[base]
        env.update(self._bind(args, kwargs, dev))
        a = None
        try:
            for (fn, host, ins, outs, a), drop in zip(self._steps, self._drops):
                xs = [env[n] if n is not None else None for n in ins]
                result = NotImplemented
                if host is not None and all(not isinstance(x, torch.Tensor) for x in xs):
                    result = host(a, *xs)
                if result is NotImplemented:
                    result = fn(dev, a, *xs)
                if len(outs) == 1:
                    env[outs[0]] = result
                else:
                    for n, r in zip(outs, result):
                        if n is not None:
                            env[n] = r
                for n in drop:
                    del env[n]
        except RUN_ERRORS as e:
            reason = first_line(e) or type(e).__name__
            raise OnnxgrowError(f"the torch bridge could not run {node_label(a)}: {reason}") from e
        return {n: T(env[n], dev) for n in self.output_names}

    def _bind(self, args, kwargs, dev) -> dict:
        if len(args) > len(self.input_names):
            raise OnnxgrowError(f"the graph takes {len(self.input_names)} inputs, got {len(args)}")
        feeds = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name not in self.input_names:
                raise OnnxgrowError(f"the graph has no input {name!r} (inputs: {', '.join(self.input_names)})")
            if name in feeds:
                raise OnnxgrowError(f"input {name!r} given twice")
            feeds[name] = value
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OnnxgrowError(f"missing graph inputs: {', '.join(missing)}")
        out = {}
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = from_numpy(value)
            out[name] = value.to(dev) if isinstance(value, torch.Tensor) and value.device != dev else value
        return out


def load_ir(model) -> ir.Model:
    """The graph to execute; a path is loaded, a proto wrapped, an onnx-ir model used as it is."""
    m = modelio.as_ir(model, copy=False)
    if len(m.functions):  # exporters may wrap blocks in local functions: run their bodies inline
        from onnx.inliner import inline_local_functions
        m = ir.from_proto(inline_local_functions(ir.to_proto(m)))
    return m


def to_torch(model) -> OnnxModule:
    """A torch module that computes what the ONNX model computes, with trainable weights.

    `model`: a path, an onnx.ModelProto or an onnx_ir.Model (read, never changed).
    """
    m = load_ir(model)
    trainable, ties = weight_plan(m)
    module = OnnxModule(m, trainable, ties, source=model)
    log.debug("torch bridge: %d trainable, %d tied initializers", len(trainable), len(ties))
    return module
