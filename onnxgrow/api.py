"""The Python API: inspect, widen, deepen, subclone, validate (and train, where torch is installed).

    import onnxgrow
    config = onnxgrow.inspect("model.onnx")             # a dict like `onnxgrow inspect --json`
    wide = onnxgrow.widen("model.onnx", factor=2)       # an onnx.ModelProto
    deep = onnxgrow.deepen(wide, layers=8)              # same kind as given: a ModelProto here
    report = onnxgrow.validate("model.onnx", deep)      # an onnxgrow.verify.Report

Every function takes a model as a path, an onnx.ModelProto or an onnx_ir.Model, never changes what it
is given, and returns a model of the kind it was given (a ModelProto for a path). The `*_ir` variants
rewrite an onnx-ir model in place: the CLI uses them to hold one copy of the weights in memory.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from . import modelio
from .errors import OnnxgrowError
from .metadata import append_history, record_stream_map
from .passes import DEPTH_PASSES, WIDTH_PASSES
from .resize import Resizer
from .sizes import describe, head_counts, role_sizes
from .structure import TransformerSpec, load_structure

log = logging.getLogger(__name__)

WIDEN_METHODS = tuple(WIDTH_PASSES)
DEEPEN_METHODS = tuple(DEPTH_PASSES)


def structure(model) -> TransformerSpec:
    """The TransformerSpec found in `model`'s graph (a path, ModelProto or onnx_ir.Model)."""
    return load_structure(modelio.as_ir(model))


def inspect(model) -> dict:
    """The transformer configuration found in `model`'s graph.

    Args:
        model: a path, an onnx.ModelProto or an onnx_ir.Model.
    Returns:
        a dict, as `onnxgrow inspect --json` prints it (hidden_size, num_layers, num_heads, ...).
    """
    return structure(model).config()


def dequantize(model):
    """`model` with its quantized weights (MatMulNBits, MatMulInteger, QDQ, GatherBlockQuantized) in
    float, as onnxgrow.quantized describes; of the kind given. The other functions refuse quantized
    models: dequantize first, grow, then quantize the grown model again."""
    from .quantized import dequantize as to_float
    m = modelio.as_ir(model)
    to_float(m)
    return modelio.same_kind(m, model)


def load_pass(method: str, registry: dict = WIDTH_PASSES):
    """The registered pass called `method`, or a one-line error naming the choices."""
    if method not in registry:
        raise OnnxgrowError(f"unknown method {method!r}; choose one of {', '.join(registry)}")
    return registry[method]


# --- widen ------------------------------------------------------------------------------------------------


def widen_sizes(spec: TransformerSpec, factor: float | None = None, hidden: int | None = None,
                heads: int | None = None, kv_heads: int | None = None, ffn: int | None = None) -> dict:
    """Target size of every role Dim. head_dim is kept: heads follow hidden unless given."""
    if factor is None and hidden is None:
        raise OnnxgrowError("give --factor or --hidden")
    if factor is not None and hidden is not None:
        raise OnnxgrowError("give either --factor or --hidden, not both")
    old_heads, old_kv = spec.heads.size, spec.kv_heads.size
    if factor is not None:
        if factor <= 0:
            raise OnnxgrowError(f"--factor must be positive, got {factor}")
        hidden = round(spec.hidden.size * factor)
        heads = heads or round(old_heads * factor)
        # multi-query attention stays multi-query: its one kv head serves more query heads
        kv_heads = kv_heads or (heads if spec.group is None else 1 if old_kv == 1 else round(old_kv * factor))
    heads, kv_heads = head_counts(spec, hidden, heads, kv_heads)
    if old_kv == 1 and kv_heads > 1:
        what = "single-head attention" if spec.group is None else "multi-query attention (one key/value head)"
        raise OnnxgrowError(f"{what}: the key/value head cannot be copied (its axis has size 1 in the graph); "
                            "keep --kv-heads 1")
    sizes = role_sizes(spec, hidden, heads, kv_heads, ffn)
    for d, n in sizes.items():
        if n < d.size:
            raise OnnxgrowError(f"widen cannot shrink ({d.role} {d.size} -> {n}); use subclone")
    return sizes


