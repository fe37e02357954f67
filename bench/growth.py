"""Does growth save training compute? Train a small source, grow it with every method, and race each
grown model against a randomly initialised model of the same size.

    python bench/growth.py --setting cpu      # the recorded CPU run (2 vCPU: about an hour)
    python bench/growth.py --setting gpu      # the full-size run, on a machine with CUDA
    python bench/growth.py --setting smoke    # seconds; what the test suite runs

Protocol (issue #16; choices from ../shared/notes/growth-reference.md and growth-recipes.md):
- Corpus: Python source files that ship with Python (the standard library without its tests; the
  gpu setting adds every installed package's .py files), byte-level tokens, file order shuffled
  with a fixed seed. The last 10% is held out (onnxgrow.training's split) and cut in two: the first
  half's windows tune the rates ("tune"), the second half's are what is reported ("report"); a
  window whose bytes occur word for word in the training split is dropped from both.
- Source: a Llama-style decoder (RMSNorm, rotary, SwiGLU, grouped-query attention) with random
  weights, exported by torch.onnx, then trained `source_steps` with `onnxgrow train`'s plain schedule
  (cosine to lr/10: an annealed source). One source per seed.
- Grown arms: the trained source rewritten by onnxgrow (width x2: hypercloning, fpi, pad; depth x2:
  identity, stack, interleave; both: hypercloning x2 then stack x2; subclone to half width and half
  depth). Copying methods get symmetric noise (s = `noise`). Each grown arm is trained once per
  recipe in `recipes` (onnxgrow.recipes; "auto" is what `onnxgrow train` does by default, and its
  arm keeps the plain name; others are named "ARM (recipe NAME)").
- Random arms: the same graph with fresh weights (onnxgrow.subcloning.randomized), one per target shape.
- Every arm trains `steps` at a constant rate after warmup, so that one run gives every budget.
  Seeds: k = 0 .. seeds-1 sets the source's init, the data order, the random arm's init and the noise.
  Rates: every arm (random included) and every recipe tunes its own rate from its grid on seed 0's
  tuning split, per group (target shape), also when a group runs alone; seeds 1.. reuse it.
- Measures (onnxgrow.growth_metrics, on the report split): head start H (steps the random arm needs
  to reach the grown arm's step-0 loss), saved steps S(N), retention R(N) = S(N)/H and saving
  N/(N - S(N)) at N = H, 2H, 4H, per seed, with the median and range; the saving counting the
  source's own training seconds too. The old single-budget ratio (random steps / grown steps to reach
  the random arm's final loss, seed 0) is kept in the first table.

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
from onnxgrow import growth_metrics as gm  # noqa: E402
from onnxgrow.subcloning import randomized, subclone_ir  # noqa: E402


@dataclass
class Setting:
    source: dict             # hidden, heads, kv_heads, layers, ffn of the source decoder
    seq: int
    batch: int
    source_steps: int
    steps: int               # every target arm's run, at a constant rate after warmup (gives N = H, 2H, 4H)
    eval_every: int
    lrs_random: tuple        # grid for the random arms, tuned per group (target shape)
    lrs_grown: tuple         # grid for the grown arms, tuned per group and recipe
    source_lr: float
    noise: float = 0.5       # HyperCloning's symmetric noise: widen's CLI default (issue #16)
    corpus_mb: float = 0     # cap on the corpus size; 0 = everything found
    site_packages: bool = False
    encoder_steps: int = 0   # MiniLM widen x2 vs random, masked LM; 0 = skip
    encoder_batch: int = 8
    encoder_seq: int = 64
    encoder_lrs: tuple = (3e-4, 1e-4)  # random arm, grown arm
    groups: tuple = ("width", "depth", "both", "subclone")
    seeds: int = 3           # source init, data order, random init and noise; rates tuned on seed 0
    recipes: tuple = ("auto", "none")  # train's recipe for the grown arms (onnxgrow.recipes)
    eval_windows: int = 32   # per evaluation split (tuning and report), before dropping duplicates


SETTINGS = {
    "smoke": Setting(source=dict(hidden=64, heads=4, kv_heads=2, layers=2, ffn=96), seq=32, batch=4,
                     source_steps=20, steps=10, eval_every=5, lrs_random=(3e-3,), lrs_grown=(1e-3,),
                     source_lr=3e-3, corpus_mb=0.3, seeds=1, recipes=("auto",), eval_windows=8),
    "cpu": Setting(source=dict(hidden=48, heads=4, kv_heads=2, layers=2, ffn=128), seq=64, batch=16,
                   source_steps=150, steps=400, eval_every=20, lrs_random=(5e-4, 1e-3, 2e-3, 4e-3),
                   lrs_grown=(1e-3, 2e-3, 4e-3), source_lr=4e-3, corpus_mb=8, groups=("width", "subclone")),
    "gpu": Setting(source=dict(hidden=256, heads=8, kv_heads=4, layers=4, ffn=688), seq=256, batch=64,
                   source_steps=10000, steps=3000, eval_every=100, lrs_random=(1e-3, 2e-3, 4e-3),
                   lrs_grown=(3e-4, 1e-3, 2e-3), source_lr=2e-3, site_packages=True, encoder_steps=1000,
                   encoder_batch=32, encoder_seq=128, eval_windows=64),
}

# per seed k: source init, data order, random arms and noise all use k (seed 0 also tunes the rates)
SEEDS = {"source_init": "k", "data_order": "k", "random_arms": "k + 1", "noise": "k", "count": 3}

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
# `--arms first`: only the first arm of each group (the one the issue's acceptance is about)
BUDGETS = (1, 2, 4)  # N = H, 2H, 4H


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


def make_grown(kind: str, opts: dict, source: Path, out: Path, setting: Setting, tokens: np.ndarray,
               seed: int = 0) -> None:
    opts = dict(opts)
    noisy = opts.pop("noisy", False)
    noise = (setting.noise if LEVERS["noise"] is None else LEVERS["noise"]) if noisy else 0.0
    m = modelio.load(source)
    if kind == "widen":
        m = api.widen_ir(m, noise=noise, seed=seed, **opts)
    elif kind == "deepen":
        m = api.deepen_ir(m, **opts)
    elif kind == "both":
        m = api.deepen_ir(api.widen_ir(m, factor=2, method="hypercloning", noise=setting.noise, seed=seed),
                          factor=2, method="stack")
    elif kind == "subclone":
        s = setting.source
        starts = np.random.default_rng(seed).integers(0, int(len(tokens) * 0.9) - setting.seq, 64)
        ids = np.stack([tokens[i:i + setting.seq] for i in starts]).astype(np.int64)
        m = subclone_ir(m, ids, hidden=s["hidden"] // 2, layers=s["layers"] // 2).model
    modelio.save(m, out, force=True)


def make_random(grown: Path, out: Path, seed: int = 1) -> None:
    modelio.save(randomized(modelio.load(grown), seed=seed), out, force=True)


def train_source(model: Path, out: Path, corpus: Path, setting: Setting, seed: int) -> dict:
    """The source: onnxgrow train's plain schedule (warmup, cosine to lr/10: an annealed source)."""
    from rich.console import Console

    from onnxgrow.training import train
    quiet = Console(file=open("/dev/null", "w"))
    s = train(model, corpus, use_bytes=True, steps=setting.source_steps, batch=setting.batch, seq=setting.seq,
              lr=setting.source_lr, output=out, checkpoint_every=0, log_every=setting.eval_every, force=True,
              seed=seed, console=quiet)
    print(f"  source seed {seed}: val {s['val_loss_start']:.3f} -> {s['val_loss_end']:.3f} "
          f"({s['train_seconds']:.0f} s)", flush=True)
    return s


