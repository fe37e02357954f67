"""Hugging Face transformers folders out of an ONNX transformer, and their trained weights back in.

    export_hf("grown.onnx", "hf/")                # config.json, model.safetensors (+ tokenizer files)
    ... AutoModelForCausalLM.from_pretrained("hf/") in any training stack ...
    import_hf("hf/", "grown.onnx", "trained.onnx")  # the same graph, the trained weights

The family and its config come from the structure analysis (families.choose) and the graph's own
constants (facts); the tensors from the role mapping that export-weights uses (weights.roles_of),
so a layout difference (GPT-2's [in, out] Conv1D, a transposed MatMul weight, a tied head's copy)
is handled once, both ways. Writing the folder needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import modelio
from ..errors import OnnxgrowError
from ..structure import TransformerSpec, find_norms, is_projection, producers_back, residual_input
from ..weights import projection, spec_and_roles, tensor_from_ir, write_assignments
from .families import Layout, choose

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def extra_roles(spec: TransformerSpec) -> dict[str, tuple[str, bool]]:
    """Post-norm (BERT) roles the common mapping leaves under other.*: the norm after the last
    block (each other block's output norm is the next block's norm0) and the MLM head's dense."""
    if spec.norm_position != "post":
        return {}
    roles: dict = {}
    flow, down = spec.flow, spec.blocks[-1].ffn.down
    used = {n.output for b in spec.blocks for n in b.norms} | ({spec.final_norm.output} if spec.final_norm else set())
    for norm in find_norms(spec.model.graph, flow, spec.hidden):
        if norm.output not in used and down in producers_back(residual_input(norm), lambda n: is_projection(flow, n)):
            roles |= {f"last_norm.{k}": (v, False) for k, v in (("weight", norm.scale), ("bias", norm.bias)) if v}
            break
    if spec.lm_head is not None and spec.final_norm is not None:
        dense = producers_back(spec.final_norm.input, lambda n: is_projection(flow, n))
        if len(dense) == 1 and dense[0] is not down:
            projection(spec, dense[0], "head.transform", roles)
    return roles


def layout_of(model) -> tuple:
    m, spec, roles = spec_and_roles(model, extra_roles)
    return m, spec, roles, choose(spec, roles)


