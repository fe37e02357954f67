"""Time and peak memory of `onnxgrow widen --factor 2` on a GPT-2-small-sized export, against the
floor of loading and saving the output with `onnx`.

    python bench/widen_scale.py [--workdir DIR] [--layers 12] [--hidden 768] [--vocab 50257]

Each measured step runs in its own process under /usr/bin/time -v, so "peak" is that process's
maximum resident set size. The export (random weights, TorchScript opset 17) is made once.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def export(path: Path, layers: int, hidden: int, vocab: int) -> None:
    code = f"""
import importlib.util, torch, transformers as T, warnings
warnings.filterwarnings("ignore")
spec = importlib.util.spec_from_file_location("zoo_build", r"{ROOT / 'models' / 'build.py'}")
build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)
torch.manual_seed(0)
c = T.GPT2Config(n_embd={hidden}, n_head={hidden // 64}, n_layer={layers}, vocab_size={vocab},
                 n_positions=1024, attn_implementation="eager")
m = T.GPT2LMHeadModel(c).eval()
class W(torch.nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def forward(s, ids, mask): return s.m(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=False)[0]
ids = torch.randint(0, {vocab}, (1, 8))
mask = torch.ones_like(ids)
with build.traceable_masks():  # transformers' vmap masks do not trace
    torch.onnx.export(W(m), (ids, mask), r"{path}", input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={{"input_ids": {{0: "b", 1: "s"}}, "attention_mask": {{0: "b", 1: "s"}}}})
"""
    subprocess.run([PY, "-c", code], check=True)


def measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of a command."""
    t = time.time()
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.time() - t
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return seconds, peak_kb / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxgrow-bench"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"gpt2-{args.layers}x{args.hidden}.onnx"
    out = args.workdir / "wide.onnx"
    if not src.exists():
        export(src, args.layers, args.hidden, args.vocab)
    for p in (out, Path(str(out) + ".data"), args.workdir / "floor.onnx"):
        p.unlink(missing_ok=True)
    cli = [PY, "-m", "onnxgrow"]
    rows = {}
    rows["widen x2 (rewrite + checker)"] = measured(cli + ["widen", str(src), "--factor", "2", "-o", str(out),
                                                           "--no-verify"])
    floor = f"import onnx; m = onnx.load(r'{out}'); onnx.save(m, r'{args.workdir / 'floor.onnx'}')"
    rows["floor: onnx.load + onnx.save of the output"] = measured([PY, "-c", floor])
    out.unlink()
    rows["widen x2 with ORT verification"] = measured(cli + ["widen", str(src), "--factor", "2", "-o", str(out)])
    sizes = {"source MB": src.stat().st_size / 2**20, "output MB": out.stat().st_size / 2**20}
    ratio = rows["widen x2 (rewrite + checker)"][0] / rows["floor: onnx.load + onnx.save of the output"][0]
    print(json.dumps({"rows": rows, "sizes": sizes, "ratio_to_floor": ratio}, indent=2))
    print("| step | wall s | peak RSS GB |\n|---|---|---|")
    for name, (s, gb) in rows.items():
        print(f"| {name} | {s:.1f} | {gb:.2f} |")
    print(f"\nsource {sizes['source MB']:.0f} MB, output {sizes['output MB']:.0f} MB; "
          f"rewrite / floor = {ratio:.2f}")


if __name__ == "__main__":
    main()
