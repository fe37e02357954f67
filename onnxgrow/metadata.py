"""The metadata keys onnxgrow writes into the models it makes, and the one way to add to the history.

    onnxgrow.history   what was done to the model, one `command:method:details;` entry per step
    onnxgrow.io_map    how the target's inputs, outputs and axes map to the source's (validate reads it)
    onnxgrow.io_names  renamed inputs and outputs (deepened or pruned KV caches)
    onnxgrow.roles     safetensors names of export-weights, by structural role
    onnxgrow.stream_map how the target's residual stream maps to the source's (blockwise validate):
                       {"hidden": [new-to-old index, -1 for a new slot],
                        "boundaries": [per target boundary, the source boundary it equals, or null]}
                       Boundary 0 is the embeddings' output, boundary i the output of block i - 1.
"""

from __future__ import annotations

import json

HISTORY_KEY = "onnxgrow.history"
IO_MAP_KEY = "onnxgrow.io_map"
IO_NAMES_KEY = "onnxgrow.io_names"
ROLES_KEY = "onnxgrow.roles"
STREAM_MAP_KEY = "onnxgrow.stream_map"


def append_history(model, entry: str) -> None:
    """Add `entry` (e.g. "widen:hypercloning:hidden=128") to an onnx-ir model's history."""
    props = model.metadata_props
    props[HISTORY_KEY] = props.get(HISTORY_KEY, "") + entry.rstrip(";") + ";"


def history(model) -> list[str]:
    """The history entries of an onnx-ir model, oldest first."""
    return [e for e in model.metadata_props.get(HISTORY_KEY, "").split(";") if e]


def stream_map(model) -> dict:
    """{"hidden": list | None, "boundaries": list | None}: None where no step changed them."""
    raw = model.metadata_props.get(STREAM_MAP_KEY)
    found = json.loads(raw) if raw else {}
    return {"hidden": found.get("hidden"), "boundaries": found.get("boundaries")}


def record_stream_map(model, *, hidden=None, boundaries=None) -> None:
    """Compose this step's maps with those already recorded, so they still lead to the original model."""
    previous = stream_map(model)
    if hidden is not None:
        prior = previous["hidden"]
        previous["hidden"] = [int(i) if prior is None or i < 0 else prior[i] for i in hidden]
    if boundaries is not None:
        prior = previous["boundaries"]
        previous["boundaries"] = [b if prior is None or b is None else prior[b] for b in boundaries]
    model.metadata_props[STREAM_MAP_KEY] = json.dumps(previous)