def widen(model, factor: float | None = None, *, hidden: int | None = None, heads: int | None = None,
          kv_heads: int | None = None, ffn: int | None = None, method: str = "hypercloning",
          noise: float = 0.0, seed: int = 0):
    """A wider model that starts from the source's knowledge.

    Args:
        model: a path, an onnx.ModelProto or an onnx_ir.Model.
        factor: width multiplier (or give `hidden`); heads follow hidden, head_dim is kept.
        hidden, heads, kv_heads, ffn: target sizes (each optional, derived from hidden).
        method: a width pass, one of WIDEN_METHODS; "hypercloning" is function-preserving.
        noise: symmetry-breaking noise, as a fraction of each weight's std.
        seed: for the methods that draw random numbers.
    Returns:
        the wider model, of the kind given (a ModelProto for a path).
    """
    wide = widen_ir(modelio.as_ir(model), factor, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn,
                    method=method, noise=noise, seed=seed)
    return modelio.same_kind(wide, model)


def widen_ir(model, factor=None, *, hidden=None, heads=None, kv_heads=None, ffn=None,
             method="hypercloning", noise=0.0, seed=0, spec: TransformerSpec | None = None):
    """Widen an onnx_ir.Model in place (`spec`: its structure, when the caller has found it already)."""
    width_pass = load_pass(method, WIDTH_PASSES)
    if noise < 0:
        raise OnnxgrowError(f"--noise must be non-negative, got {noise}")
    spec = spec or load_structure(model)
    width_pass.check(spec)
    sizes = widen_sizes(spec, factor, hidden, heads, kv_heads, ffn)
    log.debug("widen %s: %s", method, describe(sizes))
    before = describe({d: d.size for d in sizes})  # the source's sizes: train's recipe reads the copy factor
    resizer = Resizer(spec, width_pass.plans(spec, sizes, seed=seed))
    model = resizer.apply(width_pass.rule(noise=noise, seed=seed))
    width_pass.after(spec, resizer)
    append_history(model, f"widen:{method}:{describe(sizes)}:from={before}")
    return model


def default_output(path: Path, suffix: str) -> Path:
    """`model.SUFFIX.onnx` next to `model.onnx`."""
    path = Path(path)
    name = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{name}.{suffix}.onnx")


def factor_label(factor: float) -> str:
    return str(int(factor)) if float(factor).is_integer() else f"{factor:g}"


# --- deepen -----------------------------------------------------------------------------------------------


def deepen(model, layers: int | None = None, *, factor: int | None = None, method: str = "identity",
           at: list[int] | None = None, noise: float = 0.0, seed: int = 0):
    """A deeper model: new blocks are identities (exact), or copies of trained blocks.

    Args:
        model: a path, an onnx.ModelProto or an onnx_ir.Model.
        layers: target number of blocks (or give `factor`, or only `at`).
        factor: depth multiplier.
        method: a depth pass, one of DEEPEN_METHODS; "identity" is function-preserving.
        at: insert a new block after each of these block indices (0-based).
        noise: noise on the copied blocks' weights, as a fraction of each weight's std.
        seed: for the noise.
    Returns:
        the deeper model, of the kind given (a ModelProto for a path).
    """
    deep = deepen_ir(modelio.as_ir(model), layers, factor=factor, method=method, at=at, noise=noise, seed=seed)
    return modelio.same_kind(deep, model)


def deepen_target(num: int, layers, factor, at) -> int:
    """The target number of blocks, from exactly one of layers, factor or the `at` positions."""
    if layers is not None and factor is not None:
        raise OnnxgrowError("give --layers or --factor, not both")
    if layers is None and factor is None and at is None:
        raise OnnxgrowError("give --layers, --factor or --at")
    target = layers if layers is not None else num * factor if factor is not None else num + len(at)
    if at is not None:
        bad = [p for p in at if not 0 <= p < num]
        if bad:
            raise OnnxgrowError(f"--at positions must be block indices 0..{num - 1}, got {bad}")
        if target != num + len(at):
            raise OnnxgrowError(f"--at lists {len(at)} new blocks but the target adds {target - num}")
    if target <= num:
        raise OnnxgrowError(f"deepen needs more layers than the model's {num}; got {target}")
    return target


