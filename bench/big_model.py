"""Models above 2 GB: written with external data, rewritten with bounded memory, validated.

    python bench/big_model.py [--workdir /tmp/onnxgrow-bench]

Needs the GPT-2-small export made by bench/widen_scale.py. Steps, each its own process under
/usr/bin/time -v: (1) widen x3 by HyperCloning (2304 wide, about 3.5 GB: external data);
(2) validate it against the source; (3) deepen that >2 GB model by one identity block;
(4) validate the deepened model against the original source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from widen_scale import PY, measured  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxgrow-bench"))
    args = parser.parse_args()
    src = args.workdir / "gpt2-12x768.onnx"
    if not src.exists():
        raise SystemExit("run bench/widen_scale.py first (it exports the GPT-2-small model)")
    wide, deep = args.workdir / "wide3.onnx", args.workdir / "wide3-deep13.onnx"
    for p in (wide, deep):
        p.unlink(missing_ok=True)
        Path(str(p) + ".data").unlink(missing_ok=True)
    cli = [PY, "-m", "onnxgrow"]
    rows = [
        ("widen x3 -> 2304 wide (external data)", measured(cli + ["widen", str(src), "--factor", "3", "-o", str(wide), "--no-verify"])),
        ("validate wide vs source", measured(cli + ["validate", str(src), str(wide)])),
        ("deepen the >2 GB model by one identity block", measured(cli + ["deepen", str(wide), "--layers", "13", "-o", str(deep), "--no-verify"])),
        ("validate deepened vs source", measured(cli + ["validate", str(src), str(deep)])),
    ]
    sizes = {p.name: (p.stat().st_size + Path(str(p) + ".data").stat().st_size) / 2**30 for p in (wide, deep)}
    print("| step | wall s | peak RSS GB |\n|---|---|---|")
    for name, (s, gb) in rows:
        print(f"| {name} | {s:.1f} | {gb:.2f} |")
    print("\nsizes (model + external data): " + ", ".join(f"{k} {v:.2f} GB" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
