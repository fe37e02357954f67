"""Dataflow analysis: which model dimension does each axis and each shape constant measure?

One forward walk over the graph gives every tensor a list of `Dim`s (one per axis) and every small
integer tensor that feeds a shape (Reshape targets, Split sizes, Slice bounds, Expand shapes) a list of
symbolic elements. Ops unify the Dims that must agree; a literal in a shape constant gets its meaning
from the axis it ends up measuring. Nothing is matched by name or by value: a 64 that is a position
count and a 64 that is the hidden size end up as different Dims because they flow to different places.

What an op handler cannot explain is recorded as a problem (node, reason, Dims involved); a rewrite
refuses when a problem touches a Dim it is about to resize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .dims import Dim, DimConflict, cut, factors, product_of, refine, segments, take, unify

INT64_MAX = 2**63 - 1
SMALL_INT_TENSOR = 64  # larger int constants are data (masks, ids), not shapes


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
    """What a literal in a shape constant stands for: a size, or an offset (sum of segment sizes)."""
    kind: str  # "size" | "offset"
    dims: list[Dim]

    def new_value(self, new_size) -> int:
        if self.kind == "size":
            return new_size(self.dims[0])
        return sum(new_size(d) for d in self.dims)


@dataclass
class Problem:
    node: ir.Node
    reason: str
    dims: list[Dim] = field(default_factory=list)

    def __str__(self):
        return f"{self.node.op_type} node {self.node.name!r}: {self.reason}"


UNARY = {"Cast", "Neg", "Sqrt", "Reciprocal", "Erf", "Tanh", "Sigmoid", "Relu", "Exp", "Log", "Cos",
         "Sin", "Softmax", "LogSoftmax", "IsNaN", "IsInf", "Not", "Identity", "Abs", "Gelu", "Trilu",
         "CumSum", "Floor", "Ceil", "Round", "Sign", "HardSigmoid", "Softplus", "Elu", "LeakyRelu",
         "Dropout", "CastLike", "FastGelu", "QuickGelu", "BiasGelu"}
BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "LessOrEqual",
             "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Where", "Mod", "BitShift",
             "PRelu", "Sum", "Mean"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
          "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin"}
VIEW_THROUGH = {"Transpose", "Cast", "Identity", "CastLike"}


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


class ShapeFlow:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.opset = self.graph.opset_imports.get("", 0)
        self.dims: dict[ir.Value, list[Dim] | None] = {}
        self.vals: dict[ir.Value, list[Elem]] = {}
        self.named: dict[str, Dim] = {}
        self.meanings: dict[tuple[str, int], Meaning] = {}
        self.derived: list[tuple[ir.Node, Meaning]] = []
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

    def fail(self, node: ir.Node, reason: str):
        involved = [d for v in node.inputs if v is not None for d in (self.dims.get(v) or [])]
        self.problems.append(Problem(node, reason, involved))
        for out in node.outputs:
            self.dims[out] = self.declared(out)

    # --- helpers --------------------------------------------------------------------------------
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

    def out(self, node: ir.Node, dims, i: int = 0):
        self.dims[node.outputs[i]] = dims

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

    # --- the walk -------------------------------------------------------------------------------
    def visit(self, node: ir.Node):
        op = node.op_type
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            return self.fail(node, f"unknown domain {node.domain!r}")
        ins = [self.shape(v) for v in node.inputs]
        handler = getattr(self, "op_" + op, None)
        if handler is not None:
            return handler(node, ins)
        if op in UNARY:
            if ins[0] is None:
                return self.fail(node, "input shape unknown")
            self.out(node, list(ins[0]))
            if op in ("Cast", "Identity", "CastLike") and node.inputs[0] in self.vals:
                self.vals[node.outputs[0]] = self.vals[node.inputs[0]]
            return
        if op in BROADCAST:
            known = [s for s in ins if s is not None]
            if len(known) != len([v for v in node.inputs if v is not None]):
                return self.fail(node, "input shape unknown")
            self.out(node, self.broadcast(known))
            self.arith(node)
            return
        if op in REDUCE:
            return self.reduce(node, ins)
        self.fail(node, f"no dataflow rule for {op}")

    # elementwise arithmetic on shape values (sizes computed at run time)
    def arith(self, node: ir.Node):
        op = node.op_type
        if op == "Where":
            cond, a, b = (self.elems(v) for v in node.inputs)
            if a is not None and b is not None and cond is not None and len(a) == len(b) == len(cond) \
                    and all(c.value is not None for c in cond):
                # exporters write Where(Equal(shape, -1), 1, shape) to resolve -1 in an Expand target
                self.vals[node.outputs[0]] = [x if c.value else y for c, x, y in zip(cond, a, b)]
            return
        a, b = (self.elems(v) for v in node.inputs[:2])
        if a is None or b is None or op not in ("Add", "Sub", "Mul", "Div", "Equal", "Max", "Min"):
            return
        if len(a) == 1 and len(b) > 1:
            a = a * len(b)
        if len(b) == 1 and len(a) > 1:
            b = b * len(a)
        if len(a) != len(b):
            return
        res = []
        for x, y in zip(a, b):
            value = None
            if op == "Equal" and ((x.dim is not None and y.literal and y.value < 0) or
                                  (y.dim is not None and x.literal and x.value < 0)):
                value = 0  # a size is never negative: Equal(shape, -1) is false
            elif x.value is not None and y.value is not None:
                value = {"Add": x.value + y.value, "Sub": x.value - y.value, "Mul": x.value * y.value,
                         "Div": x.value // y.value if y.value else None,
                         "Equal": int(x.value == y.value), "Max": max(x.value, y.value),
                         "Min": min(x.value, y.value)}[op]
            dim = None
            if op == "Mul" and x.dim is not None and y.dim is not None:
                dim = product_of([x.dim, y.dim])
            elif op == "Mul" and x.dim is not None and y.value == 1:
                dim = x.dim
            elif op == "Mul" and (x.dim is not None) != (y.dim is not None) and (x.literal or y.literal):
                # size * literal (kv_heads * n_rep): the literal becomes a Dim of its own
                sized, lit = (x, y) if x.dim is not None else (y, x)
                factor = Dim(lit.value)
                self.mean(lit, Meaning("size", [factor]), node)
                dim = product_of([sized.dim, factor] if sized is x else [factor, sized.dim])
            elif op == "Div" and x.dim is not None and y.literal:
                dim = self.divide(x.dim, y, node)
            if dim is None and value is None and (x.dim is not None or y.dim is not None):
                dim = Dim(None)  # e.g. past + new sequence length: some size, known at run time
            product = (x, y) if op == "Mul" and x.literal and y.literal else None
            res.append(Elem(dim=dim, value=value, factors=product))
        self.vals[node.outputs[0]] = res

    def divide(self, dim: Dim, lit: Elem, node: ir.Node) -> Dim | None:
        """size // literal: the literal must be a leading factor of the dim (heads in heads*head_dim)."""
        fs = factors(dim)
        if fs and fs[0].size == lit.value:
            self.mean(lit, Meaning("size", [fs[0]]), node)
            return product_of(fs[1:]) if len(fs) > 1 else Dim(1)
        return None

    def reduce(self, node, ins):
        x = ins[0]
        if x is None:
            return self.fail(node, "input shape unknown")
        axes = attr(node, "axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = self.ints(node.inputs[1])
            if axes is None:
                return self.fail(node, "reduction axes are not constant")
        keep = attr(node, "keepdims", 1)
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [attr(node, "axis", 0)]
        axes = [a % len(x) for a in (axes if axes is not None else range(len(x)))]
        if not axes and attr(node, "noop_with_empty_axes", 0):
            return self.out(node, list(x))
        self.out(node, [Dim(1) if i in axes else d for i, d in enumerate(x) if keep or i not in axes])

    # --- ops ------------------------------------------------------------------------------------
    def op_Constant(self, node, ins):
        raise DimConflict("Constant nodes must be lifted to initializers first")

    def op_Shape(self, node, ins):
        x = ins[0]
        if x is None:
            return self.fail(node, "input shape unknown")
        start, end = attr(node, "start", 0), attr(node, "end", None)
        picked = x[slice(start, end)]
        self.out(node, [Dim(len(picked))])
        self.vals[node.outputs[0]] = [Elem(dim=d, value=d.size) for d in picked]

    def op_Size(self, node, ins):
        self.out(node, [])

    def op_MatMul(self, node, ins):
        a, b = ins[0], ins[1]
        if a is None or b is None:
            return self.fail(node, "input shape unknown")
        a1, b1 = len(a) == 1, len(b) == 1
        A = [Dim(1)] + a if a1 else a
        B = b + [Dim(1)] if b1 else b
        unify(A[-1], B[-2])
        self.mark_contracted(node.inputs[0], -1)
        self.mark_contracted(node.inputs[1], 0 if b1 else -2)
        batch = self.broadcast([A[:-2], B[:-2]]) if (len(A) > 2 or len(B) > 2) else []
        out = batch + ([] if a1 else [A[-2]]) + ([] if b1 else [B[-1]])
        self.out(node, out)

    def op_Gemm(self, node, ins):
        a, b = ins[0], ins[1]
        if a is None or b is None:
            return self.fail(node, "input shape unknown")
        ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
        m, ka = (a[1], a[0]) if ta else (a[0], a[1])
        kb, n = (b[1], b[0]) if tb else (b[0], b[1])
        unify(ka, kb)
        self.mark_contracted(node.inputs[0], 0 if ta else 1)
        self.mark_contracted(node.inputs[1], 1 if tb else 0)
        out = [m, n]
        if len(node.inputs) > 2 and node.inputs[2] is not None and ins[2] is not None:
            out = self.broadcast([out, ins[2]])
        self.out(node, out)

    def op_Gather(self, node, ins):
        data, idx = ins
        if data is None or idx is None:
            return self.fail(node, "input shape unknown")
        axis = attr(node, "axis", 0) % len(data)
        self.out(node, data[:axis] + idx + data[axis + 1:])
        de, ie = self.elems(node.inputs[0]), self.ints(node.inputs[1])
        if de is not None and ie is not None:
            self.vals[node.outputs[0]] = [de[i] for i in ie]
        elif data[axis].size not in (None, 1) and node.inputs[1].is_initializer():
            # a constant index into a model dimension (e.g. picking one of q/k/v) must stay valid
            self.problems_if_resized(node, data[axis], "constant index into this axis")

    def problems_if_resized(self, node, dim: Dim, reason: str):
        # recorded as a soft problem: harmless unless the Dim is resized later
        self.problems.append(Problem(node, reason, [dim]))

    def op_GatherElements(self, node, ins):
        self.out(node, ins[1])

    def op_Unsqueeze(self, node, ins):
        x = ins[0]
        axes = attr(node, "axes") if self.opset < 13 else self.ints(node.inputs[1])
        if x is None or axes is None:
            return self.fail(node, "input shape or axes unknown")
        rank = len(x) + len(axes)
        axes = sorted(a % rank for a in axes)
        out = list(x)
        for a in axes:
            out.insert(a, Dim(1))
        self.out(node, out)
        if node.inputs[0] in self.vals:
            self.vals[node.outputs[0]] = self.vals[node.inputs[0]]

    def op_Squeeze(self, node, ins):
        x = ins[0]
        axes = attr(node, "axes") if self.opset < 13 else (
            self.ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None)
        if x is None:
            return self.fail(node, "input shape unknown")
        if axes is None:
            axes = [i for i, d in enumerate(x) if d.size == 1]
        axes = [a % len(x) for a in axes]
        self.out(node, [d for i, d in enumerate(x) if i not in axes])
        if node.inputs[0] in self.vals:
            self.vals[node.outputs[0]] = self.vals[node.inputs[0]]

    def op_Flatten(self, node, ins):
        x = ins[0]
        if x is None:
            return self.fail(node, "input shape unknown")
        axis = attr(node, "axis", 1) % (len(x) + 1)
        self.out(node, [product_of([f for d in x[:axis] for f in factors(d)] or [Dim(1)]),
                        product_of([f for d in x[axis:] for f in factors(d)] or [Dim(1)])])

    def op_Transpose(self, node, ins):
        x = ins[0]
        if x is None:
            return self.fail(node, "input shape unknown")
        perm = attr(node, "perm") or list(reversed(range(len(x))))
        self.out(node, [x[p] for p in perm])

    def op_Concat(self, node, ins):
        if any(s is None for s in ins):
            return self.fail(node, "input shape unknown")
        axis = attr(node, "axis") % len(ins[0])
        parts = [s[axis] for s in ins if s[axis].size != 0]
        out = list(ins[0])
        for s in ins[1:]:
            for k in range(len(out)):
                if k != axis:
                    unify(out[k], s[k])
        cat = Dim(None)
        cat.kind, cat.parts = "cat", parts
        out[axis] = parts[0] if len(parts) == 1 else cat
        self.out(node, out)
        es = [self.elems(v) for v in node.inputs]
        if len(ins[0]) == 1 and all(e is not None for e in es):
            self.vals[node.outputs[0]] = [e for lst in es for e in lst]

    def op_Split(self, node, ins):
        x = ins[0]
        if x is None:
            return self.fail(node, "input shape unknown")
        axis = attr(node, "axis", 0) % len(x)
        n = len(node.outputs)
        if self.opset < 13:
            sizes, lits = attr(node, "split"), None
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            lits = self.elems(node.inputs[1])
            sizes = self.ints(node.inputs[1])
            if sizes is None:
                return self.fail(node, "split sizes are not constant")
        else:
            sizes, lits = None, None
        if sizes is None:
            if x[axis].size is None or x[axis].size % n:
                return self.fail(node, "uneven split of an unknown size")
            sizes = [x[axis].size // n] * n
        parts = refine(x[axis], "cat", list(sizes))
        for i, p in enumerate(parts):
            self.out(node, x[:axis] + [p] + x[axis + 1:], i)
            if lits:
                self.mean(lits[i], Meaning("size", [p]), node)

    def op_Slice(self, node, ins):
        x = ins[0]
        if x is None:
            return self.fail(node, "input shape unknown")
        if self.opset < 10:
            starts, ends, axes = attr(node, "starts"), attr(node, "ends"), attr(node, "axes")
            se = ee = None
            steps = None
        else:
            se, ee = self.elems(node.inputs[1]), self.elems(node.inputs[2])
            starts, ends = self.ints(node.inputs[1]), self.ints(node.inputs[2])
            axes = self.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            steps = self.ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if axes is None:
            axes = list(range(len(starts))) if starts is not None else None
        # slicing a shape vector picks elements
        if node.inputs[0] in self.vals and starts is not None and ends is not None and len(x) == 1:
            vals = self.vals[node.inputs[0]]
            picked = vals[slice(starts[0], ends[0], steps[0] if steps else None)]
            self.vals[node.outputs[0]] = picked
            self.out(node, [Dim(len(picked))])
            return
        if starts is None or ends is None or axes is None:
            # bounds computed at run time from shapes: they follow the model by themselves
            out = list(x)
            for i, a in enumerate(axes or []):
                out[a % len(x)] = Dim(None)
            if axes is None:
                out = [Dim(None) for _ in x]
            return self.out(node, out)
        if steps and any(s != 1 for s in steps):
            return self.fail(node, "strided slice")
        out = list(x)
        for i, a in enumerate(axes):
            a %= len(x)
            d = x[a]
            size = d.size
            s, e = starts[i], ends[i]
            if size is None:
                # dynamic axis (sequence): bounds are positions, not model sizes
                out[a] = Dim(None)
                continue
            s = max(0, min(size, s + size if s < 0 else s))
            e = max(0, min(size, e + size if e < 0 else e))
            if s == 0 and e == size:
                continue
            cut(d, s)
            cut(d, e)
            segs = segments(d)
            offsets = np.cumsum([0] + [g.size for g in segs]).tolist()
            inside = segs[offsets.index(s):offsets.index(e)]
            if len(inside) == 1:
                out[a] = inside[0]
            else:
                out[a] = Dim(None)
                out[a].kind, out[a].parts = "cat", inside
            for lit, b in ((se[i] if se else None, s), (ee[i] if ee else None, e)):
                if lit is None or not lit.literal or lit.value >= INT64_MAX // 2:
                    continue  # "to the end" stays "to the end"
                self.mean(lit, Meaning("offset", segs[:offsets.index(b)]), node)
        self.out(node, out)

    def op_Reshape(self, node, ins):
        x = ins[0]
        target = self.elems(node.inputs[1])
        if x is None or target is None:
            return self.fail(node, "target shape not computable")
        if node.inputs[0] in self.vals and len(target) == 1:
            self.vals[node.outputs[0]] = self.vals[node.inputs[0]]  # a shape vector stays a vector
        allowzero = attr(node, "allowzero", 0)
        flat = [f for d in x for f in factors(d)]
        target = [Elem(dim=x[i]) if (e.literal and e.value == 0 and not allowzero) else e
                  for i, e in enumerate(target)]
        holes = [i for i, e in enumerate(target) if e.literal and e.value == -1]
        split = holes[0] if holes else len(target)
        out: list[Dim | None] = [None] * len(target)
        pos = 0
        for i in range(split):
            out[i], pos = self.consume(flat, pos, target[i], node)
        rev = list(reversed(flat[pos:]))
        rpos = 0
        for i in reversed(range(split + 1, len(target))):
            d, rpos = self.consume(rev, rpos, target[i], node, reverse=True)
            out[i] = d
        if holes:
            rest = list(reversed(rev[rpos:]))
            out[split] = product_of(rest) if rest else Dim(1)
        elif rpos < len(rev) and any(d.size != 1 for d in rev[rpos:]):
            raise DimConflict("reshape leaves factors unused")
        self.out(node, out)

    def consume(self, seq, pos, e: Elem, node, reverse=False):
        if e.dim is not None:
            want = factors(e.dim)
            if reverse:
                want = list(reversed(want))
            for w in want:
                if pos < len(seq) and (seq[pos].root() is w.root() or seq[pos].size == w.size):
                    unify(seq[pos], w)
                    pos += 1
                elif w.size is not None:
                    taken, pos = take(seq, pos, w.size, reverse)
                    unify(w, product_of(taken))
                else:
                    raise DimConflict(f"cannot place {w}")
            return e.dim.root(), pos
        if e.value is None:
            raise DimConflict("reshape element unknown")
        if e.value == 1 and (pos >= len(seq) or seq[pos].size != 1):
            return Dim(1), pos
        taken, pos = take(seq, pos, e.value, reverse)
        d = product_of(list(reversed(taken)) if reverse else taken)
        self.mean(e, Meaning("size", [d]), node)
        return d, pos

    def op_Expand(self, node, ins):
        x = ins[0]
        target = self.elems(node.inputs[1])
        if x is None or target is None:
            return self.fail(node, "target shape not computable")
        rank = max(len(x), len(target))
        xs = [None] * (rank - len(x)) + list(x)
        ts = [None] * (rank - len(target)) + list(target)
        out = []
        for d, e in zip(xs, ts):
            if e is None:
                out.append(d)
            elif e.dim is not None:
                if d is not None and d.size != 1:
                    unify(d, e.dim)
                out.append(e.dim if (d is None or d.size == 1) else d)
            elif e.value == 1 or e.value == -1:
                out.append(d if d is not None else Dim(1))
            elif d is not None and d.size != 1:
                self.mean(e, Meaning("size", [d]), node)
                out.append(d)
            else:
                new = Dim(e.value)
                self.mean(e, Meaning("size", [new]), node)
                out.append(new)
        self.out(node, out)

    def op_ConstantOfShape(self, node, ins):
        target = self.elems(node.inputs[0])
        if target is None:
            return self.fail(node, "target shape not computable")
        fill = attr(node, "value")
        fill = 0 if fill is None else fill.numpy().reshape(-1)[0].item()
        if len(target) == 1 and target[0].value is not None and target[0].value <= SMALL_INT_TENSOR \
                and float(fill).is_integer():
            self.vals[node.outputs[0]] = [Elem(value=int(fill)) for _ in range(target[0].value)]
        out = []
        for e in target:
            if e.dim is not None:
                out.append(e.dim)
            else:
                new = Dim(e.value)
                if e.value not in (None, 0, 1):
                    self.mean(e, Meaning("size", [new]), node)
                out.append(new)
        self.out(node, out)

    def op_Range(self, node, ins):
        start, limit, delta = (self.elems(v) for v in node.inputs)
        if start and limit and delta and all(e[0].value is not None for e in (start, limit, delta)):
            n = max(0, -(-(limit[0].value - start[0].value) // delta[0].value))
            d = Dim(n)
            if limit[0].literal:
                self.mean(limit[0], Meaning("size", [d]), node)
            self.out(node, [d])
        elif limit and limit[0].dim is not None and start and start[0].value == 0:
            self.out(node, [limit[0].dim])
        else:
            self.out(node, [Dim(None)])

    def op_LayerNormalization(self, node, ins):
        x = ins[0]
        if x is None:
            return self.fail(node, "input shape unknown")
        axis = attr(node, "axis", -1) % len(x)
        for p in ins[1:]:
            if p is not None:
                for d, e in zip(reversed(p), reversed(x[axis:])):
                    unify(d, e)
        self.out(node, list(x))
        for i in range(1, len(node.outputs)):
            self.out(node, x[:axis] + [Dim(1)] * (len(x) - axis), i)

    op_SimplifiedLayerNormalization = op_LayerNormalization

    def op_Tile(self, node, ins):
        reps = self.ints(node.inputs[1])
        if ins[0] is None or reps is None:
            return self.fail(node, "repeats not computable")
        out = []
        for d, r in zip(ins[0], reps):
            if r == 1:
                out.append(d)
            else:
                out.append(Dim(None if d.size is None else d.size * r))
                self.problems_if_resized(node, d, "tiled axis")
        self.out(node, out)

    def op_ScatterND(self, node, ins):
        self.out(node, ins[0])

    def op_GatherND(self, node, ins):
        data, idx = ins
        if data is None or idx is None or idx[-1].size is None:
            return self.fail(node, "input shape unknown")
        b = attr(node, "batch_dims", 0)
        self.out(node, idx[:-1] + data[b + idx[-1].size:])

    def op_Einsum(self, node, ins):
        self.fail(node, "Einsum is not analysed")


def analyse(model: ir.Model) -> ShapeFlow:
    return ShapeFlow(model)
