"""The GPU check: everything onnxgrow runs on CUDA, in one command (under 10 minutes on one GPU).

    python bench/gpu_check.py --dry-run      # anywhere: checks that every command and option it calls exists
    python bench/gpu_check.py                # on a CUDA machine: docs/gpu-check.json and docs/gpu-check.md

Steps (each a subprocess with its own time limit; a failed step is recorded and the next one runs):
1. exact rewrites checked by ONNX Runtime's CUDA provider (TF32 off): HyperCloning x2 and identity
   deepen x2 of several zoo forms, each written by `widen/deepen --provider cuda` (its own check) and
   compared again by `validate --provider cuda --json`;
2. float16 and bfloat16 variants (models/variants.py) of GPT-2 and Llama-GQA, the same way;
3. 50 training steps of a widened GPT-2 with `train --device cuda` (bf16 autocast where the GPU has
   native bf16, compute capability >= 8.0);
4. bridge training throughput against the same-size transformers model (bench/bridge_throughput.py,
   GPT-2 12 x 768, bf16 autocast);
5. the output-preservation check of a 124M GPT-2 widened x2 (1.85 GB), on CUDA.

A machine without network needs onnxruntime-gpu and this repository's pure-Python dependencies
carried over: ../shared/GPU.md says how (the wheel goes over in parts with ../shared/tools/ortgpu-prepare;
import torch before onnxruntime so the CUDA libraries are loaded). Then:

    export PYTHONPATH=/tmp/ortgpu/site:$PWD && python3 bench/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ONNXGROW = [PY, "-m", "onnxgrow"]
EXACT_FORMS = ["gpt2-ts17", "gpt2-loud-ts17", "llama-gqa-dynamo18", "neox-ts17", "gpt2-optimum-kv", "bert-ts17"]
HALF_FORMS = ["gpt2-ts17", "llama-gqa-ts17"]
POST_NORM = {"bert-ts17"}  # identity blocks are refused on post-norm models (by design)


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: int = 120
    parse_json: bool = False
    result: dict = field(default_factory=dict)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exact_steps(zoo: dict, work: Path, forms: list[str], variant: str = "") -> list[Step]:
    steps = []
    for name in forms:
        source = zoo[name]
        tag = f"{name}{'.' + variant if variant else ''}"
        wide, deep = work / f"{tag}.widen2x.onnx", work / f"{tag}.deepen2x.onnx"
        steps.append(Step(f"widen x2 {tag}", ONNXGROW + ["widen", str(source), "--factor", "2", "--provider",
                                                          "cuda", "-o", str(wide), "--force"]))
        steps.append(Step(f"validate widen x2 {tag}", ONNXGROW + ["validate", str(source), str(wide), "--provider",
                                                                   "cuda", "--json"], parse_json=True))
        if name not in POST_NORM:
            steps.append(Step(f"deepen x2 {tag}", ONNXGROW + ["deepen", str(source), "--factor", "2", "--provider",
                                                               "cuda", "-o", str(deep), "--force"]))
            steps.append(Step(f"validate deepen x2 {tag}", ONNXGROW + ["validate", str(source), str(deep),
                                                                        "--provider", "cuda", "--json"],
                              parse_json=True))
    return steps


def half_variants(zoo: dict, work: Path) -> dict:
    import onnx
    variants = load_module("variants", ROOT / "models" / "variants.py")
    paths = {}
    for name in HALF_FORMS:
        for kind in ("float16", "bfloat16"):
            path = work / f"{name}.{kind}.onnx"
            onnx.save(variants.variant(onnx.load(str(zoo[name])), kind), str(path))
            paths[f"{name}.{kind}"] = path
    return paths


def training_steps(zoo: dict, work: Path) -> list[Step]:
    corpus = work / "corpus.txt"
    corpus.write_bytes(b"".join(p.read_bytes() for p in sorted((ROOT / "onnxgrow").rglob("*.py"))))
    wide = work / "gpt2-ts17.widen2x.onnx"
    return [Step("train 50 steps, cuda", ONNXGROW + ["train", str(wide), "--data", str(corpus), "--bytes",
                                                     "--steps", "50", "--device", "cuda", "-o",
                                                     str(work / "trained.onnx"), "--force"], timeout=300),
            Step("bridge throughput vs transformers (GPT-2 12x768, bf16)",
                 [PY, str(ROOT / "bench" / "bridge_throughput.py"), "--layers", "12", "--hidden", "768",
                  "--heads", "12", "--device", "cuda", "--bf16"], timeout=300)]


def big_model_steps(work: Path) -> list[Step]:
    source, wide = work / "gpt2-124m.onnx", work / "gpt2-124m.widen2x.onnx"
    return [Step("widen x2 124M GPT-2, checked on CUDA",
                 ONNXGROW + ["widen", str(source), "--factor", "2", "--provider", "cuda", "-o", str(wide), "--force"],
                 timeout=400)]


def run(step: Step) -> None:
    started = time.perf_counter()
    try:
        done = subprocess.run(step.argv, capture_output=True, text=True, timeout=step.timeout, cwd=ROOT)
        step.result = {"exit_code": done.returncode, "tail": (done.stdout + done.stderr)[-600:]}
        if step.parse_json and done.returncode in (0, 1):
            report = json.loads(done.stdout)
            step.result.update(provider=report["provider"], passed=report["passed"],
                               max_abs=max(float(o["max_abs_diff"]) for o in report["outputs"]),
                               max_rel=max(float(o["max_rel_diff"]) for o in report["outputs"]),
                               rule=report["tolerance"])
    except subprocess.TimeoutExpired:
        step.result = {"exit_code": None, "tail": f"timed out after {step.timeout} s"}
    step.result["seconds"] = round(time.perf_counter() - started, 1)


def options_of(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def dry_run(steps: list[Step]) -> list[str]:
    """Every command exists and takes every option it is given (via its --help); returns the problems."""
    problems, helps = [], {}
    for step in steps:
        if step.argv[:3] == ONNXGROW:
            key, command = tuple(step.argv[:4]), step.argv[:4] + ["--help"]
        else:
            script = Path(step.argv[1])
            if not script.is_file():
                problems.append(f"{step.name}: no script {script}")
                continue
            key, command = (str(script),), step.argv[:2] + ["--help"]
        if key not in helps:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                                  env=dict(os.environ, COLUMNS="200"))
            helps[key] = done.stdout + done.stderr if done.returncode == 0 else None
            if helps[key] is None:
                problems.append(f"{step.name}: {' '.join(command)} failed: {done.stderr.strip()[-200:]}")
        if helps[key] is not None:
            problems += [f"{step.name}: {' '.join(step.argv[:4])} has no option {o}"
                         for o in options_of(step.argv) if o not in helps[key]]
    return problems


def markdown(steps: list[Step], machine: str) -> str:
    lines = [f"GPU check on {machine}, {time.strftime('%Y-%m-%d')}", "",
             "| step | exit | provider | max abs | max rel | seconds |", "|---|---|---|---|---|---|"]
    for s in steps:
        r = s.result
        lines.append(f"| {s.name} | {r.get('exit_code')} | {r.get('provider', '')} | "
                     f"{r.get('max_abs', ''):.2e} | {r.get('max_rel', ''):.2e} | {r.get('seconds')} |"
                     if "max_abs" in r else f"| {s.name} | {r.get('exit_code')} | | | | {r.get('seconds')} |")
    return "\n".join(lines) + "\n"


def machine_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})"
    except ImportError:
        pass
    return "no CUDA device"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="check that every command and option exists; run nothing")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="where gpu-check.json and .md go")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="onnxgrow-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    builder = load_module("zoo_build", ROOT / "models" / "build.py")
    zoo_dir = ROOT / "models" / "zoo"
    manifest = zoo_dir / "manifest.json"
    names = set(EXACT_FORMS) | set(HALF_FORMS)
    if args.dry_run and manifest.is_file():
        entries = json.loads(manifest.read_text())
    else:
        entries = builder.build_zoo(zoo_dir)
    zoo = {e["name"]: zoo_dir / e["path"] for e in entries if "error" not in e and e["name"] in names}
    missing = sorted(names - set(zoo))
    steps = exact_steps(zoo, work, [n for n in EXACT_FORMS if n in zoo])
    halves = {f"{n}.{k}": work / f"{n}.{k}.onnx" for n in HALF_FORMS if n in zoo for k in ("float16", "bfloat16")}
    steps += exact_steps(halves, work, list(halves), "")
    steps += training_steps(zoo, work) + big_model_steps(work)
    if args.dry_run:
        problems = dry_run(steps) + [f"zoo model {n} is not built" for n in missing]
        for line in problems:
            print(f"problem: {line}")
        print(f"dry run: {len(steps)} steps, {len(problems)} problem(s); would write {args.out / 'gpu-check.json'}")
        return 1 if problems else 0
    half_variants(zoo, work)
    scale = load_module("scale", ROOT / "bench" / "scale.py")
    scale.export(work / "gpt2-124m.onnx", **scale.MODELS["small"])
    for step in steps:
        print(f"{step.name}: {shlex.join(step.argv)}", file=sys.stderr)
        run(step)
        print(f"  -> {step.result}", file=sys.stderr)
    machine = machine_name()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"),
                                                         "steps": [vars(s) for s in steps]}, indent=2))
    (args.out / "gpu-check.md").write_text(markdown(steps, machine))
    print(markdown(steps, machine))
    return 0 if all(s.result.get("exit_code") == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
