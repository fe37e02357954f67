"""subclone: a smaller model initialised from a larger one (the steps are in passes/subclone.py).

Calibration data flows through the source in ONNX Runtime; the activations rank hidden dimensions,
FFN neurons and heads; indices that are copies of each other (as HyperCloning makes them) are ranked
and kept as one unit, carrying their copies' share (un-cloning); the shared resize engine keeps the
chosen indices (weights, shape constants and I/O together); then whole blocks are removed from the
residual stream.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .blocks import block_graphs, record_io_names, remove_blocks
from .fusednorms import fuse_split_norms
from .calibrate import mean_abs, windows
from .static_shapes import fit_sequence
from .dims import atoms
from .errors import OnnxgrowError
from .metadata import append_history, record_stream_map
from .passes import subclone as method
from .resize import Resizer, set_tensor
from .sizes import head_counts, role_sizes
from .structure import TransformerSpec, distinct, find_norms, load_structure, parameter_names, weight_of

log = logging.getLogger(__name__)

RESCALE_MODES = ("norm", "sqrt", "none")


@dataclass
class SubcloneResult:
    model: ir.Model
    kept_hidden: list[int]            # the source's hidden indices the subclone keeps, in order
    removed_blocks: list[int]
    block_updates: list[float]        # each source block's relative update of the stream
    sizes: dict = field(default_factory=dict)  # target size by role
    layers: int = 0                   # blocks in the subclone
    held_out: np.ndarray | None = None  # calibration windows not used for ranking (for `fidelity`)

    @property
    def label(self) -> str:
        """`subclone-h256-l4`: the default output name's suffix."""
        return f"subclone-h{self.sizes['hidden']}-l{self.layers}"


def target_sizes(spec: TransformerSpec, hidden=None, heads=None, kv_heads=None, ffn=None) -> dict:
    """Target size of each role Dim. head_dim is kept, so heads follow hidden unless given."""
    hidden = hidden or spec.hidden.size
    heads, kv_heads = head_counts(spec, hidden, heads, kv_heads)
    sizes = role_sizes(spec, hidden, heads, kv_heads, ffn or None)
    for d, n in sizes.items():
        if n > d.size or n < 1:
            raise OnnxgrowError(f"subclone cannot grow or empty a dimension ({d.role} {d.size} -> {n}); use widen")
    return sizes


DEFAULT_SEQ = 64  # tokens per calibration window

# --- calibration data -------------------------------------------------------------------------------------


