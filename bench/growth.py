"""Does growth save training compute? Train a small source, grow it with every method, and race each
grown model against a randomly initialised model of the same size.

    python bench/growth.py --setting cpu      # the recorded CPU run (2 vCPU: about an hour)
    python bench/growth.py --setting gpu      # the full-size run, on a machine with CUDA
    python bench/growth.py --setting smoke    # seconds; what the test suite runs

Protocol (choices from ../shared/notes/growth-reference.md, made explicit here):
- Corpus: Python source files that ship with Python (the standard library without its tests; the
  gpu setting adds every installed package's .py files), byte-level tokens, file order shuffled
  with a fixed seed. The last 10% is held out (onnxgrow.training's split).
- Source: a Llama-style decoder (RMSNorm, rotary, SwiGLU, grouped-query attention) with random
  weights, exported by torch.onnx, then trained `source_steps` with onnxgrow.training.
- Grown arms: the trained source rewritten by onnxgrow (width x2: hypercloning, fpi, pad; depth x2:
  identity, stack, interleave; both: hypercloning x2 then stack x2; subclone to half width and half
  depth). Copying methods get symmetric noise (s = `noise`, as a fraction of each weight's std),
  which cancels exactly, so that the copies do not receive identical gradients.
- Random arms: the same graph with fresh weights (onnxgrow.subcloning.randomized: N(0, 0.02)
  matrices, unit norms, zero biases), one per target shape.
- Every arm trains `steps` with onnxgrow.training: same data order (same seed), AdamW, linear warmup then
  cosine decay, validation every `eval_every` steps on the same held-out windows. The learning
  rate of the random and of the grown arm is each chosen from a small grid on the width group and
  then used for every group (a tuned baseline: an untuned one flatters growth).
- Steps to reach: the first step from which a grown arm's validation loss stays at or below the
  random arm's final loss (linear interpolation between evaluations). Saving = random steps /
  grown steps. A second ratio counts the source's own training seconds against the grown arm.

Results go to WORKDIR/growth.json, growth.md (the table) and growth.png (every loss curve).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from corpus import python_sources, write_text  # noqa: E402
from onnxgrow import api, modelio  # noqa: E402
from onnxgrow.subcloning import randomized, subclone_ir  # noqa: E402


@dataclass
class Setting:
    source: dict             # hidden, heads, kv_heads, layers, ffn of the source decoder
    seq: int
    batch: int
    source_steps: int
    steps: int               # every target arm's budget
    eval_every: int
    lrs_random: tuple        # grid for the random arms (chosen on the width group)
    lrs_grown: tuple         # grid for the grown arms (chosen on hypercloning x2)
    source_lr: float
    noise: float = 0.3
    corpus_mb: float = 0     # cap on the corpus size; 0 = everything found
    site_packages: bool = False
    encoder_steps: int = 0   # MiniLM widen x2 vs random, masked LM; 0 = skip
    encoder_batch: int = 8
    encoder_seq: int = 64
    encoder_lrs: tuple = (3e-4, 1e-4)  # random arm, grown arm
    groups: tuple = ("width", "depth", "both", "subclone")


SETTINGS = {
    "smoke": Setting(source=dict(hidden=64, heads=4, kv_heads=2, layers=2, ffn=96), seq=32, batch=4,
                     source_steps=20, steps=10, eval_every=5, lrs_random=(3e-3,), lrs_grown=(1e-3,),
                     source_lr=3e-3, corpus_mb=0.3),
    "cpu": Setting(source=dict(hidden=128, heads=4, kv_heads=2, layers=2, ffn=344), seq=128, batch=16,
                   source_steps=400, steps=400, eval_every=20, lrs_random=(1e-3, 3e-3), lrs_grown=(3e-4, 1e-3),
                   source_lr=3e-3, encoder_steps=100),
    "gpu": Setting(source=dict(hidden=256, heads=8, kv_heads=4, layers=4, ffn=688), seq=256, batch=64,
                   source_steps=10000, steps=3000, eval_every=100, lrs_random=(1e-3, 2e-3, 4e-3),
                   lrs_grown=(3e-4, 1e-3, 2e-3), source_lr=2e-3, site_packages=True, encoder_steps=1000,
                   encoder_batch=32, encoder_seq=128),
}

# source init (torch.manual_seed), data order (onnxgrow.training seed), random arms (randomized), noise
SEEDS = {"source_init": 0, "data_order": 0, "random_arms": 1, "noise": 0}

# group -> (target description, [(arm name, how to make it from the trained source)])
WIDTH = [("hypercloning x2", "widen", dict(factor=2, method="hypercloning", noisy=True)),
         ("fpi x2", "widen", dict(factor=2, method="fpi", noisy=True)),
         ("pad x2", "widen", dict(factor=2, method="pad"))]
DEPTH = [("identity x2", "deepen", dict(factor=2, method="identity")),
         ("stack x2", "deepen", dict(factor=2, method="stack")),
         ("interleave x2", "deepen", dict(factor=2, method="interleave"))]
BOTH = [("hypercloning x2 + stack x2", "both", dict())]
SUBCLONE = [("subclone 1/2 width, 1/2 depth", "subclone", dict())]
GROUPS = {"width": WIDTH, "depth": DEPTH, "both": BOTH, "subclone": SUBCLONE}


# --- data and the source model ------------------------------------------------------------------------


def write_corpus(path: Path, setting: Setting) -> dict:
    files = python_sources(setting.site_packages)
    random.Random(0).shuffle(files)  # held-out split: a mix of modules, not the alphabet's tail
    cap = int(setting.corpus_mb * 2**20) or None
    total = 0
    with open(path, "wb") as f:
        for p in files:
            data = p.read_bytes()
            f.write(data + b"\n")
            total += len(data) + 1
            if cap and total >= cap:
                break
    return {"files": len(files), "bytes": total, "what": "Python sources" +
            (" (stdlib + site-packages)" if setting.site_packages else " (stdlib, no tests)")}


def load_builder():
    spec = importlib.util.spec_from_file_location("zoo_build", ROOT / "models" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def export_decoder(path: Path, sizes: dict, seq: int, seed: int = 0) -> None:
    import torch
    build = load_builder()
    sizes = dict(sizes, vocab=256, max_pos=seq)
    torch.manual_seed(seed)
    model = build.FAMILIES["llama"].make(sizes, "eager").eval()
    build.export(build.Spec("source", "llama", "torchscript", 17, sizes), model, path)


# --- arms -----------------------------------------------------------------------------------------------


def make_grown(kind: str, opts: dict, source: Path, out: Path, setting: Setting, tokens: np.ndarray) -> None:
    opts = dict(opts)
    noise = setting.noise if opts.pop("noisy", False) else 0.0
    m = modelio.load(source)
    if kind == "widen":
        m = api.widen_ir(m, noise=noise, **opts)
    elif kind == "deepen":
        m = api.deepen_ir(m, **opts)
    elif kind == "both":
        m = api.deepen_ir(api.widen_ir(m, factor=2, method="hypercloning", noise=setting.noise),
                          factor=2, method="stack")
    elif kind == "subclone":
        s = setting.source
        starts = np.random.default_rng(0).integers(0, int(len(tokens) * 0.9) - setting.seq, 64)
        ids = np.stack([tokens[i:i + setting.seq] for i in starts]).astype(np.int64)
        m = subclone_ir(m, ids, hidden=s["hidden"] // 2, layers=s["layers"] // 2).model
    modelio.save(m, out, force=True)


def make_random(grown: Path, out: Path) -> None:
    modelio.save(randomized(modelio.load(grown), seed=1), out, force=True)


def train_arm(model: Path, out: Path, corpus: Path, setting: Setting, steps: int, lr: float) -> dict:
    from rich.console import Console

    from onnxgrow.training import train
    quiet = Console(file=open("/dev/null", "w"))
    t = time.time()
    s = train(model, corpus, use_bytes=True, steps=steps, batch=setting.batch, seq=setting.seq, lr=lr,
              output=out, checkpoint_every=setting.eval_every, log_every=setting.eval_every, force=True,
              seed=0, console=quiet)
    s["wall_seconds"] = time.time() - t
    print(f"  {out.stem}: lr {lr:g}, val {s['val_loss_start']:.3f} -> {s['val_loss_end']:.3f} "
          f"({s['train_seconds']:.0f} s)", flush=True)
    return s


# --- measures -------------------------------------------------------------------------------------------


def steps_to_reach(history: list, target: float) -> float | None:
    """First step from which the loss stays <= target, interpolated between evaluations."""
    steps = [s for s, _ in history]
    losses = [v for _, v in history]
    if losses[-1] > target:
        return None
    k = len(losses) - 1
    while k > 0 and losses[k - 1] <= target:
        k -= 1
    if k == 0:
        return float(steps[0])
    (s0, v0), (s1, v1) = history[k - 1], history[k]
    return s0 + (v0 - target) / (v0 - v1) * (s1 - s0)


def summarise(arm: dict, random_arm: dict, source_seconds: float | None) -> dict:
    target = random_arm["val_loss_end"]
    reach = steps_to_reach(arm["val_history"], target)
    per_step = arm["train_seconds"] / arm["steps"]
    row = {"loss_at_0": arm["val_loss_start"], "final_loss": arm["val_loss_end"], "random_final": target,
           "steps_to_reach": reach, "seconds_to_reach": None if reach is None else reach * per_step,
           "saving": None, "saving_with_source": None, "lr": arm["lr"]}
    if reach is not None:
        random_seconds = random_arm["train_seconds"]
        # reached at step 0: the grown model starts below the random arm's final loss; no finite ratio
        row["saving"] = random_arm["steps"] / reach if reach > 0 else float("inf")
        if source_seconds is not None:
            row["saving_with_source"] = random_seconds / (source_seconds + reach * per_step)
    return row


# --- the run --------------------------------------------------------------------------------------------


def run(setting_name: str, workdir: Path, groups: list[str]) -> dict:
    report = {}
    for report in run_groups(setting_name, workdir, groups):
        # after every group, so that a late failure keeps what was measured
        (workdir / "growth.partial.json").write_text(json.dumps(report, indent=1))
    return report


def run_groups(setting_name: str, workdir: Path, groups: list[str]):
    """Yields the report so far after each group."""
    setting = SETTINGS[setting_name]
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.txt"
    corpus_info = write_corpus(corpus, setting)
    tokens = np.frombuffer(corpus.read_bytes(), dtype=np.uint8).astype(np.int64)
    print(f"corpus: {corpus_info['bytes'] / 2**20:.1f} MB of {corpus_info['what']}", flush=True)

    src0, src = workdir / "source-init.onnx", workdir / "source.onnx"
    export_decoder(src0, setting.source, setting.seq)
    print(f"source {setting.source}: training {setting.source_steps} steps", flush=True)
    source_run = train_arm(src0, src, corpus, setting, setting.source_steps, setting.source_lr)

    runs, results = {"source": source_run}, {}
    lr_random, lr_grown = setting.lrs_random[-1], setting.lrs_grown[-1]
    for group in groups:
        if group == "encoder":
            results["encoder"] = run_encoder(setting, workdir, corpus)
            yield make_report(setting_name, setting, corpus_info, results, runs, source_run)
            continue
        arms = GROUPS[group]
        print(f"group {group}", flush=True)
        first = workdir / f"{group}-0.onnx"
        make_grown(arms[0][1], arms[0][2], src, first, setting, tokens)
        rand = workdir / f"{group}-random-init.onnx"
        make_random(first, rand)
        tune = group == "width" and (len(setting.lrs_random) > 1 or len(setting.lrs_grown) > 1)
        if tune:  # pick each arm's learning rate by final loss, on this group only
            trials = {lr: train_arm(rand, workdir / f"tune-random-{lr:g}.onnx", corpus, setting, setting.steps, lr)
                      for lr in setting.lrs_random}
            lr_random = min(trials, key=lambda lr: trials[lr]["val_loss_end"])
            runs[f"{group}/random"] = trials[lr_random]
            gtrials = {lr: train_arm(first, workdir / f"tune-grown-{lr:g}.onnx", corpus, setting, setting.steps, lr)
                       for lr in setting.lrs_grown}
            lr_grown = min(gtrials, key=lambda lr: gtrials[lr]["val_loss_end"])
            runs[f"{group}/{arms[0][0]}"] = gtrials[lr_grown]
            runs[f"{group}/tuning"] = {"random": {lr: r["val_loss_end"] for lr, r in trials.items()},
                                       "grown": {lr: r["val_loss_end"] for lr, r in gtrials.items()}}
        else:
            runs[f"{group}/random"] = train_arm(rand, workdir / f"{group}-random.onnx", corpus, setting,
                                                setting.steps, lr_random)
        for k, (name, kind, opts) in enumerate(arms):
            key = f"{group}/{name}"
            if key not in runs:
                grown = first if k == 0 else workdir / f"{group}-{k}.onnx"
                if k:
                    make_grown(kind, opts, src, grown, setting, tokens)
                runs[key] = train_arm(grown, workdir / f"{group}-{k}-trained.onnx", corpus, setting,
                                      setting.steps, lr_grown)
            results[key] = summarise(runs[key], runs[f"{group}/random"], source_run["train_seconds"])
        results[f"{group}/random"] = {"loss_at_0": runs[f"{group}/random"]["val_loss_start"],
                                      "final_loss": runs[f"{group}/random"]["val_loss_end"],
                                      "lr": runs[f"{group}/random"]["lr"]}
        yield make_report(setting_name, setting, corpus_info, results, runs, source_run)


def make_report(setting_name, setting, corpus_info, results, runs, source_run) -> dict:
    return {"setting": setting_name, "config": asdict(setting), "corpus": corpus_info, "results": results,
            "curves": {k: r["val_history"] for k, r in runs.items() if isinstance(r, dict) and "val_history" in r},
            "tuning": {k: v for k, v in runs.items() if k.endswith("/tuning")},
            "source": {"val_loss_end": source_run["val_loss_end"], "train_seconds": source_run["train_seconds"]},
            "seeds": SEEDS, "machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d")}


def run_encoder(setting: Setting, workdir: Path, corpus: Path) -> dict:
    """bert2BERT's setting, scaled down: the real MiniLM widened x2 against a random 768-wide model
    of the same shape, both continuing masked-LM training on the same text."""
    build = load_builder()
    tokenizer = build.minilm_dir() / "tokenizer.json"
    entry = build.build_zoo(only=["minilm-ts17"])[0]  # built once, then cached in models/zoo
    minilm = build.ZOO_DIR / entry["path"]
    wide, rand = workdir / "minilm-x2.onnx", workdir / "minilm-x2-random-init.onnx"
    modelio.save(api.widen_ir(modelio.load(minilm), factor=2, noise=setting.noise), wide, force=True)
    make_random(wide, rand)
    from rich.console import Console

    from onnxgrow.training import train
    quiet = Console(file=open("/dev/null", "w"))
    text = write_text(workdir / "encoder-corpus.txt")  # English prose, which MiniLM was trained on
    out = {}
    for name, model, lr in (("random", rand, setting.encoder_lrs[0]), ("hypercloning x2", wide, setting.encoder_lrs[1])):
        s = train(model, text, tokenizer=tokenizer, steps=setting.encoder_steps, batch=setting.encoder_batch,
                  seq=setting.encoder_seq, lr=lr, output=workdir / f"minilm-{name.split()[0]}-trained.onnx",
                  checkpoint_every=max(setting.encoder_steps // 10, 1), force=True, console=quiet)
        out[name] = s
        print(f"  encoder {name}: val {s['val_loss_start']:.3f} -> {s['val_loss_end']:.3f}", flush=True)
    row = summarise(out["hypercloning x2"], out["random"], None)
    row["random_loss_at_0"] = out["random"]["val_loss_start"]
    row["curves"] = {k: v["val_history"] for k, v in out.items()}
    return row


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor()}
    import torch
    info["torch"] = torch.__version__
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()}"
    return info


def commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


# --- report ---------------------------------------------------------------------------------------------


def fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def table(report: dict) -> str:
    steps = report["config"]["steps"]
    lines = ["| arm | lr | loss at 0 | final loss | random final | steps to reach | seconds to reach | "
             "saving | saving counting the source |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in report["results"].items():
        if key == "encoder":
            continue
        if key.endswith("/random"):
            lines.append(f"| {key} | {r['lr']:g} | {r['loss_at_0']:.3f} | {r['final_loss']:.3f} | | {steps} | | 1.00 | |")
            continue
        reach = fmt(r["steps_to_reach"], ".0f", f"not in {steps}")
        lines.append(f"| {key} | {r['lr']:g} | {r['loss_at_0']:.3f} | {r['final_loss']:.3f} | {r['random_final']:.3f} | "
                     f"{reach} | {fmt(r['seconds_to_reach'], '.0f')} | {fmt(r['saving'], '.2f', '< 1')} | "
                     f"{fmt(r['saving_with_source'], '.2f', '< 1')} |")
    if "encoder" in report["results"]:
        e = report["results"]["encoder"]
        lines += ["", "| encoder (MiniLM, masked LM) | lr | loss at 0 | final loss | random final | steps to reach | saving |",
                  "|---|---|---|---|---|---|---|",
                  f"| hypercloning x2 (768 wide) | {e['lr']:g} | {e['loss_at_0']:.3f} | {e['final_loss']:.3f} | "
                  f"{e['random_final']:.3f} | {fmt(e['steps_to_reach'], '.0f', 'not reached')} | "
                  f"{fmt(e['saving'], '.2f', '< 1')} |"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = report["curves"]
    groups = sorted({k.split("/")[0] for k in curves if "/" in k})
    extra = ["encoder"] if "encoder" in report["results"] else []
    fig, axes = plt.subplots(1, len(groups) + len(extra), figsize=(4.5 * (len(groups) + len(extra)), 4), squeeze=False)
    for ax, group in zip(axes[0], groups + extra):
        items = (report["results"]["encoder"]["curves"].items() if group == "encoder" else
                 ((k.split("/", 1)[1], v) for k, v in curves.items() if k.startswith(group + "/")))
        for name, hist in items:
            s, v = zip(*hist)
            ax.plot(s, v, label=name, ls="--" if name == "random" else "-")
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=7)
        lo = min(v for _, hist in (report["results"]["encoder"]["curves"].items() if group == "encoder" else
                                   ((k, h) for k, h in curves.items() if k.startswith(group + "/"))) for _, v in hist)
        ax.set_ylim(lo - 0.1, lo + 2.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths: list[Path]) -> dict:
    """One report from runs of separate groups (same setting and source; later runs win)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0], runs=[{k: r[k] for k in ("commit", "date", "config", "tuning")} for r in reports])
    for key in ("results", "curves"):
        merged[key] = {k: v for r in reports for k, v in r[key].items()}
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxgrow-growth"))
    parser.add_argument("--groups", default=None, help="comma list of width,depth,both,subclone,encoder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--lrs-random", default=None, help="comma list: the random arms' learning-rate grid")
    parser.add_argument("--lrs-grown", default=None, help="comma list: the grown arms' learning-rate grid")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="instead of running: merge these growth.json files into WORKDIR")
    args = parser.parse_args(argv)
    if args.merge:
        report = merge(args.merge)
        args.workdir.mkdir(parents=True, exist_ok=True)
        (args.workdir / "growth.json").write_text(json.dumps(report, indent=1))
        (args.workdir / "growth.md").write_text(table(report))
        plot(report, args.workdir / "growth.png")
        print(table(report))
        return
    for arg, key in ((args.lrs_random, "lrs_random"), (args.lrs_grown, "lrs_grown")):
        if arg:
            SETTINGS[args.setting] = replace(SETTINGS[args.setting], **{key: tuple(float(x) for x in arg.split(","))})
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    groups = args.groups.split(",") if args.groups else list(setting.groups) + (["encoder"] if setting.encoder_steps else [])
    unknown = set(groups) - set(GROUPS) - {"encoder"}
    if unknown:
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    report = run(args.setting, args.workdir, groups)
    (args.workdir / "growth.json").write_text(json.dumps(report, indent=1))
    (args.workdir / "growth.md").write_text(table(report))
    plot(report, args.workdir / "growth.png")
    print(table(report))
    print(f"wrote {args.workdir / 'growth.json'}, growth.md, growth.png")


if __name__ == "__main__":
    main()
