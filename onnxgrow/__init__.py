"""onnxgrow: grow and shrink pretrained transformers at the ONNX graph level.

    import onnxgrow
    onnxgrow.inspect(model)                      # the configuration found in the graph, a dict
    onnxgrow.widen(model, factor=2)              # HyperCloning, FPI, AKI or padding
    onnxgrow.deepen(model, layers=8)             # identity, stack or interleave
    onnxgrow.subclone(model, ids, hidden=128)    # a smaller model chosen from a larger one
    onnxgrow.validate(source, target)            # compare outputs in ONNX Runtime: a Report
    onnxgrow.train(model, data, steps=100)       # with the `train` extra (torch)

A model is a path, an onnx.ModelProto or an onnx_ir.Model; the result has the kind given (a
ModelProto for a path). See onnxgrow/api.py. Importing onnxgrow does not import torch.
"""

import importlib
import types

from . import api
from .api import deepen, inspect, structure, widen  # noqa: F401
from .errors import OnnxgrowError  # noqa: F401

__version__ = "0.1.0"


class _CallableModule(types.ModuleType):
    """A module that is also its API function: `onnxgrow.validate(...)` calls api.validate.

    onnxgrow.subclone, onnxgrow.validate and onnxgrow.train name both an API function and the module
    that implements it. Binding the function over the module would break `import onnxgrow.validate
    as v` and patching the module; making the module callable keeps both working."""

    def __call__(self, *args, **kwargs):
        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _callable(module: types.ModuleType) -> types.ModuleType:
    module.__class__ = _CallableModule
    return module


from . import subclone, validate  # noqa: E402  (after api: the modules the functions implement)

_callable(subclone)
_callable(validate)


def __getattr__(name: str):
    # on first use, as it imports torch; `from onnxgrow.train import x` skips this (and leaves the
    # module plain), so onnxgrow's own code imports it as `from . import train`
    if name == "train":
        return _callable(importlib.import_module(".train", __name__))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
