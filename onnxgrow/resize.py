"""Resize model dimensions consistently: weights, shape constants and graph I/O together.

A pass says, for each atomic Dim it changes, which old index every new index copies (`Plan.source`,
-1 for a brand-new slot). From that one description this module rewrites:

- every initializer axis that measures a changed Dim (composite axes like heads x head_dim or a
  fused q|k|v are expanded part by part, so fused QKV grows per segment),
- every literal in a shape constant whose meaning involves a changed Dim (Reshape targets, Split
  sizes, Slice offsets), and every node attribute that counts heads (opset-23 Attention's
  q_num_heads and kv_num_heads, RotaryEmbedding's num_heads),
- the declared shapes of graph inputs and outputs, plus an io_map in the model's metadata that tells
  `validate` how old outputs map to new ones.

Passes decide the values: whether a weight that sums over copied inputs is divided by the copy count
(function preservation), what fills new slots, and whether symmetric noise splits the copies.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from .dims import Dim, atoms
from .errors import UnsupportedGraph
from .metadata import IO_MAP_KEY, record_stream_map
from .structure import TransformerSpec


@dataclass
class Plan:
    """How one atomic Dim changes: new index i copies old index source[i] (-1: new slot)."""
    source: np.ndarray

    @property
    def new_size(self) -> int:
        return len(self.source)


@dataclass
class WeightRule:
    divide_by_copies: bool = True  # keep sums over copied inputs unchanged (HyperCloning, FPI)
    noise: float = 0.0  # symmetric noise on copies, as a fraction of the weight's std
    fill: str = "zeros"  # new slots: "zeros" or "noise"
    seed: int = 0


class Resizer:
    def __init__(self, spec: TransformerSpec, plans: dict[Dim, Plan]):
        self.spec = spec
        self.flow = spec.flow
        self.plans = {id(d.root()): p for d, p in plans.items()}

    # --- sizes and index maps of composite Dims ---------------------------------------------------
    def touches(self, d: Dim) -> bool:
        return any(id(a) in self.plans for a in atoms(d))

    def new_size(self, d: Dim) -> int:
        r = d.root()
        if r.kind == "prod":
            return int(np.prod([self.new_size(p) for p in r.parts]))
        if r.kind == "cat":
            return sum(self.new_size(p) for p in r.parts)
        plan = self.plans.get(id(r))
        return plan.new_size if plan else r.size

    def index_map(self, d: Dim) -> np.ndarray:
        """For each new flat index along an axis measuring `d`, the old flat index (-1: new)."""
        r = d.root()
        if r.kind == "prod":
            result = np.zeros(1, dtype=np.int64)
            for p in r.parts:
                m = self.index_map(p)
                combined = result[:, None] * p.size + m[None, :]
                combined[(result[:, None] < 0) | (m[None, :] < 0)] = -1
                result = combined.reshape(-1)
            return result
        if r.kind == "cat":
            pieces, offset = [], 0
            for p in r.parts:
                m = self.index_map(p)
                pieces.append(np.where(m >= 0, m + offset, -1))
                offset += p.size
            return np.concatenate(pieces)
        plan = self.plans.get(id(r))
        if plan is None and r.size is None:
            raise UnsupportedGraph(f"an axis of a resized weight has no static size ({r}); cannot rewrite it")
        return plan.source if plan else np.arange(r.size)

    # --- the rewrite -------------------------------------------------------------------------------
    def check_refusals(self):
        for problem in self.flow.problems:
            if any(self.touches(d) for d in problem.dims):
                raise UnsupportedGraph(f"cannot resize through {problem}")
        for node, meaning in self.flow.derived:
            if any(self.touches(d) for d in meaning.dims):
                raise UnsupportedGraph(
                    f"{node.op_type} node {node.name!r} uses a size computed from constants; cannot rewrite it")

    def apply(self, rule: WeightRule, weight_hook: Callable | None = None) -> ir.Model:
        self.check_refusals()
        g = self.spec.model.graph
        tied = self.tied_tables()
        for k, (name, value) in enumerate(list(g.initializers.items())):
            dims = self.flow.dims[value]
            if not any(self.touches(d) for d in dims):
                continue
            contracted = set() if name in tied else self.flow.contracted.get(name, set())
            maps = [self.index_map(d) for d in dims]
            # Each weight is computed when it is written (or read), one at a time, so a model is
            # resized with one new tensor in memory; its own seed makes the result the same
            # whenever and however often it is computed.
            resized = functools.partial(resize_tensor, value.const_value, maps, contracted, rule,
                                        (rule.seed, k), weight_hook, name, dims)
            value.const_value = ir.LazyTensor(resized, dtype=value.const_value.dtype,
                                              shape=ir.Shape([len(m) for m in maps]), name=name)
            value.shape = ir.Shape([len(m) for m in maps])
        if tied:
            self.compensate_tied_head(sorted(tied)[0])
        self.rewrite_literals()
        self.rewrite_attributes()
        self.rewrite_io()
        return self.spec.model

    def tied_tables(self) -> set[str]:
        """A tied embedding is both looked up and multiplied with: its values can't be divided."""
        spec = self.spec
        if not spec.tied_embeddings or spec.lm_head is None or not self.touches(spec.hidden):
            return set()
        from .structure import weight_of
        return {spec.token_embedding.name, weight_of(self.flow, spec.lm_head)[0].name}

    def compensate_tied_head(self, table: str):
        """Divide the final norm's affine parameters by the copy counts instead of the tied head.

        The head computes logits = h' . E'^T over the grown hidden axis; h' holds copies of h, so each
        hidden unit contributes count(j) times. Scaling h' by 1/count keeps logits and ties intact.
        """
        norm = self.spec.final_norm
        if norm is None or norm.scale is None:
            raise UnsupportedGraph(f"tied embedding {table!r} has no final norm to carry the 1/n scale")
        counts = copy_counts(self.index_map(self.spec.hidden))
        for pname in (norm.scale, norm.bias):
            if pname is None:
                continue
            v = self.spec.model.graph.initializers[pname]
            arr = v.const_value.numpy()
            set_tensor(v, (arr / counts).astype(arr.dtype))

    def rewrite_literals(self):
        g = self.spec.model.graph
        changed: dict[str, np.ndarray] = {}
        for (name, index), meaning in self.flow.meanings.items():
            if not any(self.touches(d) for d in meaning.dims):
                continue
            arr = changed.setdefault(name, g.initializers[name].const_value.numpy().copy())
            flat = arr.reshape(-1)
            flat[index] = meaning.new_value(self.new_size)
        for name, arr in changed.items():
            set_tensor(g.initializers[name], arr)

    def rewrite_attributes(self):
        """Node attributes that count heads (Attention's q_num_heads...) are literals too."""
        for (node, name), meaning in self.flow.attribute_meanings.items():
            if any(self.touches(d) for d in meaning.dims):
                value = meaning.new_value(self.new_size)
                node.attributes[name] = ir.AttrInt64s(name, [int(v) for v in value]) if meaning.kind == "sizes" \
                    else ir.AttrInt64(name, int(value))

    def rewrite_io(self):
        g = self.spec.model.graph
        io_map = {"inputs": {}, "outputs": {}}
        for kind, values in (("inputs", g.inputs), ("outputs", g.outputs)):
            for v in values:
                dims = self.flow.dims.get(v)
                if not dims or v.shape is None:
                    continue
                new_shape, axes = list(v.shape), {}
                for axis, d in enumerate(dims):
                    if self.touches(d):
                        axes[str(axis)] = self.index_map(d).tolist()
                        if isinstance(new_shape[axis], int):
                            new_shape[axis] = self.new_size(d)
                if axes:
                    io_map[kind][v.name] = axes
                    v.shape = ir.Shape(new_shape)
        # intermediate shapes are re-inferred by ONNX Runtime; stale ones would contradict the weights
        for node in g:
            for out in node.outputs:
                if not out.is_graph_output():
                    out.shape = None
        model = self.spec.model
        model.metadata_props[IO_MAP_KEY] = compose_io_maps(model.metadata_props.get(IO_MAP_KEY), io_map)
        if self.touches(self.spec.hidden):
            record_stream_map(model, hidden=self.index_map(self.spec.hidden).tolist())


