"""onnxgrow: grow and shrink pretrained transformers at the ONNX graph level.

    import onnxgrow
    onnxgrow.inspect(model)                      # the configuration found in the graph, a dict
    onnxgrow.widen(model, factor=2)              # HyperCloning, FPI, AKI or padding
    onnxgrow.deepen(model, layers=8)             # identity, stack or interleave
    onnxgrow.subclone(model, ids, hidden=128)    # a smaller model chosen from a larger one
    onnxgrow.validate(source, target)            # compare outputs in ONNX Runtime: a Report
    onnxgrow.dequantize(model)                   # int4/int8 weights to float, before growing
    onnxgrow.train(model, data, steps=100)       # with the `train` extra (torch)
    onnxgrow.export_hf(model, "hf/")             # a Hugging Face transformers folder; import_hf back

A model is a path, an onnx.ModelProto or an onnx_ir.Model; the result has the kind given (a
ModelProto for a path). See onnxgrow/api.py. Importing onnxgrow does not import torch.
"""

from .api import deepen, dequantize, export_hf, import_hf, inspect, structure, subclone, validate, widen  # noqa: F401
from .errors import OnnxgrowError  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name: str):
    # `train` on first use only: it imports torch, which plain graph rewrites do not need
    if name == "train":
        from .api import train
        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
