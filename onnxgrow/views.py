"""Looking through ops that pass a value on unchanged: one walk, and the op sets it walks through.

Matching asks "where does this value really come from?": an embedding table gathered from a Cast of
it, ids reshaped before a lookup, a residual stream behind a Dropout. Each question looks through a
different set of ops, on purpose, so each set has a name here and says what it keeps.

(The dataflow analysis has its own set, shapeflow.VIEW_THROUGH: it also looks through Transpose,
because it maps a weight's axes through the permutation. The walks here must not: a transposed
value is not the same tensor.)
"""

from __future__ import annotations

import onnx_ir as ir

# Same values, perhaps in another dtype: a half-precision table behind a Cast is still the table.
CASTS = frozenset({"Cast", "CastLike", "Identity"})
# Same values on the residual stream: a Dropout is the identity at inference.
PASS_THROUGH = frozenset({"Cast", "Dropout", "Identity"})
# Same elements in another shape.
RESHAPES = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand"})
# Ops after which a tensor of token ids still holds the same ids (structure: which Gathers are
# looked up by a graph input).
IDS = PASS_THROUGH | RESHAPES
# The same question asked forward by validate (which input holds ids): it also looks through
# CastLike. The two sets differ only in Dropout (which cannot take integer ids) and CastLike; they
# are kept apart so that neither tool changes what it finds.
IDS_FORWARD = CASTS | RESHAPES
# Ops whose output is a shape, not data: dataflow walks do not follow values through them.
SHAPE_OF = frozenset({"Shape", "Size"})


def look_through(value: ir.Value, ops) -> ir.Value:
    """The value behind `value`: back through producers whose op is in `ops`, along their first input."""
    node = value.producer()
    while node is not None and node.op_type in ops and node.inputs and node.inputs[0] is not None:
        value = node.inputs[0]
        node = value.producer()
    return value


def reshaped_forward(value: ir.Value) -> ir.Value:
    """The same elements after the reshapes `value` alone feeds (tf2onnx's tensordot reshapes a
    projection's [b*s, out] back to [b, s, out] before its bias Add)."""
    while len(value.consumers()) == 1 and value.consumers()[0].op_type in RESHAPES - {"Expand"} \
            and value.consumers()[0].inputs[0] is value:
        value = value.consumers()[0].outputs[0]
    return value