# --- held-out windows: one split to tune on, one to report on -------------------------------------------


def eval_splits(train_tokens: np.ndarray, val_tokens: np.ndarray, window: int, count: int) -> dict:
    """Window starts in the held-out tokens: "tune" from its first half, "report" from its second half
    (disjoint), each dropping windows whose bytes occur word for word in the training split
    (duplicated files or licence headers would otherwise measure memory, not generalisation)."""
    train_bytes = train_tokens.astype(np.uint8).tobytes()
    half = len(val_tokens) // 2
    splits = {}
    for name, lo, hi in (("tune", 0, half), ("report", half, len(val_tokens))):
        starts = np.linspace(lo, hi - window, count).astype(np.int64)
        kept = [int(a) for a in starts if train_bytes.find(val_tokens[a:a + window].astype(np.uint8).tobytes()) < 0]
        splits[name] = np.array(kept, dtype=np.int64)
        splits[f"{name}_dropped"] = len(starts) - len(kept)
    return splits


def race_arm(model: Path, corpus: Path, setting: Setting, lr: float, seed: int, recipe: str = "none",
             label: str = "", lever: bool = False) -> dict:
    """Train `model` `setting.steps` at a constant rate after warmup (onnxgrow's Trainer, driven here so
    that every evaluation scores both held-out splits); the two curves and the run's timing. `lever`:
    apply the `--warmup` lever (grown arms only)."""
    import torch

    from onnxgrow import training
    torch.manual_seed(seed)
    plain_lr_at = training.lr_at
    if lever and LEVERS["warmup"] is not None:
        def lr_at(step, steps, lr, warmup_from=0.0, schedule="constant"):
            assert schedule == "constant", "the benchmark's runs use the constant schedule"
            warmup = warmup_steps(steps)
            return lr * (warmup_from + (1 - warmup_from) * (step + 1) / warmup) if step < warmup else lr
        training.lr_at = lr_at  # the Trainer looks it up at every step
    try:
        return _race(model, corpus, setting, lr, seed, recipe, label)
    finally:
        training.lr_at = plain_lr_at


