"""Token streams for training and calibration: a text file through a tokenizer.json, raw bytes, or
a .npy of token ids. Kept free of torch, so that subclone's calibration needs only ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import OnnxgrowError

TEXT_CHUNK = 1 << 16  # characters per tokenizer call


def load_tokens(data_path, tokenizer=None, use_bytes: bool = False, vocab: int | None = None) -> np.ndarray:
    """The token stream of a text file (through a tokenizer.json, or raw bytes) or a .npy of ids."""
    path = Path(data_path)
    if not path.is_file():
        raise OnnxgrowError(f"no such data file: {path}")
    if path.suffix == ".npy":
        if tokenizer is not None or use_bytes:
            raise OnnxgrowError(f"{path} already holds token ids; drop --tokenizer/--bytes")
        try:
            ids = np.load(path, allow_pickle=False)
        except Exception as e:
            raise OnnxgrowError(f"{path} is not a readable .npy file ({type(e).__name__})") from None
        if ids.dtype.kind not in "iu":
            raise OnnxgrowError(f"{path} holds {ids.dtype} values; token ids must be integers")
        ids = ids.reshape(-1).astype(np.int64)
    elif use_bytes:
        if tokenizer is not None:
            raise OnnxgrowError("give a tokenizer or bytes, not both")
        if vocab is not None and vocab < 256:
            raise OnnxgrowError(f"byte tokens need a vocabulary of at least 256 ids; the model has {vocab}")
        ids = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64)
    elif tokenizer is not None:
        ids = np.asarray(encode_text(path, open_tokenizer(tokenizer)), dtype=np.int64)
    else:
        raise OnnxgrowError(f"{path} is text: give a tokenizer.json, or use bytes as tokens")
    if ids.size == 0:
        raise OnnxgrowError(f"{path} holds no tokens")
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise OnnxgrowError(f"{path} has token ids up to {ids.max()} (min {ids.min()}), outside the model's "
                            f"vocabulary of {vocab}")
    return ids


def open_tokenizer(path):
    from tokenizers import Tokenizer
    path = Path(path)
    if not path.is_file():
        raise OnnxgrowError(f"no such tokenizer file: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise OnnxgrowError(f"{path} is not a tokenizer.json ({e})".splitlines()[0]) from None


def encode_text(path: Path, tok) -> list[int]:
    """Encode in line-aligned chunks: one call on a whole corpus would hold every offset in memory."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OnnxgrowError(f"{path} is not UTF-8 text") from None
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= TEXT_CHUNK:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    ids = []
    for enc in tok.encode_batch(chunks, add_special_tokens=False):
        ids.extend(enc.ids)
    return ids
