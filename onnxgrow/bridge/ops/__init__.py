"""The torch implementation of each ONNX op the bridge runs, in one registry.

Each op is `fn(dev, attrs, *inputs)`, registered with `OPS.register(op_type, domain=, since=, host=)`.
`attrs` is the node's attributes as Python values, plus `_op` (the op type), `_name` (the node name),
`_nout` (how many outputs the node has) and, for ConstantOfShape, `_fill` (value, dtype). A host
variant `host(attrs, *inputs)` runs instead when every input is a host value (see `tensors`), and
may answer NotImplemented to fall back on the tensor op.

`since` is the opset where an op's inputs or attributes changed (Unsqueeze's axes moved from an
attribute to an input at 13): the module picks, per node, the implementation for the model's opset.
The ops are grouped by family: `elementwise` (math, comparisons, casts, activations), `neural`
(matrix products, softmax, norms, reductions), `indexing` (gather, scatter, slice), `shapes` and
`attention` (opset 23's Attention and RotaryEmbedding, ONNX Runtime's GroupQueryAttention), `contrib_attention` (ONNX
Runtime's Attention and MultiHeadAttention) and `fused` (ONNX Runtime's fused norms and activations).
"""

from ...registry import OpRegistry

OPS = OpRegistry("torch implementation")

from . import attention, contrib_attention, elementwise, fused, indexing, neural, shapes  # noqa: E402,F401  (each registers its ops in OPS)
