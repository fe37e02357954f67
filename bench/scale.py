"""Rewrite time and peak memory at scale, against the I/O floor; and every command on a model above 2 GB.

    python bench/scale.py [--workdir /tmp/onnxgrow-bench] [--models small,big]
    python bench/scale.py --models tiny          # smoke run: a 2 x 64 GPT-2, seconds

Models (random weights, GPT-2 architecture, TorchScript opset 17, exported once and kept in WORKDIR):
- small: GPT-2-small, 12 layers x 768, 124M parameters, one 0.5 GB file.
- big: 24 layers x 1280 (20 heads), 537M parameters, 2.2 GB: ONNX external data.

For each model: widen x2 (HyperCloning), deepen x2 (stack), subclone to half width and half depth
(ranked on random token ids, --allow-random-calib, without the fidelity report). Each runs as `python -m onnxgrow ... --no-verify`
in its own process under /usr/bin/time -v ("peak" = that process's maximum resident set size). The
"onnx floor" of each is `onnx.load` + `onnx.save` of its output (external data above 2 GB, as onnxgrow
writes it): Python's protobuf round trip, not a physical limit. The physical floor is reading the
input and writing the output at the disk's sequential bandwidth, measured in the same run beside
each command's output (`disk_bandwidth`: a file of the output's size written with fdatasync, then
read back, cold where the kernel lets us drop it from the page cache):

    physical floor = input bytes / read bandwidth + output bytes / write bandwidth

The memory bound we aim at is input + output + the largest single tensor.
On the big model, also: inspect, validate (widened vs source), train (2 steps), export-weights and\nimport-weights.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
GB = 2**30
MODELS = {"small": dict(layers=12, hidden=768, heads=12), "big": dict(layers=24, hidden=1280, heads=20),
          "tiny": dict(layers=2, hidden=64, heads=4)}  # tiny: a smoke run of the script itself
# huge (--verified only): 26 x 2048, 16 heads, 1.41B parameters, 5.65 GB. torch exports 4 blocks (its
# export would hold several copies of 5 GB); onnxgrow's stack deepen then copies them to 26 blocks.
HUGE = dict(layers=26, hidden=2048, heads=16, exported_layers=4)
CHUNK = 64 * 2**20


def export(path: Path, layers: int, hidden: int, heads: int, vocab: int = 50257) -> None:
    code = f"""
