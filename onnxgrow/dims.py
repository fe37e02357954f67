"""Model dimensions as shared, refinable symbols.

Every axis of every tensor in the graph (weights, activations, shape constants) measures some `Dim`.
When dataflow shows two axes must have the same size (a MatMul contraction, a broadcast Add, a
Reshape that splits 64 into 4 x 16) their Dims are unified, so after one walk over the graph each
model dimension is one symbol that knows every place it appears. A Dim can be refined into parts:

    prod: the axis is laid out as a row-major product of its parts  (heads x head_dim)
    cat:  the axis is a concatenation of segments                    (q | k | v of a fused QKV)

Roles (hidden, heads, ...) are attached to Dims later by the structure matcher; resizing a role then
resizes every axis and constant that measures it, and nothing else.
"""

from __future__ import annotations

import itertools
import math


class DimConflict(Exception):
    pass


class Dim:
    _ids = itertools.count()

    def __init__(self, size: int | None, name: str | None = None):
        self.id = next(Dim._ids)
        self._size = size  # None: dynamic (batch, sequence)
        self.name = name
        self.parent: Dim | None = None
        self.kind: str | None = None  # "prod" or "cat" once refined
        self.parts: list[Dim] = []
        self.role: str | None = None

    # --- identity -------------------------------------------------------------------------------
    def root(self) -> Dim:
        d = self
        while d.parent is not None:
            d = d.parent
        # path compression keeps later lookups cheap on deep models
        node = self
        while node.parent is not None and node.parent is not d:
            node.parent, node = d, node.parent
        return d

    @property
    def size(self) -> int | None:
        r = self.root()
        if r.kind == "prod":
            sizes = [p.size for p in r.parts]
            return None if None in sizes else math.prod(sizes)
        if r.kind == "cat":
            sizes = [p.size for p in r.parts]
            return None if None in sizes else sum(sizes)
        return r._size

    def __repr__(self) -> str:
        r = self.root()
        label = r.role or r.name or f"d{r.id}"
        if r.kind:
            sep = "*" if r.kind == "prod" else "|"
            return f"({sep.join(repr(p) for p in r.parts)})"
        return f"{label}:{r._size}"


def same(a: Dim, b: Dim) -> bool:
    return a.root() is b.root()


def factors(d: Dim) -> list[Dim]:
    """The row-major factors of an axis: a prod is flattened, anything else is one factor."""
    r = d.root()
    if r.kind == "prod":
        return [f for p in r.parts for f in factors(p)]
    return [r]


def atoms(d: Dim) -> list[Dim]:
    """Every unrefined Dim inside `d`, through products and concatenations alike."""
    r = d.root()
    if r.kind:
        return [a for p in r.parts for a in atoms(p)]
    return [r]


def product_of(parts: list[Dim]) -> Dim:
    if len(parts) == 1:
        return parts[0].root()
    d = Dim(None)
    d.kind, d.parts = "prod", list(parts)
    return d


def refine(d: Dim, kind: str, sizes: list[int | None]) -> list[Dim]:
    """Split an unrefined Dim into new parts of the given sizes (or reuse an equal refinement)."""
    r = d.root()
    if r.kind == kind and [p.size for p in r.parts] == sizes:
        return [p.root() for p in r.parts]
    if r.kind is not None:
        raise DimConflict(f"{r} is already split differently")
    total = math.prod(sizes) if kind == "prod" else sum(sizes)
    if r._size is not None and r._size != total:
        raise DimConflict(f"cannot split {r} into {sizes}")
    r.kind, r.parts = kind, [Dim(s) for s in sizes]
    return r.parts