def export_hf(model, out_dir, *, tokenizer=None, force: bool = False) -> Path:
    """Write `model` as a Hugging Face transformers folder; refuse (nothing written) when no
    transformers class computes its structure."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    modelio.guard_output_path(out_dir, (), force)
    m, spec, roles, layout = layout_of(model)
    unplaced = unplaced_weights(spec, roles, layout)
    if unplaced:
        raise OnnxgrowError(f"{layout.config['architectures'][0]} has no place for weights {', '.join(unplaced[:3])}")
    tensors = hf_tensors(m, roles, layout)
    tokenizer_files = find_tokenizer(tokenizer, model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnxgrow-hf-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(layout.config, indent=2) + "\n")
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote %s (%s, %d tensors)", out_dir, layout.config["architectures"][0], len(tensors))
    return out_dir


def hf_tensors(m, roles: dict, layout: Layout) -> dict[str, torch.Tensor]:
    """The folder's tensors by their Hugging Face names, in the class's layout."""
    tensors = {}
    for hf, role, transposed in layout.entries:
        name, role_transposed = roles[role]
        t = tensor_from_ir(m.graph.initializers[name].const_value)
        if t.ndim > 2:  # a static export's folded lookup, [batch, positions, hidden]: the rows it holds
            t = folded_rows(t, hf)
        t = t.t() if role_transposed else t  # the role's layout: [out, in]
        if hf in layout.parts:
            k, n = layout.parts[hf]
            t = t.chunk(n)[k]
        # the class stores [out, in] too, unless `transposed` (GPT-2's Conv1D: [in, out])
        tensors[hf] = (t.t() if transposed else t).contiguous()
    for hf, owner in layout.zeros.items():
        name, owner_transposed = roles[owner]
        weight = m.graph.initializers[name].const_value
        width = weight.shape[1] if owner_transposed else weight.shape[0]  # the role's first axis: out features
        tensors[hf] = torch.zeros(width // layout.parts.get(hf, (0, 1))[1], dtype=tensor_from_ir(weight).dtype)
    return tensors


def folded_rows(t: torch.Tensor, hf: str) -> torch.Tensor:
    """The [positions, hidden] rows of a lookup folded for every sequence of a static batch."""
    rows = t.reshape(-1, *t.shape[-2:])
    if not all(torch.equal(rows[0], r) for r in rows[1:]):
        raise OnnxgrowError(f"{hf}: the graph's folded lookup differs between sequences of the batch")
    return rows[0]


def unplaced_weights(spec: TransformerSpec, roles: dict, layout: Layout) -> list[str]:
    """Trainable weights (carrying a model dimension) that no tensor of the layout holds."""
    from ..structure import parameter_names
    aliases = spec.model.graph.meta.get("onnxgrow_aliases", {})
    placed = {roles[role][0] for _, role, _ in layout.entries}
    if layout.config.get("tie_word_embeddings") and "lm_head" in roles:
        placed.add(roles["lm_head"][0])
    return sorted({aliases.get(n, n) for n in parameter_names(spec)} - placed)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an existing one (--force) goes only once it is ready."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=".onnxgrow-old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def find_tokenizer(tokenizer, model) -> list[Path]:
    """Tokenizer files from `tokenizer` (a file or a folder), else beside the model file."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise OnnxgrowError(f"no such tokenizer file or folder: {path}")
        where = path
    elif isinstance(model, (str, os.PathLike)):
        where = Path(model).parent
    else:
        return []
    return [where / f for f in TOKENIZER_FILES if (where / f).is_file()]


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of a Hugging Face folder (one file or a sharded index)."""
    from safetensors.torch import load_file
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise OnnxgrowError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise OnnxgrowError(f"{folder} has no model.safetensors (pytorch_model.bin is not read: save with safetensors)")
    tensors = {}
    for f in files:
        tensors |= load_file(str(folder / f))
    return config, tensors


def import_hf(folder, model, out_path=None, *, force: bool = False):
    """`model` (the ONNX graph the folder was exported from, or one of the same structure) with its
    weights replaced by the folder's. Returns the ModelProto, and writes it when `out_path` is given."""
    folder = Path(folder)
    inputs = (Path(model),) if isinstance(model, (str, os.PathLike)) else ()
    if out_path is not None:
        modelio.guard_output_path(Path(out_path), inputs, force)
    config, tensors = read_checkpoint(folder)
    m, spec, roles, layout = layout_of(model)
    want = layout.config["model_type"]
    if config.get("model_type") != want:
        raise OnnxgrowError(f"{folder} holds a {config.get('model_type')} model; this graph is {want}")
    role_values, parted = {}, {}
    for hf, role, transposed in layout.entries:
        value = checkpoint_tensor(tensors, hf, layout.prefix)
        if value is None:
            raise OnnxgrowError(f"{folder} lacks {hf}")
        value = value.t() if transposed else value
        if hf in layout.parts:  # one of n parts of the role: joined once all are read, in order
            parted.setdefault(role, {})[layout.parts[hf][0]] = value
        else:
            role_values[role] = value
    for role, pieces in parted.items():
        role_values[role] = torch.cat([pieces[k] for k in sorted(pieces)])
    for hf in layout.zeros:
        value = checkpoint_tensor(tensors, hf, layout.prefix)
        if value is not None and bool(value.any()):
            raise OnnxgrowError(f"{hf} is no longer zero, and the graph has no bias there (its exporter dropped "
                                "an all-zero one): freeze it in training, or export from a graph that keeps it")
    if "lm_head" in roles and "lm_head" not in role_values:  # tied: the head is the token table
        role_values["lm_head"] = role_values["embed.tokens"]
    values = {}
    for role, value in role_values.items():
        name, transposed = roles[role]
        value = (value.t() if transposed else value).contiguous()
        stored = tuple(m.graph.initializers[name].const_value.shape)
        if len(stored) > 2 and tuple(value.shape) == stored[-2:]:
            value = value.expand(stored).contiguous()  # back into a folded lookup's [batch, positions, hidden]
        if name in values and not torch.equal(values[name], value):
            # the exporter merged equal parameters (a fresh model's norms) and training parted them
            raise OnnxgrowError(f"{role} and another tensor share initializer {name!r} in the graph but now "
                                "hold different values: re-export the model without merged parameters")
        values[name] = value
    proto = write_assignments(model, roles, values)
    if out_path is not None:
        import onnx_ir as ir
        modelio.save(ir.from_proto(proto), Path(out_path), input_paths=inputs, force=force)
    return proto


def checkpoint_tensor(tensors: dict, name: str, prefix: str):
    """A tensor by its head model's name, or by the base model's (a folder saved from AutoModel)."""
    if name in tensors:
        return tensors[name]
    if name.startswith(prefix) and name[len(prefix):] in tensors:
        return tensors[name[len(prefix):]]
    if prefix + name in tensors:
        return tensors[prefix + name]
    return None