def boundaries_after_insert(num_blocks: int, plan: dict[int, list[tuple[int, bool]]]) -> list[int | None]:
    """For each boundary of the deepened model, the source boundary whose stream it carries: an
    identity copy (zeroed output projections) passes its input on; any other copy changes the stream
    from there on, so no later boundary stands for one of the source's."""
    boundaries, same = [0], True
    for i in range(num_blocks):
        boundaries.append(i + 1 if same else None)
        for _, zeroed in plan.get(i, []):
            same = same and zeroed
            boundaries.append(i + 1 if same else None)
    return boundaries


def deepen_ir(model, layers=None, *, factor=None, method="identity", at=None, noise=0.0,
              seed=0, spec: TransformerSpec | None = None):
    """Deepen an onnx_ir.Model in place (`spec`: its structure, when the caller has found it already)."""
    from .blocks import block_graphs, insert_after, record_io_names
    from .resize import set_tensor
    depth_pass = load_pass(method, DEPTH_PASSES)
    spec = spec or load_structure(model)
    target = deepen_target(len(spec.blocks), layers, factor, at)
    depth_pass.check(spec)
    plan = depth_pass.plan(spec, target, at)
    log.debug("deepen %s: insert %s", method, plan)
    blocks = block_graphs(spec)
    before = set(model.graph.initializers)
    zeroed = insert_after(model.graph, blocks, plan)
    record_io_names(model)
    record_stream_map(model, boundaries=boundaries_after_insert(len(blocks), plan))
    for name in zeroed:
        v = model.graph.initializers[name]
        set_tensor(v, np.zeros_like(v.const_value.numpy()))
    if noise > 0:
        rng = np.random.default_rng(seed)
        for name in sorted(set(model.graph.initializers) - before - set(zeroed)):
            v = model.graph.initializers[name]
            w = v.const_value.numpy()
            # by the ONNX type: numpy files bfloat16 (ml_dtypes) under kind "V", not "f"
            if v.const_value.dtype.is_floating_point() and w.ndim >= 1:
                x = w.astype(np.float64)
                set_tensor(v, (x + rng.normal(0, noise * float(x.std()), w.shape)).astype(w.dtype))
    append_history(model, f"deepen:{method}:layers={target}")
    return model


# --- subclone, validate, train ----------------------------------------------------------------------------


def subclone(model, calib=None, *, tokenizer=None, use_bytes: bool = False, samples: int = 64, seq: int | None = None,
             allow_random_calib: bool = False, hidden: int | None = None, heads: int | None = None,
             kv_heads: int | None = None, ffn: int | None = None, layers: int | None = None,
             keep_layers: list[int] | None = None, rescale: str = "norm", provider: str = "auto",
             return_details: bool = False):
    """A smaller model whose weights are chosen from `model`'s (Weight subcloning).

    Args:
        model: the larger source: a path, an onnx.ModelProto or an onnx_ir.Model.
        calib: calibration data: a 1-D array of token ids, or a path to text (with `tokenizer`, or
            `use_bytes`) or to a .npy of ids. None ranks on random ids, only with allow_random_calib.
        samples, seq: calibration windows and tokens per window (90% rank, 10% are held out); seq
            defaults to 64, or to the sequence length a static-shape export fixes.
        hidden, heads, kv_heads, ffn: target sizes (heads follow hidden unless given).
        layers, keep_layers: target number of blocks, or exactly which blocks to keep.
        rescale: "norm" (match norm statistics), "sqrt" (the paper's sqrt(D/d)) or "none".
        provider: ONNX Runtime provider for calibration: auto, cuda or cpu.
        return_details: also return the onnxgrow.subcloning.SubcloneResult (kept hidden indices,
            removed blocks and their measured updates, sizes, the held-out windows).
    Returns:
        the smaller model, of the kind given (a ModelProto for a path); with return_details,
        the pair (model, SubcloneResult).
    """
    from .subcloning import subclone_model
    result = subclone_model(modelio.as_ir(model), calib, tokenizer=tokenizer, use_bytes=use_bytes,
                            samples=samples, seq=seq, allow_random_calib=allow_random_calib, hidden=hidden,
                            heads=heads, kv_heads=kv_heads, ffn=ffn, layers=layers, keep_layers=keep_layers,
                            rescale=rescale, provider=provider)
    small = modelio.same_kind(result.model, model)
    return (small, result) if return_details else small