def compose_io_maps(previous: str | None, new: dict) -> str:
    """Chain maps when a model is resized twice, so validate still compares with the original."""
    if previous:
        old = json.loads(previous)
        for kind in ("inputs", "outputs"):
            for name, axes in new[kind].items():
                for axis, m in axes.items():
                    prior = old.get(kind, {}).get(name, {}).get(axis)
                    if prior is not None:
                        axes[axis] = [prior[i] if i >= 0 else -1 for i in m]
            for name, axes in old.get(kind, {}).items():
                for axis, m in axes.items():
                    new[kind].setdefault(name, {}).setdefault(axis, m)
    return json.dumps(new)


def copy_counts(source: np.ndarray) -> np.ndarray:
    """How many new indices copy the same old index, per new index (1 for new slots)."""
    valid = source >= 0
    counts = np.ones(len(source))
    if valid.any():
        per_old = np.bincount(source[valid])
        counts[valid] = per_old[source[valid]]
    return counts


def resize_tensor(tensor, maps, contracted, rule, seed, hook, name, dims):
    old = tensor.numpy()
    new = resize_array(old, maps, contracted, rule, np.random.default_rng(seed))
    if hook is not None:
        new = hook(name, old, new, dims)
    copied = not np.may_share_memory(new, old)
    del old  # a live view of the mapping would keep it open
    if copied:
        release(tensor)
    return ir.tensor(new, name=name)


