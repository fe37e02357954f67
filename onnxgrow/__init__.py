"""onnxgrow: grow and shrink pretrained transformers at the ONNX graph level."""

from .api import inspect, structure, widen  # noqa: F401
from .errors import OnnxgrowError  # noqa: F401

__version__ = "0.1.0"
