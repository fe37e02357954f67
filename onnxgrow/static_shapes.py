"""Feeding a static-shape export: windows that fit its fixed batch and sequence length.

`torch.onnx.export(model, (ids,))` with no dynamic shapes (torch 2.13's default) writes every shape
as a literal, so the model runs at exactly the batch x sequence it was exported with. The rewrites
keep those shapes (the batch and the sequence are never resized). Whatever feeds the model (subclone's
calibration and fidelity report, train, validate) fits its windows to them, option by option:

    fit(asked, fixed) = fixed   when the option was not given (the command's report says so)
                      = asked   when the axis is dynamic, or asked == fixed
                      refused   otherwise, naming the size that fits

A fixed batch is filled a whole batch at a time: the last, partial batch of windows is padded with
copies of its first window, whose outputs are then dropped (`batches`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from .errors import OnnxgrowError

log = logging.getLogger(__name__)

AXIS_WORDS = {"--seq": "sequence length", "--batch": "batch", "--samples": "batch"}


def fit(option: str, asked: int | None, fixed: int | None, default: int) -> int:
    """The value to use for `option` (e.g. "--seq") on a model whose axis is `fixed` (None: dynamic)."""
    if fixed is None:
        return default if asked is None else asked
    if asked is None:  # said by the command once it has run (a refusal stays the one line printed)
        log.info("%s %d: the model's inputs have a static %s of %d (a static-shape export)",
                 option, fixed, AXIS_WORDS.get(option, "size"), fixed)
        return fixed
    if asked != fixed:
        raise OnnxgrowError(f"{option} {asked} does not fit: the model's inputs have a static "
                            f"{AXIS_WORDS.get(option, 'size')} of {fixed} (a static-shape export); use "
                            f"{option} {fixed}, or export the model with dynamic shapes")
    return asked


def fit_sequence(spec, asked: int | None, default: int) -> int:
    """The window length for `spec` (a structure.TransformerSpec): `fit` to a static sequence, and no
    longer than a learned position table, which a longer window would read past (ONNX Runtime then
    fails in a Gather). A default is shortened to the table; a longer length asked for is refused."""
    table = spec.position_embedding
    rows = table.const_value.shape[-2] if table is not None and table.const_value is not None else None
    if rows is not None and asked is None and default > rows:
        log.info("--seq %d: the model has %d learned positions", rows, rows)
        default = rows
    seq = fit("--seq", asked, spec.static_shape()[1], default)
    if rows is not None and seq > rows:
        raise OnnxgrowError(f"--seq {seq} is longer than the model's {rows} learned positions; use --seq {rows} "
                            f"or less")
    return seq


def fixed_token_shape(plan) -> tuple[int | None, int | None]:
    """(batch, sequence) of the token-ids input where they are fixed in the graph, else None each.
    `plan` is an onnxgrow.verify.InputPlan (inputs told apart by role)."""
    tokens = next((s for s in plan.specs if s.kind == "tokens"), None)
    dims = list(tokens.dims) if tokens is not None else []
    fixed = [d if isinstance(d, int) else None for d in dims] + [None, None]
    return fixed[0], fixed[1]


def batches(ids: np.ndarray, batch: int, fixed_batch: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(windows to feed, how many of them are real) for each batch of the rows of `ids`.
    With a fixed batch every chunk has exactly that many rows (see the module docstring)."""
    size = fixed_batch or batch
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        real = len(chunk)
        if fixed_batch and real < fixed_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], fixed_batch - real, axis=0)])
        yield chunk, real
