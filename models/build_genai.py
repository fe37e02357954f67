"""Regenerate models/genai/: tiny random transformers written by the onnxruntime-genai model builder.

The builder (python -m onnxruntime_genai.models.builder) needs transformers 5, which the project's
`models` extra pins below; run this script with a Python whose environment has onnxruntime-genai and
transformers>=5 (a separate venv):

    python -m venv /tmp/genai-venv && /tmp/genai-venv/bin/pip install onnxruntime-genai "transformers>=5" torch
    /tmp/genai-venv/bin/python models/build_genai.py

Each model is made from a random Hugging Face checkpoint of a tiny config (hidden 64, 4 heads, 2 kv
heads, 2 layers, FFN 160, vocab 1000) with a tokenizer.json of a matching vocabulary, then converted
at fp32 and int4 for the CPU:

    models/genai/<family>-fp32/   model.onnx(+.data), genai_config.json, tokenizer files
    models/genai/<family>-int4/   the same with MatMulNBits weights
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=1000, max_position_embeddings=128, head_dim=16,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tiny_checkpoint(family: str, out: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A random Hugging Face checkpoint of the tiny config, with `tokenizer` copied beside it."""
    import torch
    import transformers
    torch.manual_seed(seed)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    model = model_class(config_class(**TINY, rms_norm_eps=1e-6))
    model.save_pretrained(out)
    shutil.copy(tokenizer, out / "tokenizer.json")
    return out


def build(hf_dir: Path, out: Path, precision: str) -> None:
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                    "-p", precision, "-e", "cpu"], check=True)
    keep_special_ids_in_vocabulary(out / "genai_config.json")


def keep_special_ids_in_vocabulary(config_path: Path) -> None:
    """The builder takes Qwen2's end-of-turn and padding ids from the tokenizer, which a borrowed
    tokenizer puts beyond the tiny vocabulary (onnxruntime_genai then refuses the folder): use the
    model configuration's ids."""
    config = json.loads(config_path.read_text())
    model = config["model"]
    vocab = model["vocab_size"]
    eos = [i for i in (model["eos_token_id"] if isinstance(model["eos_token_id"], list) else [model["eos_token_id"]])
           if i < vocab] or [TINY["eos_token_id"]]
    model["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if model.get("pad_token_id", 0) >= vocab:
        model["pad_token_id"] = TINY["eos_token_id"]
    config_path.write_text(json.dumps(config, indent=4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llama,qwen2")
    parser.add_argument("--tokenizer", type=Path, default=HERE / "genai" / "llama-fp32" / "tokenizer.json",
                        help="a tokenizer.json whose vocabulary fits 1000 ids")
    args = parser.parse_args()
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf = tiny_checkpoint(family, Path(tmp) / "hf", args.tokenizer)
            for precision in ("fp32", "int4"):
                out = HERE / "genai" / f"{family}-{precision}"
                shutil.rmtree(out, ignore_errors=True)
                build(hf, out, precision)
                print("wrote", out)


if __name__ == "__main__":
    main()
