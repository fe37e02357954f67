"""The size table: the target size of every role Dim, from the sizes a user asks for.

widen and subclone both resize the same Dims (hidden, key/value heads, query group, each FFN) and
keep head_dim, so a new hidden size decides the rest unless the user gives it: heads follow hidden,
key/value heads keep the group size, each FFN keeps its ratio to hidden. Each command adds its own
checks (widen cannot shrink, subclone cannot grow).
"""

from __future__ import annotations

from .errors import OnnxgrowError
from .structure import TransformerSpec, distinct


def head_counts(spec: TransformerSpec, hidden: int, heads: int | None = None,
                kv_heads: int | None = None) -> tuple[int, int]:
    """(query heads, key/value heads) for the target hidden size, each derived unless given."""
    old_hidden, old_heads, old_kv = spec.hidden.size, spec.heads.size, spec.kv_heads.size
    if heads is None:
        heads = old_heads * hidden / old_hidden
        if heads != int(heads) or heads < 1:
            raise OnnxgrowError(f"hidden {hidden} does not give a whole number of heads; pass --heads")
        heads = int(heads)
    if kv_heads is None:
        kv_heads = heads if spec.group is None else max(heads // (old_heads // old_kv), 1)
    if heads < 1 or kv_heads < 1:
        raise OnnxgrowError(f"--heads and --kv-heads must be at least 1, got {heads} and {kv_heads}")
    if spec.group is None and kv_heads != heads:
        raise OnnxgrowError("this model has as many key/value heads as query heads; --kv-heads must equal --heads")
    if heads % kv_heads:
        raise OnnxgrowError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    return heads, kv_heads


def role_sizes(spec: TransformerSpec, hidden: int, heads: int, kv_heads: int, ffn: int | None = None) -> dict:
    """{Dim: target size} for every role Dim of `spec` (heads and kv_heads: from head_counts)."""
    sizes = {spec.hidden: hidden}
    for d in distinct(b.attention.kv_heads for b in spec.blocks):
        sizes[d] = kv_heads
    for d in distinct(b.attention.group for b in spec.blocks):
        sizes[d] = heads // kv_heads
    for d in distinct(spec.ffn):
        sizes[d] = ffn if ffn is not None else max(round(d.size * hidden / spec.hidden.size), 1)
    return sizes


def describe(sizes: dict) -> str:
    """`ffn=1024,hidden=256,...`: the sizes by role, as the history records them."""
    return ",".join(sorted({f"{d.role}={n}" for d, n in sizes.items()}))
