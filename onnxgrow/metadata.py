"""The metadata keys onnxgrow writes into the models it makes, and the one way to add to the history.

    onnxgrow.history   what was done to the model, one `command:method:details;` entry per step
    onnxgrow.io_map    how the target's inputs, outputs and axes map to the source's (validate reads it)
    onnxgrow.io_names  renamed inputs and outputs (deepened or pruned KV caches)
    onnxgrow.roles     safetensors names of export-weights, by structural role
"""

from __future__ import annotations

HISTORY_KEY = "onnxgrow.history"
IO_MAP_KEY = "onnxgrow.io_map"
IO_NAMES_KEY = "onnxgrow.io_names"
ROLES_KEY = "onnxgrow.roles"


def append_history(model, entry: str) -> None:
    """Add `entry` (e.g. "widen:hypercloning:hidden=128") to an onnx-ir model's history."""
    props = model.metadata_props
    props[HISTORY_KEY] = props.get(HISTORY_KEY, "") + entry.rstrip(";") + ";"


def history(model) -> list[str]:
    """The history entries of an onnx-ir model, oldest first."""
    return [e for e in model.metadata_props.get(HISTORY_KEY, "").split(";") if e]