import importlib.util, torch, transformers as T, warnings
warnings.filterwarnings("ignore")
spec = importlib.util.spec_from_file_location("zoo_build", r"{ROOT / 'models' / 'build.py'}")
build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)
torch.manual_seed(0)
c = T.GPT2Config(n_embd={hidden}, n_head={heads}, n_layer={layers}, vocab_size={vocab},
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
    # torch writes one file per tensor above 2 GB; gather them into one external-data file
    if sum(1 for _ in path.parent.glob("*")) > 2 or path.stat().st_size < 2**20:
        tidy = f"""
import onnx, os, glob
m = onnx.load(r"{path}")
onnx.save(m, r"{path}.tmp", save_as_external_data=True, location="{path.name}.data")
os.replace(r"{path}.tmp", r"{path}")
"""
        subprocess.run([PY, "-c", tidy], check=True)


def measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of a command."""
    t = time.time()
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.time() - t
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return seconds, peak_kb / 2**20


def size_of(path: Path) -> float:
    """GB on disk, the model file and its external data."""
    data = Path(str(path) + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / GB


def largest_tensor(path: Path) -> float:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    biggest = 0
    for t in m.graph.initializer:
        n = 4
        for d in t.dims:
            n *= d
        biggest = max(biggest, n)
    return biggest / GB


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)


def floor(out: Path, workdir: Path) -> tuple[float, float]:
    copy = workdir / "floor.onnx"
    remove(copy)
    external = size_of(out) > 1.9  # as onnxgrow decides: one file below 2 GB, external data above
    code = (f"import onnx; m = onnx.load(r'{out}'); "
            f"onnx.save(m, r'{copy}', save_as_external_data={external}, location='floor.onnx.data')")
    result = measured([PY, "-c", code])
    remove(copy)
    return result


def disk_bandwidth(workdir: Path, nbytes: int) -> dict:
    """Sequential write and read bandwidth (bytes/s) of the disk under `workdir`, on a file of `nbytes`.

    The write ends with fdatasync, so it counts the disk, not the page cache. Before the read the file's
    pages are dropped with posix_fadvise(DONTNEED) (they are clean after the sync, so the kernel can);
    "read_cold" says whether that call was available. Random bytes: a compressing filesystem would
    flatter zeros."""
    path = workdir / "bandwidth.bin"
    block = os.urandom(min(CHUNK, max(nbytes, 1)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start, left = time.perf_counter(), nbytes
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        os.fdatasync(fd)
        write_s = time.perf_counter() - start
        cold = hasattr(os, "posix_fadvise")
        if cold:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    buffer = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        start = time.perf_counter()
        while f.readinto(buffer):
            pass
        read_s = time.perf_counter() - start
    path.unlink()
    return {"bytes": nbytes, "write_bps": nbytes / write_s, "read_bps": nbytes / read_s, "read_cold": cold}


def bench_model(name: str, workdir: Path, only: set | None = None) -> list[dict]:
    sizes = MODELS[name]
    src = workdir / f"gpt2-{sizes['layers']}x{sizes['hidden']}.onnx"
    if not src.exists():
        print(f"exporting {src.name}", flush=True)
        export(src, **sizes)
    cli = [PY, "-m", "onnxgrow"]
    layers, hidden = sizes["layers"], sizes["hidden"]
    ops = {
        "widen x2": ["widen", str(src), "--factor", "2"],
        "deepen x2": ["deepen", str(src), "--layers", str(2 * layers), "--method", "stack"],
        "subclone 1/2": ["subclone", str(src), "--hidden", str(hidden // 2), "--layers", str(layers // 2),
                         "--allow-random-calib", "--samples", "8", "--seq", "32", "--no-report"],
    }
    def wanted(what):
        return only is None or what in only
    ops = {k: v for k, v in ops.items() if wanted(k.split()[0])}
    rows = []
    source_gb, biggest = size_of(src), largest_tensor(src)
    for op, args in ops.items():
        out = workdir / f"{name}-{op.split()[0]}.onnx"
        remove(out)
        seconds, peak = measured(cli + args + ["-o", str(out)] + (["--no-verify"] if op != "subclone 1/2" else []))
        f_seconds, f_peak = floor(out, workdir)
        out_gb = size_of(out)
        disk = disk_bandwidth(workdir, int(out_gb * GB))
        physical = source_gb * GB / disk["read_bps"] + out_gb * GB / disk["write_bps"]
        rows.append({"model": name, "step": op, "seconds": seconds, "peak_gb": peak, "floor_seconds": f_seconds,
                     "floor_peak_gb": f_peak, "ratio": seconds / f_seconds, "input_gb": source_gb,
                     "output_gb": out_gb, "bound_gb": source_gb + out_gb + max(biggest, largest_tensor(out)),
                     "write_mb_s": disk["write_bps"] / 2**20, "read_mb_s": disk["read_bps"] / 2**20,
                     "read_cold": disk["read_cold"], "physical_floor_seconds": physical,
                     "physical_ratio": seconds / physical})
        print(json.dumps(rows[-1]), flush=True)
        if not (name == "big" and op == "widen x2" and wanted("commands")):
            remove(out)
    if name == "big" and wanted("commands"):
        wide = workdir / "big-widen.onnx"
        trained = workdir / "big-trained.onnx"
        weights = workdir / "big-weights.safetensors"
        imported = workdir / "big-imported.onnx"
        if not wide.exists():  # validated below; made here when --ops left the widen row out
            subprocess.run(cli + ["widen", str(src), "--factor", "2", "-o", str(wide), "--no-verify"], check=True)
        text = workdir / "text.txt"
        text.write_text(" ".join(str(i) for i in range(20000)))
        extra = {
            "inspect": cli + ["inspect", str(src)],
            "validate widened vs source": cli + ["validate", str(src), str(wide)],
            "train 2 steps (batch 1 x 32 bytes)": cli + ["train", str(src), "--data", str(text), "--bytes", "--steps", "2",
                                                        "--batch", "1", "--seq", "32", "-o", str(trained), "--force"],
            "export-weights": cli + ["export-weights", str(src), "-o", str(weights), "--force"],
            "import-weights": cli + ["import-weights", str(src), str(weights), "-o", str(imported), "--force"],
        }
        for op, cmd in extra.items():
            seconds, peak = measured(cmd)
            rows.append({"model": name, "step": op, "seconds": seconds, "peak_gb": peak, "input_gb": source_gb})
            print(json.dumps(rows[-1]), flush=True)
        for p in (wide, trained, imported):
            remove(p)
        for p in (weights, workdir / "big-trained.ckpt", workdir / "big-trained.loss.png"):
            p.unlink(missing_ok=True)
    return rows


def huge_model(workdir: Path) -> Path:
    src = workdir / f"gpt2-{HUGE['layers']}x{HUGE['hidden']}.onnx"
    if not src.exists():
        seed = workdir / f"gpt2-{HUGE['exported_layers']}x{HUGE['hidden']}.onnx"
        if not seed.exists():
            print(f"exporting {seed.name}", flush=True)
            export(seed, HUGE["exported_layers"], HUGE["hidden"], HUGE["heads"])
        subprocess.run([PY, "-m", "onnxgrow", "deepen", str(seed), "--layers", str(HUGE["layers"]), "--method",
                        "stack", "--no-verify", "-o", str(src)], check=True)
    return src


def bench_verified(name: str, workdir: Path) -> list[dict]:
    """widen x2 with verification on (block by block, chosen automatically at this size) against the
    same widen without it, and validate alone on the pair: the verification's share of time and memory."""
    if name == "huge":
        src = huge_model(workdir)
    else:
        sizes = MODELS[name]
        src = workdir / f"gpt2-{sizes['layers']}x{sizes['hidden']}.onnx"
        if not src.exists():
            export(src, **sizes)
    out = workdir / f"{name}-widen-verified.onnx"
    cli = [PY, "-m", "onnxgrow"]
    rows = []
    steps = {"widen x2, verified": ["widen", str(src), "--factor", "2", "-o", str(out), "--force"],
             "widen x2, --no-verify": ["widen", str(src), "--factor", "2", "-o", str(out), "--force", "--no-verify"],
             "validate (blockwise) alone": ["validate", str(src), str(out), "--blockwise"]}
    for step, args in steps.items():
        seconds, peak = measured(cli + args)
        rows.append({"model": name, "step": step, "seconds": seconds, "peak_gb": peak, "input_gb": size_of(src),
                     "output_gb": size_of(out)})
        print(json.dumps(rows[-1]), flush=True)
    remove(out)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxgrow-bench"))
    parser.add_argument("--models", default="small,big", help="of small, big, tiny (a smoke run)")
    parser.add_argument("--ops", default=None, help="only these of widen,deepen,subclone,commands (the other commands, big model)")
    parser.add_argument("--verified", action="store_true",
                        help="instead: widen x2 with verification on vs off, and validate alone (models: big, huge)")
    args = parser.parse_args()
    if args.verified:
        args.workdir.mkdir(parents=True, exist_ok=True)
        rows = [r for name in args.models.split(",") for r in bench_verified(name, args.workdir)]
        (args.workdir / "scale-verified.json").write_text(json.dumps(rows, indent=1))
        print("| model | step | wall s | peak RSS GB | input GB | output GB |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['step']} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {r['input_gb']:.2f} | "
                  f"{r['output_gb']:.2f} |")
        return
    only = set(args.ops.split(",")) if args.ops else None
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args.workdir, only)
    (args.workdir / "scale.json").write_text(json.dumps(rows, indent=1))
    print("| model | step | wall s | peak RSS GB | onnx floor s | floor peak GB | time / onnx floor | "
          "disk write / read MB/s | physical floor s | time / physical floor | in + out + largest GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "floor_seconds" in r:
            cold = "" if r["read_cold"] else " (read warm)"
            print(f"| {r['model']} | {r['step']} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {r['floor_seconds']:.1f} | "
                  f"{r['floor_peak_gb']:.2f} | {r['ratio']:.2f} | "
                  f"{r['write_mb_s']:.0f} / {r['read_mb_s']:.0f}{cold} | "
                  f"{r['physical_floor_seconds']:.2f} | {r['physical_ratio']:.2f} | {r['bound_gb']:.2f} |")
        else:
            print(f"| {r['model']} | {r['step']} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | | | | | | | |")


if __name__ == "__main__":
    main()
