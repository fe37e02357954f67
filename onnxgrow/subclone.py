"""subclone: a smaller model initialised from a larger one (the steps are in passes/subclone.py).

Calibration data flows through the source in ONNX Runtime; the activations rank hidden dimensions,
FFN neurons and heads; indices that are copies of each other (as HyperCloning makes them) are ranked
and kept as one unit, carrying their copies' share (un-cloning); the shared resize engine keeps the
chosen indices (weights, shape constants and I/O together); then whole blocks are removed from the
residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from passes import subclone as method

from .blocks import block_graphs, record_io_names, remove_blocks
from .calibrate import mean_abs
from .dims import atoms
from .errors import OnnxgrowError
from .resize import Resizer, set_tensor
from .structure import TransformerSpec, distinct, find_norms, load_structure, parameter_names, weight_of


@dataclass
class SubcloneResult:
    model: ir.Model
    kept_hidden: list[int]
    removed_blocks: list[int]
    block_updates: list[float]
    sizes: dict = field(default_factory=dict)


def target_sizes(spec: TransformerSpec, hidden=None, heads=None, kv_heads=None, ffn=None) -> dict:
    """Target size of each role Dim. head_dim is kept, so heads follow hidden unless given."""
    old_hidden, old_heads, old_kv = spec.hidden.size, spec.heads.size, spec.kv_heads.size
    hidden = hidden or old_hidden
    if heads is None:
        heads = old_heads * hidden / old_hidden
        if heads != int(heads) or heads < 1:
            raise OnnxgrowError(f"hidden {hidden} does not give a whole number of heads; pass --heads")
        heads = int(heads)
    group = old_heads // old_kv
    if kv_heads is None:
        kv_heads = heads if spec.group is None else max(heads // group, 1)
    if spec.group is None and kv_heads != heads:
        raise OnnxgrowError("this model has as many key/value heads as query heads; --kv-heads must equal --heads")
    if heads % kv_heads:
        raise OnnxgrowError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    sizes = {spec.hidden: hidden}
    for d in distinct(b.attention.kv_heads for b in spec.blocks):
        sizes[d] = kv_heads
    for d in distinct(b.attention.group for b in spec.blocks):
        sizes[d] = heads // kv_heads
    for d in distinct(spec.ffn):
        sizes[d] = ffn or max(round(d.size * hidden / old_hidden), 1)
    for d, n in sizes.items():
        if n > d.size or n < 1:
            raise OnnxgrowError(f"subclone cannot grow or empty a dimension ({d.role} {d.size} -> {n}); use widen")
    return sizes


def data_input(spec: TransformerSpec, proj) -> ir.Value:
    return proj.inputs[1 - weight_of(spec.flow, proj)[1]]


def subclone_ir(model: ir.Model, ids: np.ndarray, *, hidden=None, heads=None, kv_heads=None, ffn=None,
                layers=None, keep_layers: list[int] | None = None, rescale: str = "norm",
                provider: str = "auto", spec: TransformerSpec | None = None) -> SubcloneResult:
    spec = spec or load_structure(model)
    num = len(spec.blocks)
    blocks = block_graphs(spec)
    sizes = target_sizes(spec, hidden, heads, kv_heads, ffn)
    target_layers = len(keep_layers) if keep_layers is not None else (layers or num)
    if not 1 <= target_layers <= num:
        raise OnnxgrowError(f"--layers must be between 1 and {num}, got {target_layers}")

    # 1. importance of every probed activation, and each block's update of the stream
    stream = [b.r_in for b in blocks] + [blocks[-1].r_out]
    probes = {f"stream{i}": v for i, v in enumerate(stream)}
    norms = find_norms(model.graph, spec.flow, spec.hidden)
    for k, n in enumerate(norms):
        probes[f"norm{k}"] = n.input
    for i, b in enumerate(spec.blocks):
        probes[f"attn{i}"] = data_input(spec, b.attention.o_proj)
        if b.ffn is not None:
            probes[f"ffn{i}"] = data_input(spec, b.ffn.down)
    updates_of = [(f"stream{i}", f"stream{i + 1}") for i in range(num)]
    stats = mean_abs(model, probes, ids, provider=provider, updates=updates_of)
    updates = [float(stats[f"{a}->{b}"]) for a, b in updates_of]

    # 2. the kept indices of every resized Dim, one copy of each group of copies first (un-cloning)
    if rescale not in ("norm", "sqrt", "none"):
        raise OnnxgrowError(f"--rescale must be norm, sqrt or none, got {rescale!r}")
    tied_head = spec.tied_embeddings and spec.lm_head is not None
    # a tied table cannot carry the copies' factor m on its summed-over axis; the final norm does
    can_merge_hidden = not tied_head or (spec.final_norm is not None and spec.final_norm.scale is not None)
    groups = {}

    def choose(d, scores):
        if sizes[d] == d.size:
            return None
        groups[d] = copies(spec, d) if d is not spec.hidden or can_merge_hidden else np.arange(d.size)
        return method.keep_top_groups(method.group_mean(scores, groups[d]), sizes[d], groups[d])

    chosen = {}
    hidden_scores = sum(stats[f"stream{i}"] for i in range(1, num + 1))
    chosen[spec.hidden] = choose(spec.hidden, hidden_scores)
    for d in distinct(spec.ffn):
        scores = sum(stats[f"ffn{i}"] for i, b in enumerate(spec.blocks)
                     if b.ffn is not None and spec.ffn[i].root() is d)
        chosen[d] = choose(d, scores)
    for attr_name in ("kv_heads", "group"):
        for d in distinct(getattr(b.attention, attr_name) for b in spec.blocks):
            scores = sum(method.head_scores(stats[f"attn{i}"], contracted_dim(spec, b.attention.o_proj), d)
                         for i, b in enumerate(spec.blocks) if getattr(b.attention, attr_name).root() is d)
            chosen[d] = choose(d, scores)
    chosen = {d: c for d, c in chosen.items() if c is not None}
    plans = {d: plan for d, (plan, _) in chosen.items()}
    # m / r per kept index of each Dim that merged copies; distinct units before and after, per Dim
    merge = {id(d.root()): f for d, (_, f) in chosen.items() if (f != 1).any()}
    units = {id(d.root()): (len(np.unique(groups[d])), len(np.unique(groups[d][plans[d].source]))) for d in plans}

    # 3. keep them everywhere: merged copies' factors on summed-over axes, then the rescale
    resizer = Resizer(spec, plans)
    tied = resizer.tied_tables()
    final = {spec.final_norm.scale, spec.final_norm.bias} - {None} if tied and spec.final_norm else set()

    def uncloned(name, new, dims):
        for axis in set() if name in tied else spec.flow.contracted.get(name, set()):
            f = method.axis_factors(dims[axis], merge)
            if (f != 1).any():
                new = new * f.reshape([-1 if a == axis else 1 for a in range(new.ndim)]).astype(new.dtype)
        if name in final:  # the tied head's factor, on its input (as HyperCloning puts its 1/n there)
            f = method.axis_factors(spec.hidden, merge)
            if (f != 1).any():
                new = new * f.astype(new.dtype)
        return new

    if rescale == "sqrt":
        def rescaled(name, old, new, dims):
            if name in tied:
                return new
            contracted = spec.flow.contracted.get(name, set())
            counts = {a: (method.distinct_count(dims[a], {k: u[0] for k, u in units.items()}),
                          method.distinct_count(dims[a], {k: u[1] for k, u in units.items()})) for a in contracted}
            return method.rescale(contracted, old, new, counts)
    elif rescale == "norm" and spec.hidden in plans:
        kept, hidden_groups = plans[spec.hidden].source, groups[spec.hidden]
        gains = {n.scale: method.norm_gain(method.group_mean(stats[f"norm{k}^2"], hidden_groups), kept)
                 for k, n in enumerate(norms) if n.scale is not None}

        def rescaled(name, old, new, dims):
            return (new * gains[name]).astype(new.dtype) if name in gains else new
    else:
        rescaled = None

    def hook(name, old, new, dims):
        new = uncloned(name, new, dims) if merge else new
        return rescaled(name, old, new, dims) if rescaled else new

    resizer.apply(method.rule(), weight_hook=hook if merge or rescaled else None)
    if rescale == "sqrt" and tied and spec.final_norm is not None and spec.hidden in plans:
        before, after = units[id(spec.hidden.root())]
        factor = np.sqrt(before / after)  # the tied head's share, on its input
        for pname in (spec.final_norm.scale, spec.final_norm.bias):
            if pname:
                v = model.graph.initializers[pname]
                set_tensor(v, (v.const_value.numpy() * factor).astype(v.const_value.numpy().dtype))

    # 4. remove blocks
    if keep_layers is not None:
        bad = [k for k in keep_layers if not 0 <= k < num]
        if bad or len(set(keep_layers)) != len(keep_layers):
            raise OnnxgrowError(f"--keep-layers must list distinct block indices 0..{num - 1}, got {keep_layers}")
        removed = [i for i in range(num) if i not in keep_layers]
    else:
        removable = {i for i, b in enumerate(blocks) if not b.r_out.is_graph_output()}
        removed = method.blocks_to_remove(updates, target_layers, removable)
    if removed:
        fresh = load_structure(model)
        remove_blocks(fresh, block_graphs(fresh), removed)
        record_io_names(model)
    model.metadata_props["onnxgrow.history"] = (
        model.metadata_props.get("onnxgrow.history", "") +
        f"subclone:hidden={sizes[spec.hidden]},layers={num - len(removed)},removed={removed};")
    return SubcloneResult(model, plans[spec.hidden].source.tolist() if spec.hidden in plans
                          else list(range(spec.hidden.size)), removed, updates,
                          {d.role: n for d, n in sizes.items()})


def copies(spec: TransformerSpec, d) -> np.ndarray:
    """Groups of copies among the indices of Dim `d`: per index, the first index whose slices are
    identical (bit for bit) to its own in every weight with an axis measuring `d`, i.e. units whose
    activations are equal, as HyperCloning makes them. Every index is its own group when `d` has
    no copies, or when a weight measures `d` twice (not handled)."""
    atom = d.root()
    alone = np.arange(atom.size)
    labels = np.zeros(atom.size, dtype=np.int64)
    for value in spec.model.graph.initializers.values():
        axes = [a for a, dim in enumerate(spec.flow.dims.get(value) or ())
                if any(x is atom for x in atoms(dim))]
        if not axes:
            continue
        order = atom_positions(spec.flow.dims[value][axes[0]], atom) if len(axes) == 1 else None
        arr = value.const_value.numpy()
        if order is None or arr.dtype.kind in "OSU":
            return alone
        axis = axes[0]
        rows = np.take(arr, order.reshape(-1), axis=axis)  # [..., size x positions, ...]
        rows = np.moveaxis(rows.reshape(arr.shape[:axis] + order.shape + arr.shape[axis + 1:]), axis, 0)
        rows = np.ascontiguousarray(rows.reshape(atom.size, -1))
        if rows.shape[1] == 0:
            continue
        keys = rows.view(np.dtype((np.void, rows.shape[1] * rows.dtype.itemsize))).reshape(-1)
        same = np.unique(keys, return_inverse=True)[1].reshape(-1)
        labels = np.unique(labels * atom.size + same, return_inverse=True)[1].reshape(-1)
        if labels.max() == atom.size - 1:  # all distinct already: more weights cannot merge any
            return alone
    first = np.unique(labels, return_index=True)[1]
    return first[labels]


def atom_positions(d, atom) -> np.ndarray | None:
    """The flat positions along an axis measuring `d` where the atom Dim appears, as an array
    [atom size, positions per index], each row in the same order of the other coordinates
    (a fused q|k|v axis holds a kv head in several segments). None if it appears twice in a product."""
    def walk(dim):  # per flat position: (atom index or -1, the other coordinates), and their count
        r = dim.root()
        if r.size is None:
            raise ValueError
        if r.kind == "prod":
            index, rest, count = np.full(1, -1), np.zeros(1, dtype=np.int64), 1
            for p in r.parts:
                i, o, n = walk(p)
                if (index >= 0).any() and (i >= 0).any():
                    raise ValueError
                index = np.maximum(index[:, None], i[None, :]).reshape(-1)
                rest = (rest[:, None] * n + o[None, :]).reshape(-1)
                count *= n
            return index, rest, count
        if r.kind == "cat":
            parts = [walk(p) for p in r.parts]
            offsets = np.cumsum([0] + [n for _, _, n in parts])
            return (np.concatenate([i for i, _, _ in parts]),
                    np.concatenate([o + off for (_, o, _), off in zip(parts, offsets)]), int(offsets[-1]))
        if r is atom:
            return np.arange(r.size), np.zeros(r.size, dtype=np.int64), 1
        return np.full(r.size, -1), np.arange(r.size), r.size

    try:
        index, rest, _ = walk(d)
    except ValueError:
        return None
    where = np.nonzero(index >= 0)[0]
    where = where[np.lexsort((rest[where], index[where]))]
    return where.reshape(atom.size, -1)


def contracted_dim(spec, proj):
    from .structure import contracted_dim as cd
    return cd(spec.flow, proj)


def randomized(model: ir.Model, seed: int = 0) -> ir.Model:
    """The same architecture with fresh weights (N(0, 0.02) matrices, unit norm scales, zero
    biases): the baseline a subclone must beat. Buffers (rotary frequencies, masks) are kept."""
    spec = load_structure(model)
    rng = np.random.default_rng(seed)
    scales = {n.scale for n in find_norms(model.graph, spec.flow, spec.hidden)}
    for name in parameter_names(spec):
        v = model.graph.initializers[name]
        arr = v.const_value.numpy()
        if arr.ndim >= 2:
            new = rng.normal(0.0, 0.02, arr.shape)
        else:
            new = np.ones(arr.shape) if name in scales else np.zeros(arr.shape)
        set_tensor(v, new.astype(arr.dtype))
    if spec.tied_embeddings and spec.lm_head is not None:  # a tied copy follows its table
        head = weight_of(spec.flow, spec.lm_head)[0]
        table = spec.token_embedding.const_value.numpy()
        if head is not spec.token_embedding:
            set_tensor(head, table.T.copy() if head.const_value.shape[0] != table.shape[0] else table.copy())
    return model


def mean_pooled(outputs: list[dict], name: str) -> np.ndarray:
    return np.concatenate([o[name].astype(np.float64).mean(axis=1) for o in outputs])


def next_token_loss(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean cross-entropy of predicting token t+1 from positions <= t."""
    x = logits[:, :-1].astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean())


