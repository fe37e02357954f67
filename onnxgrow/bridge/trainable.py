"""Which initializers train, and which are tied copies of the token embedding.

Trainable: the model's parameters as the structure analysis counts them (`structure.parameter_names`:
float weights that carry a model dimension - weights, biases, norms, embeddings); constants that carry
none (rotary frequencies, sqrt(head_dim), mask fill values) stay frozen buffers. If the structure
cannot be analysed, every float initializer of rank >= 1 with more than one element trains.

Tied: TorchScript exports of tied models (GPT-2, OPT, BERT-MLM) store the token embedding twice,
`wte [V, H]` for the Gather and an anonymous `[H, V]` copy for the LM head. Every initializer equal to
the embedding (as is, or transposed) is served from the embedding's one Parameter.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from ..errors import OnnxgrowError
from .tensors import FLOAT_TYPES

log = logging.getLogger(__name__)


def weight_plan(m: ir.Model) -> tuple[set[str], dict[str, tuple[str, bool]]]:
    """(names of trainable initializers, {tied copy: (base name, transposed)}) from the structure."""
    from .. import api
    from ..structure import parameter_names
    floats = {name: v for name, v in m.graph.initializers.items()
              if v.const_value is not None and int(v.const_value.dtype) in FLOAT_TYPES}
    try:
        spec = api.structure(m)
    except OnnxgrowError as e:
        log.debug("no transformer structure (%s): every float tensor of more than one element trains", e)
        return {name for name, v in floats.items() if len(v.shape) >= 1 and v.const_value.size > 1}, {}
    # parameter_names reads the analysed copy of the model, which also holds the Constant nodes the
    # normaliser lifted to initializers (those stay constants here) and may count float8 weights (no
    # autograd in torch): keep the float initializers of this model only
    trainable = {name for name in parameter_names(spec) if name in floats}
    base = spec.token_embedding.name
    ties = tied_copies(floats, base)
    # parameter_names drops the LM head's copy of a tied embedding only; every copy is tied here
    trainable.add(base)
    return trainable - set(ties), ties


def tied_copies(floats: dict[str, ir.Value], base: str) -> dict[str, tuple[str, bool]]:
    """{name: (base, transposed)} for every 2-D float initializer equal to `base` (as is or transposed)."""
    from ..structure import same_values
    table = floats.get(base)
    if table is None:
        return {}
    ties = {}
    for name, v in floats.items():
        if v is table or v.const_value.size != table.const_value.size or len(v.shape) != 2:
            continue
        if same_values(v, table):
            ties[name] = (base, tuple(v.shape) != tuple(table.shape))
    return ties
