"""The onnxruntime-genai model form: a folder with model.onnx, genai_config.json and the tokenizer.

The genai model builder writes the residual stream through SkipSimplifiedLayerNormalization
(com.microsoft): one node adds the block's output to the stream (its output 3 is the new stream) and
normalizes the sum for the next projections (its output 0). A block boundary then falls inside a node,
so for the analysis each one is split into the Add and the SimplifiedLayerNormalization it fuses
(`split_skip_norms`, run by normalize); before the result is written the pairs are fused back
(`fuse_skip_norms`), so the output has the source's ops and runs at the source's speed.

`write_genai_folder` makes the output folder load in `onnxruntime_genai.Model`: genai_config.json
with the new sizes and file name, and the source folder's tokenizer files beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import onnx_ir as ir

log = logging.getLogger(__name__)

MICROSOFT = "com.microsoft"
SKIP_NORM = "SkipSimplifiedLayerNormalization"
SPLIT_MARK = "onnxgrow_split_skip_norms"  # graph.meta: the graph's skip norms were split on loading
CONFIG = "genai_config.json"
# what the builder writes beside the model for the tokenizer and chat template
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "processor_config.json")


# --- SkipSimplifiedLayerNormalization, apart and together -------------------------------------------------

def split_skip_norms(graph: ir.Graph) -> int:
    """Replace each SkipSimplifiedLayerNormalization by Add (+ bias) and SimplifiedLayerNormalization;
    the number split. A node whose mean or inverse-std outputs are read is left as it is."""
    count = 0
    for node in list(graph):
        if node.op_type != SKIP_NORM or node.domain != MICROSOFT:
            continue
        outs = list(node.outputs) + [None] * (4 - len(node.outputs))
        if any(o is not None and (o.uses() or o.is_graph_output()) for o in outs[1:3]):
            continue
        x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
        bias = node.inputs[3] if len(node.inputs) > 3 else None
        add = ir.node("Add", [x, skip], name=f"{node.name}/skip_add")
        total = add.outputs[0]
        new_nodes = [add]
        if bias is not None:
            add_bias = ir.node("Add", [total, bias], name=f"{node.name}/bias_add")
            new_nodes.append(add_bias)
            total = add_bias.outputs[0]
        eps = node.attributes.get("epsilon")
        norm = ir.node("SimplifiedLayerNormalization", [total, gamma], name=node.name,
                       attributes={"axis": -1, "epsilon": eps.value if eps is not None else 1e-5, "stash_type": 1})
        new_nodes.append(norm)
        graph.insert_before(node, new_nodes)
        keep_values(node.outputs[0], norm.outputs[0])
        if outs[3] is not None:
            keep_values(outs[3], total)
        graph.remove(node, safe=True)
        count += 1
    if count:
        graph.meta[SPLIT_MARK] = True
        log.debug("split %d %s nodes into Add + SimplifiedLayerNormalization", count, SKIP_NORM)
    return count


def keep_values(old: ir.Value, new: ir.Value) -> None:
    """`new` takes `old`'s place: its readers, its name, and its place among the graph outputs."""
    new.type, new.shape = old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name = old.name
    old.name = None
    new.name = name


def fuse_skip_norms(model: ir.Model) -> int:
    """Fuse Add -> SimplifiedLayerNormalization pairs back into SkipSimplifiedLayerNormalization, in a
    graph whose skip norms `split_skip_norms` split (copied blocks included); the number fused."""
    graph = model.graph
    if not graph.meta.get(SPLIT_MARK):
        return 0
    count = 0
    for norm in list(graph):
        if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        add = norm.inputs[0].producer()
        if add is None or add.op_type != "Add" or any(v.is_initializer() or v.const_value is not None
                                                     for v in add.inputs):
            continue
        total, y = add.outputs[0], norm.outputs[0]
        rest = [u for u in total.uses() if u.node is not norm]
        n_out = 4 if rest or total.is_graph_output() else 1
        eps = norm.attributes.get("epsilon")
        fused = ir.node(SKIP_NORM, [add.inputs[0], add.inputs[1], norm.inputs[1]], domain=MICROSOFT,
                        num_outputs=n_out, name=norm.name,
                        attributes={"epsilon": eps.value if eps is not None else 1e-5})
        graph.insert_before(add, fused)
        keep_values(y, fused.outputs[0])
        if n_out == 4:
            for o in fused.outputs[1:3]:
                o.name = ""  # mean and inverse std: not computed
            keep_values(total, fused.outputs[3])
        graph.remove(norm, safe=True)
        graph.remove(add, safe=True)
        count += 1
    if MICROSOFT not in graph.opset_imports:
        graph.opset_imports[MICROSOFT] = 1
    log.debug("fused %d Add + SimplifiedLayerNormalization pairs back into %s", count, SKIP_NORM)
    return count


# --- the folder ----------------------------------------------------------------------------------------

def is_genai_folder(model_path: Path) -> bool:
    return (Path(model_path).parent / CONFIG).is_file()


def write_genai_folder(source: Path, output: Path, config: dict | None = None) -> Path | None:
    """Beside `output`: genai_config.json from the source's, with `config`'s sizes (onnxgrow inspect's
    keys; by default the output's own) and the output's file name, and the source's tokenizer files.
    None where the source has no genai_config.json beside it."""
    source, output = Path(source), Path(output)
    if not is_genai_folder(source):
        return None
    if config is None:
        from .api import inspect
        config = inspect(output)
    genai = json.loads((source.parent / CONFIG).read_text())
    decoder = genai["model"]["decoder"]
    decoder.update(filename=output.name, hidden_size=config["hidden_size"],
                   num_attention_heads=config["num_heads"], num_key_value_heads=config["num_kv_heads"],
                   head_size=config["head_dim"], num_hidden_layers=config["num_layers"])
    if config.get("vocab_size"):
        genai["model"]["vocab_size"] = config["vocab_size"]
    target = output.parent / CONFIG
    if source.parent.resolve() == output.parent.resolve():
        log.warning("not rewriting %s: the output is in the source's folder (write it to a folder of its own)",
                    target)
        return None
    target.write_text(json.dumps(genai, indent=4))
    for name in TOKENIZER_FILES:
        if (source.parent / name).is_file():
            shutil.copy2(source.parent / name, output.parent / name)
    return target
