"""Run an ONNX transformer as a torch.nn.Module, train it, and write the weights back.

    module = to_torch("wide.onnx")          # float weights become nn.Parameters
    out = module(input_ids=ids, attention_mask=mask)   # {"logits": ...}, in graph-output order
    ...train module with any torch optimizer...
    proto = write_back(module, "wide.onnx") # the same graph, trained weights in its initializers

The module is an interpreter: `forward` walks the graph's nodes in order and runs each with torch
ops, so shape computations (Shape, Gather, Concat, Reshape targets, ...) run on every call and any
batch or sequence length works, as in ONNX Runtime.

Shape arithmetic is kept off the tensor path: small int tensors (shapes, axes, indices of at most 64
elements) are held as Python ints and lists ("host values"), and ops whose inputs are all host
values compute in Python. That costs no kernel launches, no device syncs, and lets torch.compile see
static sizes (or SymInts) instead of data-dependent tensors. A host value meets a tensor op only
where the graph mixes them; it is turned into a tensor there.

Which initializers train: float initializers that carry a model dimension (hidden, FFN, heads,
vocab), as found by the structure analysis - weights, biases, norms, embeddings. Float constants that
carry none (rotary inverse frequencies, scalars like sqrt(head_dim), mask fill values) stay frozen
buffers. If the structure cannot be analysed, every float initializer of rank >= 1 with more than one
element trains.

Tied weights: an initializer that feeds several nodes is one Parameter. TorchScript exports of tied
models (GPT-2, OPT, BERT-MLM) store the token embedding twice: `wte [V, H]` for the Gather and an
anonymous `[H, V]` copy for the LM head MatMul. Every initializer equal to the token embedding (as
is, or transposed) is served from the embedding's one Parameter (a transpose view when needed), so
the head and the embedding stay tied during training, and `write_back` writes both copies from it.

Numerics: float32 results match ONNX Runtime to ~1e-6 on the zoo. Under bf16/fp16 autocast, ops that
need range or precision (Softmax, LayerNormalization, reductions, Pow, Sqrt, Erf, Exp, Log,
Reciprocal, CumSum) upcast their input to float32 and return float32. Casting the module
(module.bfloat16()) casts its Parameters only: graph constants keep their type, since a float32 mask
fill value such as -3.4e38 is -inf in bf16. Dropout nodes are identities: exports are inference graphs.

The package, by job: `tensors` (dtype tables, host values, ONNX <-> torch tensors), `ops` (the torch
implementation of each op, in an OpRegistry keyed by domain, op type and opset), `steps` (nodes to
interpreter steps), `trainable` (which initializers train, tied copies), `module` (OnnxModule,
to_torch) and `writeback` (store, write_back, write_into).
"""

from __future__ import annotations

from ..modelio import as_proto
from .module import RUN_ERRORS, OnnxModule, load_ir, param_key, to_torch
from .ops import OPS
from .tensors import (FLOAT_TYPES, HOST_MAX, LOW_PRECISION, TORCH_DTYPE, from_numpy, host_or_tensor, tensor_from_ir,
                      tensor_to_bytes)
from .trainable import weight_plan
from .writeback import store, write_back, write_into

__all__ = [
    "FLOAT_TYPES", "HOST_MAX", "LOW_PRECISION", "OPS", "RUN_ERRORS", "TORCH_DTYPE", "OnnxModule", "as_proto",
    "from_numpy", "host_or_tensor", "load_ir", "param_key", "store", "tensor_from_ir", "tensor_to_bytes", "to_torch",
    "weight_plan", "write_back", "write_into",
]
