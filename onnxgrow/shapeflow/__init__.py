"""Dataflow analysis: which model dimension does each axis and each shape constant measure?

One forward walk over the graph gives every tensor a list of `Dim`s (one per axis) and every small
integer tensor that feeds a shape (Reshape targets, Split sizes, Slice bounds, Expand shapes) a list of
symbolic elements. Ops unify the Dims that must agree; a literal in a shape constant gets its meaning
from the axis it ends up measuring. Nothing is matched by name or by value: a 64 that is a position
count and a 64 that is the hidden size end up as different Dims because they flow to different places.

What an op's rule cannot explain is recorded as a problem (node, reason, Dims involved); a rewrite
refuses when a problem touches a Dim it is about to resize.

    core.py            the walk (`ShapeFlow`), `Elem`, `Meaning`, `Problem` and the shared helpers
    rules/             one rule per op, registered in `RULES` by (domain, op_type, since-opset):
      elementwise.py   unary, broadcasting (with arithmetic on run-time sizes), reductions
      linear.py        MatMul, Gemm
      shape.py         Shape, Reshape, Expand, Squeeze, Unsqueeze, Transpose, Range...
      slicing.py       Split, Slice, Concat, Gather...
      norms.py         LayerNormalization, RMSNormalization
      fused.py         ONNX Runtime's fused norms and activations (SkipLayerNormalization, FastGelu...)
      attention.py     Attention, RotaryEmbedding (opset 23), and node attributes that count heads
"""

from . import rules  # noqa: F401  (registers every rule in RULES)
from .core import (INT64_MAX, RULES, SMALL_INT_TENSOR, VIEW_THROUGH, Elem, Meaning, Problem, ShapeFlow,
                   analyse, attr)
from .rules.elementwise import BROADCAST, MICROSOFT_UNARY, REDUCE, UNARY

__all__ = ["INT64_MAX", "RULES", "SMALL_INT_TENSOR", "VIEW_THROUGH", "Elem", "Meaning", "Problem",
           "ShapeFlow", "analyse", "attr", "BROADCAST", "MICROSOFT_UNARY", "REDUCE", "UNARY"]