def release(tensor) -> None:
    """Unmap a source tensor read from external data: onnx-ir keeps the whole file mapped per tensor
    read, and every page touched stays in the process's memory until it is released. A tensor read
    again is mapped again."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # something still holds a view of it: it stays mapped
            pass


def resize_array(old: np.ndarray, maps: list[np.ndarray], contracted: set[int], rule: WeightRule,
                 rng: np.random.Generator) -> np.ndarray:
    """Gather `old` along every axis by its map; then scale and perturb the summed-over axes."""
    new = old
    # the weight's spread sets the noise scale; skip the pass over the data when there is no noise
    std = float(old.std(dtype=np.float64)) if rule.noise > 0 and old.size else 0.0
    noisy_axes = []
    for axis, m in enumerate(maps):
        if len(m) == old.shape[axis] and np.array_equal(m, np.arange(len(m))):
            continue
        fresh = m < 0
        new = np.take(new, np.where(fresh, 0, m), axis=axis)
        if fresh.any():
            index = [slice(None)] * new.ndim
            index[axis] = np.nonzero(fresh)[0]
            shape = new[tuple(index)].shape
            fill = rng.normal(0.0, rule.noise * std, shape) if rule.fill == "noise" else np.zeros(shape)
            new[tuple(index)] = fill.astype(new.dtype)
        if axis in contracted:
            counts = copy_counts(m)
            shape = [1] * new.ndim
            shape[axis] = -1
            if rule.divide_by_copies and (counts != 1).any():
                if new is old:
                    new = new.copy()
                np.divide(new, counts.reshape(shape).astype(new.dtype), out=new)
            if rule.noise > 0 and (counts > 1).any():
                noisy_axes.append(axis)
    # after every gather, so that each copy of an output unit draws its own noise (as the reference
    # does); noise drawn before the output axis is gathered would be copied along with the weights
    for axis in noisy_axes:
        new = new + symmetric_noise(new.shape, axis, maps[axis], rule.noise * std, rng).astype(old.dtype)
    return np.ascontiguousarray(new)


def symmetric_noise(shape, axis: int, source: np.ndarray, scale: float, rng) -> np.ndarray:
    """Noise that sums to zero over the copies of each old index, so the layer's output is unchanged.

    Copies of an input unit see the same activation, so only the sum of their weights matters
    (HyperCloning's symmetry breaking: +eta on one copy, -eta on another).
    """
    noise = np.moveaxis(rng.normal(0.0, scale, shape), axis, 0)
    valid = source >= 0
    sums = np.zeros((source.max() + 1,) + noise.shape[1:])
    np.add.at(sums, source[valid], noise[valid])
    counts = copy_counts(source)
    noise[valid] -= sums[source[valid]] / counts[valid].reshape((-1,) + (1,) * (noise.ndim - 1))
    return np.moveaxis(noise, 0, axis)


def set_tensor(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