def unify(a: Dim, b: Dim) -> None:
    a, b = a.root(), b.root()
    if a is b:
        return
    if a.size is not None and b.size is not None and a.size != b.size:
        raise DimConflict(f"size mismatch {a} vs {b}")
    if a.role and b.role and a.role != b.role:
        raise DimConflict(f"role mismatch {a} vs {b}")
    if a.kind is None or b.kind is None:
        # the unrefined one adopts the other's refinement
        keep, drop = (b, a) if a.kind is None else (a, b)
        if keep.kind is not None and any(p.root() is drop for p in atoms(keep)):
            raise DimConflict(f"{drop} would be a part of itself")
        if keep.kind is None and keep._size is None:
            keep._size = drop._size
        keep.role = keep.role or drop.role
        keep.name = keep.name or drop.name
        drop.parent = keep
        return
    if a.kind == b.kind and len(a.parts) == len(b.parts) and all(
            p.size == q.size for p, q in zip(a.parts, b.parts)):
        for p, q in zip(a.parts, b.parts):
            unify(p, q)
    elif a.kind == b.kind == "prod":
        align_products(factors(a), factors(b))
    else:
        raise DimConflict(f"cannot match {a} with {b}")
    a, b = a.root(), b.root()
    if a is not b:
        b.role = b.role or a.role
        a.parent = b


def take(seq: list[Dim], pos: int, size: int, reverse: bool = False) -> tuple[list[Dim], int]:
    """Consume factors of `seq` from `pos` whose product is `size`, splitting a factor if needed.

    Returns the consumed factors and the new position. `seq` is updated in place when a factor is split.
    With `reverse`, `seq` lists the factors right to left, so a split keeps the needed part on the right.
    """
    taken, prod = [], 1
    while prod < size:
        if pos >= len(seq):
            raise DimConflict(f"no factors left for {size}")
        f = seq[pos].root()
        if f.size == 1 and f.kind is None:
            # A unit axis (a static batch of 1, an unsqueezed axis) multiplies nothing: left out, so
            # that it is not glued to the model dimension that follows it.
            pos += 1
            continue
        if f.size is None:
            raise DimConflict(f"literal {size} meets dynamic {f}")
        need = size // prod
        if f.size <= need and need % f.size == 0:
            taken.append(f)
            prod *= f.size
            pos += 1
        elif f.size % need == 0 and f.kind is None:
            if reverse:
                head, tail = refine(f, "prod", [f.size // need, need])
                seq[pos:pos + 1] = [tail, head]
            else:
                head, tail = refine(f, "prod", [need, f.size // need])
                seq[pos:pos + 1] = [head, tail]
        else:
            raise DimConflict(f"{size} does not align with {f}")
    return taken, pos


def align_products(fa: list[Dim], fb: list[Dim]) -> None:
    fa, fb = list(fa), list(fb)
    i = j = 0
    while i < len(fa) and j < len(fb):
        a, b = fa[i].root(), fb[j].root()
        if a.size is None or b.size is None or a.size == b.size:
            unify(a, b)
            i, j = i + 1, j + 1
        elif a.size < b.size:
            taken, j2 = take(fb, j, a.size)
            unify(a, product_of(taken))
            i, j = i + 1, j2
        else:
            taken, i2 = take(fa, i, b.size)
            unify(b, product_of(taken))
            i, j = i2, j + 1
    rest = [d for d in fa[i:] + fb[j:] if d.size != 1]
    if rest:
        raise DimConflict(f"products differ in length: {rest}")


def segments(d: Dim) -> list[Dim]:
    """The leaf segments of a concatenation, left to right."""
    r = d.root()
    if r.kind == "cat":
        return [s for p in r.parts for s in segments(p)]
    return [r]


def cut(d: Dim, offset: int) -> None:
    """Make `offset` a segment boundary inside `d`, refining nested segments as needed."""
    r = d.root()
    if offset <= 0 or r.size is None or offset >= r.size:
        return
    if r.kind == "cat":
        start = 0
        for p in r.parts:
            if start < offset < start + p.size:
                cut(p, offset - start)
            start += p.size
        return
    refine(r, "cat", [offset, r.size - offset])