def _race(model: Path, corpus: Path, setting: Setting, lr: float, seed: int, recipe: str, label: str) -> dict:
    import torch

    from onnxgrow.training import Trainer
    t = Trainer.build(modelio.load(model), corpus, use_bytes=True, steps=setting.steps, batch=setting.batch,
                      seq=setting.seq, lr=lr, device=torch.device("cpu"), seed=seed, recipe=recipe,
                      schedule="constant")
    splits = eval_splits(t.train_tokens, t.val_tokens, t.window, setting.eval_windows)
    curves = {"tune": [], "report": []}

    def evaluate():
        for name in curves:
            t.val_starts = splits[name]
            curves[name].append((t.steps_done, t.evaluate()))

    evaluate()
    while t.steps_done < setting.steps:
        t.step()
        if t.steps_done % setting.eval_every == 0 or t.steps_done == setting.steps:
            evaluate()
    print(f"  {label}: lr {lr:g}, recipe {t.recipe.name}, report {curves['report'][0][1]:.3f} -> "
          f"{curves['report'][-1][1]:.3f} ({t.train_time:.0f} s)", flush=True)
    return {"lr": lr, "recipe": t.recipe.describe(), "seed": seed, "steps": setting.steps,
            "train_seconds": t.train_time, "tune": curves["tune"], "report": curves["report"],
            "windows": {k: (len(v) if not isinstance(v, int) else v) for k, v in splits.items()}}


# --- runs shared between processes ----------------------------------------------------------------------
# `--cache DIR`: two processes (say width with recipe auto, and width with recipe none) share the random
# arm's runs instead of each training it. A run is keyed by what defines it, not by the model's bytes,
# and a process that finds another one training the same run waits for its result.
CACHE: Path | None = None
# `--warmup N` / `--noise S`: recipe levers tried on the grown arms only (the random arm keeps the
# protocol's schedule, and its runs stay shareable through the cache). None: the protocol's own.
LEVERS: dict = {"warmup": None, "noise": None}


def lever_suffix() -> str:
    """How arm names say which levers were set, e.g. " [warmup 0, noise 0.22]"."""
    set_ = [f"{k} {v:g}" for k, v in LEVERS.items() if v is not None]
    return f" [{', '.join(set_)}]" if set_ else ""