def fidelity(source, target, baseline, ids: np.ndarray, kept_hidden: list[int], provider="auto") -> dict:
    """How much of the source the subclone keeps, on held-out windows, against a random model of the
    same size: next-token loss and top-1 agreement for logits; for hidden-state outputs the cosine
    of mean-pooled embeddings with the source's at the kept dimensions."""
    from .calibrate import run_outputs
    runs = {k: run_outputs(p, ids, provider=provider) for k, p in
            (("source", source), ("subclone", target), ("random", baseline))}
    report = {}
    for name in runs["source"][0]:
        src = np.concatenate([o[name] for o in runs["source"]])
        if src.ndim != 3:
            continue
        if src.shape[-1] == len(kept_hidden) or runs["subclone"][0][name].shape[-1] != src.shape[-1]:
            ref = mean_pooled(runs["source"], name)[:, kept_hidden]
            row = {}
            for k in ("subclone", "random"):
                emb = mean_pooled(runs[k], name)
                cos = (emb * ref).sum(-1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
                row[f"{k}_mean_cosine"] = float(cos.mean())
            report[name] = row
        else:
            row = {"source_loss": next_token_loss(src, ids)}
            for k in ("subclone", "random"):
                out = np.concatenate([o[name] for o in runs[k]])
                row[f"{k}_loss"] = next_token_loss(out, ids)
                row[f"{k}_top1_agreement"] = float((out.argmax(-1) == src.argmax(-1)).mean())
            report[name] = row
    return report
