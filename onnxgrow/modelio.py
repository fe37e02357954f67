"""Load and save models safely.

Models are held as onnx-ir models: onnx-ir keeps external data memory-mapped until a tensor is read,
keeps bf16/fp8 initializers intact, and gives use-def links that the analysis walks. Writing is atomic
(temporary file in the target folder, then rename) and never touches the input files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from .errors import OnnxgrowError
from .singlefile import merge_external

TWO_GB = 2**31
# ONNX Runtime releases accept IR versions up to a limit; exporters may write newer ones.
MAX_IR_VERSION = 10


def load(path: str | os.PathLike) -> ir.Model:
    path = Path(path)
    if not path.exists():
        raise OnnxgrowError(f"no such file: {path}")
    if not path.is_file():
        raise OnnxgrowError(f"not a file: {path}")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf gives many kinds of parse errors
        raise OnnxgrowError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    if len(model.graph) == 0:
        raise OnnxgrowError(f"{path} has an empty graph")
    check_external_data(model, path.parent)
    return model


def check_external_data(model: ir.Model, base_dir: Path) -> None:
    """Refuse external-data references that leave the model's folder or point at missing bytes."""
    base = base_dir.resolve()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = Path(tensor.location)
        target = (base / location).resolve()
        if location.is_absolute() or base not in target.parents:
            raise OnnxgrowError(f"initializer {value.name!r} points outside the model's folder: {tensor.location}")
        if (base / location).is_symlink():
            raise OnnxgrowError(f"initializer {value.name!r} external data is a symlink: {tensor.location}")
        if not target.is_file():
            raise OnnxgrowError(f"initializer {value.name!r} external data file is missing: {tensor.location}")
        end = (tensor.offset or 0) + (tensor.length or 0)
        if target.stat().st_size < end:
            raise OnnxgrowError(f"initializer {value.name!r} external data file is too short: {tensor.location}")


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None,
         input_paths: tuple[Path, ...] = (), force: bool = False, verify=None) -> Path:
    """Write `model` to `path` atomically, with external data above 2 GB (or when asked).

    The written file is checked with onnx.checker (and by `verify(temp_path)`, when given, which
    raises to refuse) before it is moved into place, so a failed write or a failed check leaves
    nothing under the output name.
    """
    path = Path(path)
    guard_output_path(path, input_paths, force)
    if external_data is None:
        external_data = weight_bytes(model) > TWO_GB - 64 * 2**20
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxgrow-", dir=path.parent))
    try:
        # Weights are streamed to an external data file first (one tensor in memory at a time); the
        # checker and `verify` see that staged model, and a single-file output is then assembled
        # from it without ever holding the whole serialized model (onnxgrow/singlefile.py).
        staged = tmp_dir / path.name
        ir.save(model, staged, external_data=data_name)
        onnx.checker.check_model(str(staged))
        if verify is not None:
            verify(staged)
        if external_data:
            os.replace(tmp_dir / data_name, path.parent / data_name)
            os.replace(staged, path)
        else:
            merged = tmp_dir / (path.name + ".single")
            merge_external(staged, merged)
            os.replace(merged, path)
    except OnnxgrowError:
        raise
    except Exception as e:
        raise OnnxgrowError(f"could not write {path}: {e}".splitlines()[0]) from None
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink()
        tmp_dir.rmdir()
    return path


def guard_output_path(path: Path, input_paths: tuple[Path, ...], force: bool) -> None:
    if path.is_symlink():
        raise OnnxgrowError(f"refusing to write through a symlink: {path}")
    for src in input_paths:
        src = Path(src)
        if path.resolve() == src.resolve() or path.resolve() == Path(str(src) + ".data").resolve():
            raise OnnxgrowError(f"refusing to overwrite the input model: {path}")
    if path.exists() and not force:
        raise OnnxgrowError(f"output exists: {path} (use --force to replace it)")