def calibration_windows(spec: TransformerSpec, calib=None, tokenizer=None, use_bytes: bool = False,
                        samples: int = 64, seq: int | None = None, allow_random: bool = False):
    """(ranking windows, held-out windows) of token ids: the first 90% of the data ranks, the rest
    measures fidelity. `calib`: a 1-D array of ids, a path (text, bytes or .npy), or None for random
    ids (only with allow_random). `seq` (default 64) must fit a static-shape export (static_shapes.fit)."""
    from .tokens import load_tokens
    fixed_seq = spec.static_shape()[1]
    seq = fit_sequence(spec, seq, DEFAULT_SEQ)
    if calib is None:
        if not allow_random:
            raise OnnxgrowError("subclone ranks neurons on calibration data: give --calib "
                                "(or --allow-random-calib to rank on random token ids)")
        tokens = np.random.default_rng(0).integers(0, spec.vocab.size, samples * seq * 2)
    elif isinstance(calib, (str, os.PathLike)):
        tokens = load_tokens(calib, tokenizer, use_bytes)
    else:
        tokens = np.asarray(calib).reshape(-1)
        if tokens.dtype.kind not in "iu":
            raise OnnxgrowError(f"calibration ids must be integers, got {tokens.dtype}")
    if tokens.size and tokens.max() >= spec.vocab.size:
        raise OnnxgrowError(f"calibration ids reach {tokens.max()}, beyond the vocabulary of {spec.vocab.size}")
    split = int(len(tokens) * 0.9)
    ids = windows(tokens[:split], seq, samples)
    # short held-out data gets shorter windows, where the model's sequence is not fixed
    held_seq = seq if fixed_seq else min(seq, max(len(tokens) - split, 1))
    held_out = windows(tokens[split:], held_seq, max(samples // 4, 1))
    return ids, held_out


def subclone_model(model: ir.Model, calib=None, *, tokenizer=None, use_bytes=False, samples=64, seq=None,
                   allow_random_calib=False, spec: TransformerSpec | None = None, **options) -> SubcloneResult:
    """Subclone `model` in place on calibration data (see calibration_windows); `options` as for
    subclone_ir. The result carries the held-out windows."""
    spec = spec or load_structure(model)
    ids, held_out = calibration_windows(spec, calib, tokenizer, use_bytes, samples, seq, allow_random_calib)
    result = subclone_ir(model, ids, spec=spec, **options)
    result.held_out = held_out
    return result


# --- the four steps ---------------------------------------------------------------------------------------


def data_input(spec: TransformerSpec, proj) -> ir.Value:
    return proj.inputs[1 - weight_of(spec.flow, proj)[1]]


def subclone_ir(model: ir.Model, ids: np.ndarray, *, hidden=None, heads=None, kv_heads=None, ffn=None,
                layers=None, keep_layers: list[int] | None = None, rescale: str = "norm",
                provider: str = "auto", spec: TransformerSpec | None = None) -> SubcloneResult:
    """Subclone `model` in place, ranking on the token-id windows `ids` ([windows, tokens])."""
    spec = spec or load_structure(model)
    num = len(spec.blocks)
    sizes = target_sizes(spec, hidden, heads, kv_heads, ffn)
    target_layers = len(keep_layers) if keep_layers is not None else (layers or num)
    if not 1 <= target_layers <= num:
        raise OnnxgrowError(f"--layers must be between 1 and {num}, got {target_layers}")
    stats, norms, updates = measure(model, spec, ids, provider)
    if rescale not in RESCALE_MODES:
        raise OnnxgrowError(f"--rescale must be norm, sqrt or none, got {rescale!r}")
    kept = KeptIndices.choose(spec, sizes, stats)
    keep_everywhere(model, spec, kept, stats, norms, rescale)
    removed = remove_weak_blocks(model, spec, updates, target_layers, keep_layers)
    fuse_split_norms(model.graph)  # measuring split the Skip norms at block boundaries: the source's form again
    # a smaller model computes something else: none of its residual streams stands for the source's
    record_stream_map(model, boundaries=[None] * (num - len(removed) + 1))
    append_history(model, f"subclone:hidden={sizes[spec.hidden]},layers={num - len(removed)},removed={removed}")
    plans = kept.plans
    return SubcloneResult(model, plans[spec.hidden].source.tolist() if spec.hidden in plans
                          else list(range(spec.hidden.size)), removed, updates,
                          {d.role: n for d, n in sizes.items()}, layers=num - len(removed))


def measure(model: ir.Model, spec: TransformerSpec, ids: np.ndarray, provider: str):
    """Step 1: mean |activation| of every probed value, and each block's update of the stream.

    Returns (stats, norms, updates): stats as calibrate.mean_abs gives them, under the keys
    stream{i}, norm{k}, attn{i}, ffn{i}; the norms over the hidden axis; per block ||r_out - r_in|| / ||r_in||.
    """
    blocks = block_graphs(spec)
    stream = [b.r_in for b in blocks] + [blocks[-1].r_out]
    probes = {f"stream{i}": v for i, v in enumerate(stream)}
    norms = find_norms(model.graph, spec.flow, spec.hidden)
    for k, n in enumerate(norms):
        # An approximation for EmbedLayerNormalization: the sum word + position + segment it normalises is
        # inside the op, so its norm's input is its output and the gain is measured on the normalised output.
        # The exact statistic is E[(word[id] + pos[p] + seg[t])^2] per channel, computable from the tables
        # and the calibration ids (not done yet: issue 14).
        probes[f"norm{k}"] = n.input
    for i, b in enumerate(spec.blocks):
        probes[f"attn{i}"] = data_input(spec, b.attention.o_proj)
        if b.ffn is not None:
            probes[f"ffn{i}"] = data_input(spec, b.ffn.down)
    updates_of = [(f"stream{i}", f"stream{i + 1}") for i in range(len(spec.blocks))]
    stats = mean_abs(model, probes, ids, provider=provider, updates=updates_of)
    updates = [float(stats[f"{a}->{b}"]) for a, b in updates_of]
    log.debug("block updates: %s", ", ".join(f"{u:.3f}" for u in updates))
    return stats, norms, updates


@dataclass
class KeptIndices:
    """Step 2: the kept indices of every resized Dim, one copy of each group of copies first.

    plans: {Dim: Plan}; groups: {Dim: per index, the first index of its group of copies};
    merge: {atom id: per kept index, the factor m / r of its group}, for Dims that merged copies;
    units: {atom id: (distinct units before, after)}.
    """
    plans: dict
    groups: dict
    merge: dict
    units: dict

    @classmethod
    def choose(cls, spec: TransformerSpec, sizes: dict, stats: dict) -> KeptIndices:
        tied_head = spec.tied_embeddings and spec.lm_head is not None
        # a tied table cannot carry the copies' factor m on its summed-over axis; the final norm does
        can_merge_hidden = not tied_head or (spec.final_norm is not None and spec.final_norm.scale is not None)
        num = len(spec.blocks)
        scores = {spec.hidden: sum(stats[f"stream{i}"] for i in range(1, num + 1))}
        for d in distinct(spec.ffn):
            scores[d] = sum(stats[f"ffn{i}"] for i, b in enumerate(spec.blocks)
                            if b.ffn is not None and spec.ffn[i].root() is d)
        for attr_name in ("kv_heads", "group"):
            for d in distinct(getattr(b.attention, attr_name) for b in spec.blocks):
                scores[d] = sum(method.head_scores(stats[f"attn{i}"], contracted_dim(spec, b.attention.o_proj), d)
                                for i, b in enumerate(spec.blocks) if getattr(b.attention, attr_name).root() is d)
        groups, chosen = {}, {}
        for d, s in scores.items():
            if sizes[d] == d.size:
                continue
            groups[d] = copies(spec, d) if d is not spec.hidden or can_merge_hidden else np.arange(d.size)
            chosen[d] = method.keep_top_groups(method.group_mean(s, groups[d]), sizes[d], groups[d])
        plans = {d: plan for d, (plan, _) in chosen.items()}
        merge = {id(d.root()): f for d, (_, f) in chosen.items() if (f != 1).any()}
        units = {id(d.root()): (len(np.unique(groups[d])), len(np.unique(groups[d][plans[d].source])))
                 for d in plans}
        return cls(plans, groups, merge, units)


def keep_everywhere(model: ir.Model, spec: TransformerSpec, kept: KeptIndices, stats: dict, norms: list,
                    rescale: str) -> None:
    """Step 3: keep the chosen indices in every weight, with merged copies' factors on summed-over
    axes, then the rescale (see passes/subclone.py, points 4 and 5)."""
    resizer = Resizer(spec, kept.plans)
    hook = KeptWeights(spec, kept, resizer.tied_tables(), rescale)
    if rescale == "norm" and spec.hidden in kept.plans:
        hidden_kept, hidden_groups = kept.plans[spec.hidden].source, kept.groups[spec.hidden]
        hook.gains = {n.scale: method.norm_gain(method.group_mean(stats[f"norm{k}^2"], hidden_groups), hidden_kept)
                      for k, n in enumerate(norms) if n.scale is not None}
    resizer.apply(method.rule(), weight_hook=hook if hook.needed else None)
    if rescale == "sqrt" and hook.tied and spec.final_norm is not None and spec.hidden in kept.plans:
        before, after = kept.units[id(spec.hidden.root())]
        factor = np.sqrt(before / after)  # the tied head's share, on its input
        for pname in (spec.final_norm.scale, spec.final_norm.bias):
            if pname:
                v = model.graph.initializers[pname]
                set_tensor(v, (v.const_value.numpy() * factor).astype(v.const_value.numpy().dtype))


class KeptWeights:
    """The resize engine's weight hook: each kept weight, un-cloned, then rescaled."""

    def __init__(self, spec: TransformerSpec, kept: KeptIndices, tied: set[str], rescale: str):
        self.spec, self.kept, self.tied, self.rescale = spec, kept, tied, rescale
        # the tied head's factor goes on the final norm, its input (as HyperCloning puts its 1/n there)
        self.final = {spec.final_norm.scale, spec.final_norm.bias} - {None} if tied and spec.final_norm else set()
        self.gains: dict[str, float] = {}  # mode "norm": each norm scale's factor r

    @property
    def needed(self) -> bool:
        return bool(self.kept.merge) or self.rescale == "sqrt" or bool(self.gains)

    def __call__(self, name, old, new, dims):
        if self.kept.merge:
            new = self.uncloned(name, new, dims)
        if self.rescale == "sqrt":
            return self.sqrt_rescaled(name, old, new, dims)
        return (new * self.gains[name]).astype(new.dtype) if name in self.gains else new

    def uncloned(self, name, new, dims):
        merge = self.kept.merge
        for axis in set() if name in self.tied else self.spec.flow.contracted.get(name, set()):
            f = method.axis_factors(dims[axis], merge)
            if (f != 1).any():
                new = new * f.reshape([-1 if a == axis else 1 for a in range(new.ndim)]).astype(new.dtype)
        if name in self.final:
            f = method.axis_factors(self.spec.hidden, merge)
            if (f != 1).any():
                new = new * f.astype(new.dtype)
        return new

    def sqrt_rescaled(self, name, old, new, dims):
        if name in self.tied:
            return new
        contracted = self.spec.flow.contracted.get(name, set())
        units = self.kept.units
        counts = {a: (method.distinct_count(dims[a], {k: u[0] for k, u in units.items()}),
                      method.distinct_count(dims[a], {k: u[1] for k, u in units.items()})) for a in contracted}
        return method.rescale(contracted, old, new, counts)


def remove_weak_blocks(model: ir.Model, spec: TransformerSpec, updates: list[float], target_layers: int,
                       keep_layers: list[int] | None) -> list[int]:
    """Step 4: remove the blocks not in keep_layers, or those that update the stream least."""
    num = len(spec.blocks)
    if keep_layers is not None:
        bad = [k for k in keep_layers if not 0 <= k < num]
        if bad or len(set(keep_layers)) != len(keep_layers):
            raise OnnxgrowError(f"--keep-layers must list distinct block indices 0..{num - 1}, got {keep_layers}")
        removed = [i for i in range(num) if i not in keep_layers]
    else:
        blocks = block_graphs(spec)
        removable = {i for i, b in enumerate(blocks) if not b.r_out.is_graph_output()}
        removed = method.blocks_to_remove(updates, target_layers, removable)
    if removed:
        fresh = load_structure(model)
        remove_blocks(fresh, block_graphs(fresh), removed)
        record_io_names(model)
    return removed


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
