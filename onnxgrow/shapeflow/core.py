"""The dataflow walk and the helpers its rules share.

`ShapeFlow` walks the graph once, in order. For each node it looks up the rule registered in `RULES`
for (domain, op_type, the model's opset of that domain) and calls `rule(flow, node, ins)`, where
`ins` holds the input shapes (a list of `Dim`s per input, None where unknown). A rule writes the
output shapes with `flow.out`, the values of small shape tensors into `flow.vals`, unifies the Dims
that must agree, and records what a literal means with `flow.mean`. What it cannot explain it
records with `flow.fail` (or by raising `DimConflict`), and the walk goes on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import onnx_ir as ir

from ..dims import Dim, DimConflict, factors, product_of, unify
from ..registry import OpRegistry, canonical_domain

log = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1
SMALL_INT_TENSOR = 64  # larger int constants are data (masks, ids), not shapes
VIEW_THROUGH = {"Transpose", "Cast", "Identity", "CastLike"}  # ops a weight is read through as is

RULES = OpRegistry("dataflow rule")


@dataclass
class Elem:
    """One element of a shape-like int tensor."""
    dim: Dim | None = None  # the Dim whose size this element is (from Shape)
    value: int | None = None  # concrete value when known
    leaf: tuple[str, int] | None = None  # (initializer name, flat index) when it is a literal
    factors: tuple | None = None  # (a, b) when this literal is the product a * b of two literals

    @property
    def literal(self) -> bool:
        return self.dim is None and self.value is not None


@dataclass
class Meaning:
    """What a literal in a shape constant stands for: a size, or an offset (sum of segment sizes); for
    a list attribute (com.microsoft Attention's qkv_hidden_sizes), one size per element."""
    kind: str  # "size" | "offset" | "sizes"
    dims: list[Dim]

    def new_value(self, new_size) -> int | list[int]:
        if self.kind == "size":
            return new_size(self.dims[0])
        if self.kind == "sizes":
            return [new_size(d) for d in self.dims]
        return sum(new_size(d) for d in self.dims)


@dataclass
class Problem:
    node: ir.Node
    reason: str
    dims: list[Dim] = field(default_factory=list)

    def __str__(self):
        return f"{self.node.op_type} node {self.node.name!r}: {self.reason}"


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def optional_input(node: ir.Node, i: int) -> ir.Value | None:
    """The node's i-th input, or None where it is left out."""
    return node.inputs[i] if len(node.inputs) > i else None


class ShapeFlow:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.opset = self.graph.opset_imports.get("", 0)  # of the standard domain
        self.dims: dict[ir.Value, list[Dim] | None] = {}
        self.vals: dict[ir.Value, list[Elem]] = {}
        self.named: dict[str, Dim] = {}
        self.meanings: dict[tuple[str, int], Meaning] = {}
        self.derived: list[tuple[ir.Node, Meaning]] = []
        # {(node, attribute name): Meaning}: int attributes that are model sizes (Attention's head counts)
        self.attribute_meanings: dict[tuple[ir.Node, str], Meaning] = {}
        self.contracted: dict[str, set[int]] = {}  # initializer name -> axes summed over by MatMul/Gemm
        self.problems: list[Problem] = []
        self.run()

    # --- setup ----------------------------------------------------------------------------------
    def dim_for(self, d) -> Dim:
        if isinstance(d, int):
            return Dim(d)
        name = getattr(d, "value", None)
        if name is None:
            return Dim(None)
        if name not in self.named:
            self.named[name] = Dim(None, name=name)
        return self.named[name]

    def declared(self, v: ir.Value) -> list[Dim] | None:
        return None if v.shape is None else [self.dim_for(d) for d in v.shape]

    def opset_of(self, domain: str) -> int:
        """The model's opset of `domain`; 1 (the oldest rules) where the model does not import it."""
        imports = self.graph.opset_imports
        if canonical_domain(domain) == "":
            return imports.get("", imports.get("ai.onnx", 0)) or 1
        return imports.get(domain) or 1

    def run(self):
        for v in self.graph.inputs:
            self.dims[v] = self.declared(v)
        for name, v in self.graph.initializers.items():
            t = v.const_value
            self.dims[v] = [Dim(int(s)) for s in t.shape]
            if t.dtype in (ir.DataType.INT64, ir.DataType.INT32) and t.size <= SMALL_INT_TENSOR:
                flat = t.numpy().reshape(-1)
                self.vals[v] = [Elem(value=int(x), leaf=(name, i)) for i, x in enumerate(flat)]
        for node in self.graph:
            try:
                self.visit(node)
            except DimConflict as e:
                self.fail(node, str(e))
            for out in node.outputs:
                if out not in self.dims:
                    self.dims[out] = self.declared(out)

    def visit(self, node: ir.Node):
        rule = RULES.lookup(node.domain, node.op_type, self.opset_of(node.domain))
        if rule is None:
            return self.fail(node, RULES.missing(node.domain, node.op_type))
        rule(self, node, [self.shape(v) for v in node.inputs])

    def fail(self, node: ir.Node, reason: str):
        log.debug("dataflow problem at %s %r: %s", node.op_type, node.name, reason)
        involved = [d for v in node.inputs if v is not None for d in (self.dims.get(v) or [])]
        self.problems.append(Problem(node, reason, involved))
        for out in node.outputs:
            self.dims[out] = self.declared(out)

    def problems_if_resized(self, node: ir.Node, dim: Dim, reason: str):
        # recorded as a soft problem: harmless unless the Dim is resized later
        self.problems.append(Problem(node, reason, [dim]))

    def token_axes(self) -> list[Dim]:
        """The root Dims of the integer graph inputs' axes (ids, masks, positions: batch and sequence).
        In a static-shape export they have sizes like any model dimension; they are never one."""
        return [d.root() for v in self.graph.inputs if v.dtype in (ir.DataType.INT64, ir.DataType.INT32)
                for d in (self.dims.get(v) or [])]

    # --- reading inputs -------------------------------------------------------------------------
    def shape(self, v: ir.Value | None) -> list[Dim] | None:
        return None if v is None else self.dims.get(v)

    def elems(self, v: ir.Value | None) -> list[Elem] | None:
        return None if v is None else self.vals.get(v)

    def ints(self, v: ir.Value | None) -> list[int] | None:
        """Concrete values of a constant int input (axes, perms...)."""
        es = self.elems(v)
        if es is None or any(e.value is None for e in es):
            return None
        return [e.value for e in es]

    # --- writing results ------------------------------------------------------------------------
    def out(self, node: ir.Node, dims, i: int = 0):
        self.dims[node.outputs[i]] = dims

    def pass_values(self, node: ir.Node):
        """An op that keeps a shape vector's elements (Cast, Unsqueeze...) passes them on."""
        if node.inputs[0] in self.vals:
            self.vals[node.outputs[0]] = self.vals[node.inputs[0]]

    def mean(self, e: Elem, meaning: Meaning, node: ir.Node):
        """Record what a literal means; a literal reused for the same thing unifies."""
        if e.leaf is None and e.factors is not None and meaning.kind == "size":
            # kv_heads * n_rep written as a product of two literals: give each its factor
            a, b = e.factors
            fs = factors(meaning.dims[0])
            for k in range(len(fs) + 1):
                if math.prod(f.size or 0 for f in fs[:k]) == a.value and \
                        math.prod(f.size or 0 for f in fs[k:]) == b.value:
                    self.mean(a, Meaning("size", [product_of(fs[:k]) if k else Dim(1)]), node)
                    self.mean(b, Meaning("size", [product_of(fs[k:]) if k < len(fs) else Dim(1)]), node)
                    return
        if e.leaf is None:
            self.derived.append((node, meaning))
            return
        old = self.meanings.get(e.leaf)
        if old is None:
            self.meanings[e.leaf] = meaning
        elif old.kind == meaning.kind == "size":
            unify(old.dims[0], meaning.dims[0])
        elif old.kind != meaning.kind or len(old.dims) != len(meaning.dims):
            raise DimConflict(f"constant {e.leaf[0]} is used for two different things")
        else:
            for a, b in zip(old.dims, meaning.dims):
                unify(a, b)

    # --- shared by several rules ----------------------------------------------------------------
    def broadcast(self, shapes: list[list[Dim]]) -> list[Dim]:
        rank = max(len(s) for s in shapes)
        result = []
        for k in range(rank):
            col = [s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0]
            big = [d for d in col if d.size != 1]
            if not big:
                result.append(col[0])
                continue
            for d in big[1:]:
                unify(big[0], d)
            result.append(big[0])
        return result

    def source_initializer(self, v: ir.Value):
        """Follow a value back through Transpose/Cast to an initializer; map its axes."""
        perm = None
        while v is not None and not v.is_initializer():
            node = v.producer()
            if node is None or node.op_type not in VIEW_THROUGH:
                return None, None
            if node.op_type == "Transpose":
                p = attr(node, "perm") or list(reversed(range(len(self.dims[node.inputs[0]]))))
                perm = list(p) if perm is None else [p[i] for i in perm]
            v = node.inputs[0]
        if v is None:
            return None, None
        return v, perm

    def mark_contracted(self, v: ir.Value, axis: int):
        init, perm = self.source_initializer(v)
        if init is not None:
            rank = len(self.dims[v])
            axis = axis % rank
            self.contracted.setdefault(init.name, set()).add(perm[axis] if perm else axis)


def analyse(model: ir.Model) -> ShapeFlow:
    return ShapeFlow(model)