def validate(source, target, **options):
    """Run `source` and `target` in ONNX Runtime on the same inputs and compare every output.

    Args:
        source, target: each a path, an onnx.ModelProto or an onnx_ir.Model (models are written to
            a temporary folder first: ONNX Runtime reads files).
        options: as onnxgrow.verify.validate: provider, inputs (.npz), tolerance, text and
            tokenizer, shapes, past_length, seed.
    Returns:
        an onnxgrow.verify.Report: `.passed`, `.exit_code` (0 or 1), `.to_dict()`, `.print(console)`.
    """
    from .verify import validate as run_validation
    with tempfile.TemporaryDirectory(prefix="onnxgrow-validate-") as tmp:
        paths = [as_path(m, Path(tmp) / name) for m, name in ((source, "source.onnx"), (target, "target.onnx"))]
        return run_validation(*paths, **options)


def as_path(model, where: Path) -> Path:
    """`model` as a file ONNX Runtime can open: a path as it is, a model saved at `where`."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    modelio.save(modelio.as_ir(model), where)  # a copy: saving sets the IR version it writes
    return where


def train(model, data, *, output=None, return_summary: bool = False, **options):
    """Continue training `model` in torch (needs the `train` extra) and write it back to ONNX.

    Args:
        model: a path, an onnx.ModelProto or an onnx_ir.Model.
        data: training text (with tokenizer= or use_bytes=True) or a .npy of token ids.
        output: where to write the trained model (default: next to a model path, `*.trained.onnx`;
            a temporary folder for a model given in memory).
        options: as onnxgrow.training.train: steps (required), batch, seq, lr, device, distill_from,
            alpha, objective, resume, tokenizer, use_bytes, force, ...
        return_summary: also return the summary dict (losses, tokens/s, output and plot paths).
    Returns:
        the trained model, of the kind given (a ModelProto for a path); with return_summary, the
        pair (model, summary).
    """
    from . import training
    with tempfile.TemporaryDirectory(prefix="onnxgrow-train-") as tmp:
        path = as_path(model, Path(tmp) / "model.onnx")
        if output is None and not isinstance(model, (str, os.PathLike)):
            output = Path(tmp) / "trained.onnx"
        summary = training.train(path, data, output=output, **options)
        trained = onnx.load(str(summary["output"]))  # weights in memory: the folder may be temporary
    result = modelio.same_kind(modelio.as_ir(trained, copy=False), model)
    return (result, summary) if return_summary else result


def export_hf(model, out_dir, *, tokenizer=None, force: bool = False) -> Path:
    """Write `model` as a Hugging Face transformers folder (config.json, model.safetensors, and the
    tokenizer files given or found beside a model path) that `from_pretrained` loads without custom
    code. A structure no transformers class computes is refused (OnnxgrowError), nothing written.

    Args:
        model: a path, an onnx.ModelProto or an onnx_ir.Model.
        out_dir: the folder to write (replaced only with force=True).
        tokenizer: a tokenizer file or folder to copy in.
    Returns:
        the folder's path.
    """
    from . import hf
    return hf.export_hf(model, out_dir, tokenizer=tokenizer, force=force)


def import_hf(folder, model, *, output=None, force: bool = False):
    """`model` with its weights replaced by a Hugging Face folder's (as export_hf wrote it, trained
    in any stack): the same graph, in its own form. Written to `output` when given.

    Args:
        folder: the Hugging Face model folder (config.json, model.safetensors or a sharded index).
        model: the ONNX graph it was exported from: a path, an onnx.ModelProto or an onnx_ir.Model.
    Returns:
        the updated model, of the kind given (a ModelProto for a path).
    """
    from . import hf
    proto = hf.import_hf(folder, model, output, force=force)
    return modelio.same_kind(modelio.as_ir(proto, copy=False), model)