def warmup_steps(steps: int) -> int:
    """onnxgrow.training.lr_at's warmup length, or the `--warmup` lever's (0: the full rate at once)."""
    return max(1, min(100, steps // 20)) if LEVERS["warmup"] is None else LEVERS["warmup"]


def cache_key(setting: Setting, *parts) -> str:
    import hashlib
    config = {k: v for k, v in asdict(setting).items() if k not in ("recipes", "lrs_grown", "groups", "seeds")}
    return hashlib.sha1(json.dumps([config, *parts], default=str).encode()).hexdigest()[:16]


def cached_race(setting: Setting, key_parts: tuple, *args, **kwargs) -> dict:
    """race_arm(*args, **kwargs), or the result another process stored under the same key."""
    if CACHE is None:
        return race_arm(*args, **kwargs)
    CACHE.mkdir(parents=True, exist_ok=True)
    key = cache_key(setting, *key_parts)
    done, pending = CACHE / f"{key}.json", CACHE / f"{key}.pending"
    try:
        pending.open("x").close()  # claim it; a claim that exists means someone else is training it
    except FileExistsError:
        while not done.exists():
            time.sleep(5)
    if done.exists():
        print(f"  {kwargs.get('label', '')}: from the cache ({key})", flush=True)
        return json.loads(done.read_text())
    result = race_arm(*args, **kwargs)
    done.write_text(json.dumps(result))
    return result


def tuned(runs: dict[float, dict]) -> float:
    """The rate whose run ends lowest on the tuning split (never on the report split)."""
    return min(runs, key=lambda lr: runs[lr]["tune"][-1][1])


def edge_note(grid: tuple, lr: float) -> str | None:
    if len(grid) > 1 and lr in (min(grid), max(grid)):
        return f"chosen rate {lr:g} is at the edge of the grid {list(grid)}"
    return None


# --- measures -------------------------------------------------------------------------------------------


def per_seed(grown: dict, scratch: dict, source_seconds: float) -> dict:
    """H, R(kH) and the saving at kH (also counting the source's seconds), on the report split."""
    m = gm.measure(grown["report"], [scratch["report"]], BUDGETS)
    scratch_s, grown_s = (r["train_seconds"] / r["steps"] for r in (scratch, grown))
    m["savings_with_source"] = {
        f"{k}H": (gm.saving_with_source(k * m["head_start"], m["saved"][f"{k}H"], scratch_s, grown_s, source_seconds)
                  if m["head_start"] and m["saved"][f"{k}H"] != gm.PAST else m["saved"][f"{k}H"]) for k in BUDGETS}
    return m


def summarise(arm_runs: list[dict], scratch_runs: list[dict], sources: list[dict], grid: tuple) -> dict:
    """One results row: seed 0's figures in the old shape, then per-seed lists and their medians."""
    first, rand = arm_runs[0], scratch_runs[0]
    target = rand["report"][-1][1]
    reach = gm.steps_to_reach(first["report"], target)
    per_step = first["train_seconds"] / first["steps"]
    row = {"loss_at_0": first["report"][0][1], "final_loss": first["report"][-1][1], "random_final": target,
           "steps_to_reach": reach, "seconds_to_reach": None if reach is None else reach * per_step,
           "saving": gm.saving(first["steps"], None if reach is None else first["steps"] - reach),
           "saving_with_source": None, "lr": first["lr"], "recipe": first["recipe"]}
    if reach is not None:
        row["saving_with_source"] = rand["train_seconds"] / (sources[0]["train_seconds"] + reach * per_step)
    seeds = [per_seed(a, r, s["train_seconds"]) for a, r, s in zip(arm_runs, scratch_runs, sources)]
    row["head_start"] = [m["head_start"] for m in seeds]
    for key in ("retention", "savings", "savings_with_source", "saved"):
        row[key] = {f"{k}H": [m[key][f"{k}H"] for m in seeds] for k in BUDGETS}
    row["median"] = {"head_start": gm.median_and_range(row["head_start"]),
                     **{f"{key} {b}": gm.median_and_range(row[key][b])
                        for key in ("retention", "savings") for b in row["retention"]}}
    row["note"] = edge_note(grid, first["lr"])
    return row


# --- the run --------------------------------------------------------------------------------------------


def run(setting_name: str, workdir: Path, groups: list[str], arms: str = "all") -> dict:
    report = {}
    for report in run_groups(setting_name, workdir, groups, arms):
        # after every group, so that a late failure keeps what was measured
        (workdir / "growth.partial.json").write_text(json.dumps(report, indent=1))
    return report


def prepare_sources(setting: Setting, workdir: Path, corpus: Path) -> list[dict]:
    """One trained source per seed (its own init and data order)."""
    sources = []
    for k in range(setting.seeds):
        src0, src = workdir / f"source-init-{k}.onnx", workdir / f"source-{k}.onnx"
        export_decoder(src0, setting.source, setting.seq, seed=k)
        sources.append(dict(train_source(src0, src, corpus, setting, k), path=str(src)))
    return sources


def run_groups(setting_name: str, workdir: Path, groups: list[str], arms: str = "all"):
    """Yields the report so far after each group. Every group tunes its own rates (its target shape)
    on seed 0's tuning split, whether it runs alone or with others."""
    setting = SETTINGS[setting_name]
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.txt"
    corpus_info = write_corpus(corpus, setting)
    tokens = np.frombuffer(corpus.read_bytes(), dtype=np.uint8).astype(np.int64)
    print(f"corpus: {corpus_info['bytes'] / 2**20:.1f} MB of {corpus_info['what']}", flush=True)
    print(f"source {setting.source}: training {setting.source_steps} steps, {setting.seeds} seeds", flush=True)
    sources = prepare_sources(setting, workdir, corpus)
    runs, results = {"source": sources[0]}, {}
    for group in groups:
        if group == "encoder":
            results["encoder"] = run_encoder(setting, workdir, corpus)
        else:
            group_arms = GROUPS[group][:1] if arms == "first" else GROUPS[group]
            race_group(group, group_arms, setting, workdir, corpus, tokens, sources, runs, results)
        yield make_report(setting_name, setting, corpus_info, results, runs, sources)


def race_group(group, arms, setting, workdir, corpus, tokens, sources, runs, results) -> None:
    """Every arm of `group` (and each recipe) against the group's random arm, over the seeds."""
    print(f"group {group}", flush=True)
    made = {}
    for k in range(setting.seeds):
        for i, (name, kind, opts) in enumerate(arms):
            made[i, k] = workdir / f"{group}-{i}-seed{k}.onnx"
            make_grown(kind, opts, Path(sources[k]["path"]), made[i, k], setting, tokens, seed=k)
        made["random", k] = workdir / f"{group}-random-seed{k}.onnx"
        make_random(made[0, k], made["random", k], seed=k + 1)
    # seed 0 tunes: the random arm, then every (arm, recipe)
    trials = {lr: cached_race(setting, (group, "random", 0, lr), made["random", 0], corpus, setting, lr, 0,
                              label=f"{group}/random tune") for lr in setting.lrs_random}
    lr_random = tuned(trials)
    scratch = [trials[lr_random]] + [cached_race(setting, (group, "random", k, lr_random), made["random", k], corpus,
                                                 setting, lr_random, k, label=f"{group}/random seed {k}")
                                     for k in range(1, setting.seeds)]
    tuning = {"random": {lr: r["tune"][-1][1] for lr, r in trials.items()}}
    for k, r in enumerate(scratch):
        runs[f"{group}/random/seed{k}"] = r
    for i, (name, _, _) in enumerate(arms):
        for recipe in setting.recipes:
            key = f"{group}/{name}" + ("" if recipe == "auto" else f" (recipe {recipe})") + lever_suffix()
            gtrials = {lr: race_arm(made[i, 0], corpus, setting, lr, 0, recipe, label=f"{key} tune", lever=True)
                       for lr in setting.lrs_grown}
            lr = tuned(gtrials)
            tuning[key] = {lr_: r["tune"][-1][1] for lr_, r in gtrials.items()}
            arm_runs = [gtrials[lr]] + [race_arm(made[i, k], corpus, setting, lr, k, recipe, label=f"{key} seed {k}",
                                                 lever=True)
                                        for k in range(1, setting.seeds)]
            for k, r in enumerate(arm_runs):
                runs[f"{key}/seed{k}"] = r
            results[key] = summarise(arm_runs, scratch, sources, setting.lrs_grown)
    results[f"{group}/random"] = {"loss_at_0": scratch[0]["report"][0][1], "final_loss": scratch[0]["report"][-1][1],
                                  "lr": lr_random, "note": edge_note(setting.lrs_random, lr_random)}
    runs[f"{group}/tuning"] = tuning


def make_report(setting_name, setting, corpus_info, results, runs, sources) -> dict:
    curves = {k: r["report"] for k, r in runs.items() if isinstance(r, dict) and "report" in r}
    return {"setting": setting_name, "config": asdict(setting), "corpus": corpus_info, "results": results,
            "curves": curves,  # report split, one per arm and seed ("GROUP/ARM/seedK")
            "tuning_curves": {k: r["tune"] for k, r in runs.items() if isinstance(r, dict) and "tune" in r},
            "tuning": {k: v for k, v in runs.items() if k.endswith("/tuning")},
            "windows": next((r["windows"] for r in runs.values() if isinstance(r, dict) and "windows" in r), None),
            "source": {"val_loss_end": sources[0]["val_loss_end"], "train_seconds": sources[0]["train_seconds"],
                       "per_seed": [{"val_loss_end": s["val_loss_end"], "train_seconds": s["train_seconds"]}
                                    for s in sources]},
            "seeds": dict(SEEDS, count=setting.seeds), "machine": machine(), "commit": commit(),
            "date": time.strftime("%Y-%m-%d")}


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
    lines += ["", budget_table(report), "", tuning_table(report)]
    if "encoder" in report["results"]:
        e = report["results"]["encoder"]
        lines += ["", "| encoder (MiniLM, masked LM) | lr | loss at 0 | final loss | random final | steps to reach | saving |",
                  "|---|---|---|---|---|---|---|",
                  f"| hypercloning x2 (768 wide) | {e['lr']:g} | {e['loss_at_0']:.3f} | {e['final_loss']:.3f} | "
                  f"{e['random_final']:.3f} | {fmt(e['steps_to_reach'], '.0f', 'not reached')} | "
                  f"{fmt(e['saving'], '.2f', '< 1')} |"]
    return "\n".join(lines) + "\n"


def spread(m: dict, spec: str) -> str:
    """`median [min, max]`; "behind" for a value that is not measurable (behind scratch)."""
    if not m["n"]:
        return "past the run"
    f = lambda v: "behind" if v is None else ("inf" if v == float("inf") else format(v, spec))  # noqa: E731
    return f"{f(m['median'])} [{f(m['min'])}, {f(m['max'])}]"


def budget_table(report: dict) -> str:
    """H, retention and saving at N = H, 2H, 4H: median [min, max] over the seeds."""
    head = "| arm | seeds | H (steps) | " + " | ".join(f"R({k}H)" for k in BUDGETS) + " | " + \
        " | ".join(f"saving at {k}H" for k in BUDGETS) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(BUDGETS))]
    for key, r in report["results"].items():
        if "median" not in r:
            continue
        med = r["median"]
        cells = [spread(med[f"retention {k}H"], ".2f") for k in BUDGETS] + \
                [spread(med[f"savings {k}H"], ".2f") for k in BUDGETS]
        lines.append(f"| {key} | {med['head_start']['n']} | {spread(med['head_start'], '.0f')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_table(report: dict) -> str:
    """Each arm's rate grid: final loss on the tuning split (seed 0), the chosen rate in bold."""
    lines = ["| arm | final loss on the tuning split, by lr (chosen in bold) |", "|---|---|"]
    for group, arms in report.get("tuning", {}).items():
        for arm, by_lr in arms.items():
            best = min(by_lr, key=by_lr.get)
            cells = ", ".join((f"**{float(lr):g}: {v:.3f}**" if lr == best else f"{float(lr):g}: {v:.3f}")
                              for lr, v in by_lr.items())
            name = f"{group.split('/')[0]}/random" if arm == "random" else arm
            lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Held-out loss (report split) per group: each arm's median over seeds, shaded between min and max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_arm: dict[str, list] = {}
    for key, curve in report["curves"].items():
        by_arm.setdefault(key.rsplit("/seed", 1)[0], []).append(curve)
    groups = sorted({k.split("/")[0] for k in by_arm})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        lo = float("inf")
        for arm, curves in by_arm.items():
            if not arm.startswith(group + "/"):
                continue
            n = min(len(c) for c in curves)
            steps = [c[0] for c in curves[0][:n]]
            values = np.array([[v for _, v in c[:n]] for c in curves])
            median = np.median(values, axis=0)
            line, = ax.plot(steps, median, label=f"{arm.split('/', 1)[1]} ({len(curves)} seeds)",
                            ls="--" if arm.endswith("/random") else "-")
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
            lo = min(lo, float(values.min()))
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss (report split)")
        ax.legend(fontsize=7)
        ax.set_ylim(lo - 0.05, lo + 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths: list[Path]) -> dict:
    """One report from runs of separate groups (same setting and source; later runs win)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0], runs=[{k: r[k] for k in ("commit", "date", "config", "tuning")} for r in reports])
    for key in ("results", "curves", "tuning_curves"):
        merged[key] = {k: v for r in reports for k, v in r.get(key, {}).items()}
    merged["tuning"] = {}  # per group, the arms of every run (two runs of one group keep both arms' grids)
    for r in reports:
        for group, arms in r.get("tuning", {}).items():
            merged["tuning"].setdefault(group, {}).update(arms)
    return merged


def main(argv=None):
    global CACHE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxgrow-growth"))
    parser.add_argument("--groups", default=None, help="comma list of width,depth,both,subclone,encoder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--lrs-random", default=None, help="comma list: the random arms' learning-rate grid")
    parser.add_argument("--lrs-grown", default=None, help="comma list: the grown arms' learning-rate grid")
    parser.add_argument("--arms", choices=("all", "first"), default="all",
                        help="first: only each group's first arm (hypercloning x2, identity x2, ...)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the setting's)")
    parser.add_argument("--steps", type=int, default=None, help="every target arm's steps")
    parser.add_argument("--recipes", default=None, help="comma list of train recipes for the grown arms")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="held-out windows per split (tuning and report), before dropping duplicates")
    parser.add_argument("--cache", type=Path, default=None,
                        help="share the random arms' runs with other processes through this folder")
    parser.add_argument("--warmup", type=int, default=None, help="lever: the grown arms' warmup steps (0: none)")
    parser.add_argument("--noise", type=float, default=None, help="lever: the copying methods' noise scale")
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
    overrides = {"seeds": args.seeds, "steps": args.steps, "eval_every": args.eval_every,
                 "eval_windows": args.eval_windows,
                 "recipes": tuple(args.recipes.split(",")) if args.recipes else None}
    SETTINGS[args.setting] = replace(SETTINGS[args.setting], **{k: v for k, v in overrides.items() if v})
    CACHE = args.cache
    LEVERS.update(warmup=args.warmup, noise=args.noise)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    groups = args.groups.split(",") if args.groups else list(setting.groups) + (["encoder"] if setting.encoder_steps else [])
    unknown = set(groups) - set(GROUPS) - {"encoder"}
    if unknown:
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    report = run(args.setting, args.workdir, groups, args.arms)
    (args.workdir / "growth.json").write_text(json.dumps(report, indent=1))
    (args.workdir / "growth.md").write_text(table(report))
    plot(report, args.workdir / "growth.png")
    print(table(report))
    print(f"wrote {args.workdir / 'growth.json'}, growth.md, growth.png")


if __name__ == "__main__":
    main()
