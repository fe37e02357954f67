"""The dataflow rules, one module per family of ops; importing this package registers them all."""

from . import attention, contrib_attention, elementwise, fused, linear, norms, shape, slicing  # noqa: F401  (registration side effects)
