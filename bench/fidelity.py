"""Output fidelity of every growth method on every zoo model, measured by `validate` (ORT, CPU).

    python bench/fidelity.py            # prints markdown tables for docs/BENCHMARKS.md
    python bench/fidelity.py --only gpt2-dynamo23 --shapes 1x5,1x9,1x16   # some models, other shapes
    python bench/fidelity.py --dequantize --paths models/genai/llama-int4/model.onnx   # quantized weights

Width targets for the any-size methods: hidden, heads, kv heads and FFN x1.5 (e.g. 64 -> 96, 4 -> 6
heads). Depth: identity / stack / interleave to twice the layers. Reported: the largest absolute
difference over outputs and input cases, the smallest cosine similarity, and top-1 agreement of
logits (for models whose output is logits). With --dequantize the quantized weights are made float
first (onnxgrow.dequantize, as `--dequantize` does on the command line) and each grown float model is
compared with the quantized source: the figures then include the quantization error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import onnxgrow  # noqa: E402
from onnxgrow.api import deepen  # noqa: E402
from onnxgrow.verify import validate  # noqa: E402


SHAPES = ((1, 5), (2, 9), (3, 16))  # validate's default; a static-shape export is fed its own shape


def measure(model: onnx.ModelProto, source: Path, tmp: Path) -> str:
    path = tmp / "m.onnx"
    onnx.save(model, path)
    r = validate(source, path, shapes=SHAPES)
    worst = max(o.max_abs_diff for o in r.outputs)
    cos = min(o.cosine for o in r.outputs if o.cosine is not None)
    top1 = [o.top1_agreement for o in r.outputs if o.top1_agreement is not None]
    return f"{worst:.2g} / {cos:.3f}" + (f" / {top1[0]:.0%}" if top1 else "")


def main():
    global SHAPES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="these zoo models (default: all)")
    p.add_argument("--shapes", help="input shapes, batch x seq, e.g. 1x5,1x9,1x16")
    p.add_argument("--paths", nargs="+", type=Path, default=[],
                   help="models outside the zoo (named by their folder), e.g. models/genai/llama-fp32/model.onnx")
    p.add_argument("--dequantize", action="store_true",
                   help="grow the float version of quantized models; compare with the quantized source")
    args = p.parse_args()
    if args.shapes:
        SHAPES = tuple(tuple(int(n) for n in s.split("x")) for s in args.shapes.split(","))
    from conftest import load_builder, ZOO
    zoo = [] if args.paths and not args.only else load_builder().build_zoo(ZOO, args.only)
    entries = [dict(name=e["name"], file=ZOO / e["path"]) for e in zoo if "error" not in e]
    # a genai folder holds model.onnx: named by its folder; a file of its own by its name
    entries += [dict(name=path.parent.name if path.name == "model.onnx" else path.stem, file=path) for path in args.paths]
    tmp = Path(tempfile.mkdtemp())
    print("### Width: max abs diff / min cosine / top-1 agreement (logits)\n")
    print("| model | hypercloning x2 | fpi x1.5 | aki x1.5 | pad x1.5 | pad x1.5, noise 0.01 |")
    print("|---|---|---|---|---|---|")
    for e in entries:
        src = e["file"]
        e["float"] = onnxgrow.dequantize(onnx.load(str(src))) if args.dequantize else src
    for e in entries:
        src, grown = e["file"], e["float"]
        c = onnxgrow.inspect(grown)
        target = dict(hidden=c["hidden_size"] * 3 // 2, heads=c["num_heads"] * 3 // 2,
                      kv_heads=c["num_kv_heads"] * 3 // 2, ffn=c["ffn_size"] * 3 // 2)
        cells = [measure(onnxgrow.widen(grown, 2), src, tmp)]
        for method, noise in (("fpi", 0.0), ("aki", 0.0), ("pad", 0.0), ("pad", 0.01)):
            cells.append(measure(onnxgrow.widen(grown, method=method, noise=noise, **target), src, tmp))
        print(f"| {e['name']} | " + " | ".join(cells) + " |")
    print("\n### Depth x2: max abs diff / min cosine / top-1 agreement (logits)\n")
    print("| model | identity | stack | interleave |")
    print("|---|---|---|---|")
    for e in entries:
        src, grown = e["file"], e["float"]
        cells = []
        for method in ("identity", "stack", "interleave"):
            try:
                cells.append(measure(deepen(grown, factor=2, method=method), src, tmp))
            except onnxgrow.OnnxgrowError as err:
                cells.append("refused: " + str(err).split(";")[0][:60])
        print(f"| {e['name']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
