"""The onnxruntime-genai model form: a folder with model.onnx, genai_config.json and the tokenizer.

The genai model builder writes the residual stream through SkipSimplifiedLayerNormalization
(com.microsoft), a norm like the others to the analysis (onnxgrow/fusednorms.py splits one at a block
boundary for a block edit and fuses it back), so the output has the source's ops.

`write_genai_folder` makes the output folder load in `onnxruntime_genai.Model`: genai_config.json
with the new sizes and file name, and the source folder's tokenizer files beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path


log = logging.getLogger(__name__)

CONFIG = "genai_config.json"
# what the builder writes beside the model for the tokenizer and chat template
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "processor_config.json")


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
