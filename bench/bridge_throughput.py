"""Training throughput of the torch bridge against the same model as a native `transformers` module.

    python bench/bridge_throughput.py                       # GPT-2 4x256, batch 8, seq 128, CPU or GPU
    python bench/bridge_throughput.py --compile             # also the bridge under torch.compile
    python bench/bridge_throughput.py --layers 12 --hidden 768 --device cuda --bf16

A random-weight GPT2LMHeadModel is exported with the TorchScript exporter (as a user's export would
be), loaded back through onnxgrow.bridge.to_torch, and both train for the same steps on the same
random ids: forward, cross-entropy, backward, AdamW. Tokens/s counts batch * seq per step; every
model warms up, then all are timed in interleaved rounds and each keeps its best round (a shared
machine slows whole stretches of time; interleaving spreads that over every row). The native model
runs with attn_implementation="eager", the attention the export recorded (the like-for-like
baseline), and with its default SDPA attention. Dropout is off in both (the export is an inference graph).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only; nothing is downloaded

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxgrow import bridge  # noqa: E402


def zoo_builder():
    spec = importlib.util.spec_from_file_location("zoo_build", ROOT / "models" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(args, attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=max(args.seq, 128), n_embd=args.hidden,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation=attn)
    return GPT2LMHeadModel(config)


class LogitsOnly(torch.nn.Module):
    """The graph's interface: (input_ids, attention_mask) -> logits, no cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          return_dict=False)[0]


def export(model, path: Path, args) -> None:
    build = zoo_builder()
    ids = torch.randint(0, args.vocab, (2, 16))
    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "logits")}
    with build.traceable_masks(), build.quiet():
        torch.onnx.export(LogitsOnly(model).eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes=axes)


def trainer(step_fn, params, args, device):
    """A function n -> tokens/s of n steps of `step_fn(ids, mask) -> logits` trained with AdamW."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
               for _ in range(4)]
    mask = torch.ones(args.batch, args.seq, dtype=torch.int64, device=device)

    def one(i):
        ids = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = step_fn(ids[:, :-1], mask)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(n):
            one(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.batch * args.seq * n / (time.perf_counter() - t)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best round counts")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA; CPU autocast works but is slow)")
    p.add_argument("--compile", action="store_true", help="also time the bridge under torch.compile")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)

    runs = {}  # label -> trainer; all built first, then timed in interleaved rounds
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2.onnx"
        export(make_model(args, "eager"), path, args)
        module = bridge.to_torch(path).to(device)
        onnx_params = sum(p.numel() for p in module.parameters())
        runs["bridge (eager interpreter)"] = trainer(
            lambda ids, mask: module(input_ids=ids, attention_mask=mask)["logits"], module.parameters(), args, device)
        if args.compile:
            compiled = torch.compile(bridge.to_torch(path).to(device), dynamic=False)
            runs["bridge + torch.compile"] = trainer(
                lambda ids, mask: compiled(input_ids=ids, attention_mask=mask)["logits"],
                compiled.parameters(), args, device)
    natives = {attn: make_model(args, attn).to(device).train() for attn in ("eager", "sdpa")}
    for attn, native in natives.items():
        runs[f"transformers GPT2LMHeadModel ({attn})"] = trainer(
            lambda ids, mask, native=native: native(input_ids=ids, attention_mask=mask, use_cache=False).logits,
            native.parameters(), args, device)
    for label, run in runs.items():
        t = time.perf_counter()
        run(args.warmup)  # compiles, where there is something to compile
        print(f"{label}: warm-up {time.perf_counter() - t:.1f} s", file=sys.stderr)
    # Interleaved rounds, best of each: a shared machine slows whole stretches of time, and the
    # best round is the one least disturbed (the same for every row).
    best = dict.fromkeys(runs, 0.0)
    for _ in range(args.rounds):
        for label, run in runs.items():
            best[label] = max(best[label], run(args.steps))
    rows = list(best.items())

    baseline = best["transformers GPT2LMHeadModel (eager)"]  # the computation the export recorded
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"GPT-2 {args.layers} layers x {args.hidden} hidden, {args.heads} heads, vocab {args.vocab} "
          f"({onnx_params / 1e6:.1f} M parameters); batch {args.batch} x seq {args.seq}; {name}"
          f"{'; bf16 autocast' if args.bf16 else ''}; torch {torch.__version__}")
    print(f"{'model':40s} {'train tokens/s':>15s} {'vs native eager':>16s}")
    for label, tps in rows:
        print(f"{label:40s} {tps:15,.0f} {tps / baseline:15.2f}x")
    print("command: python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:]))


if __name__ == "__main__":
    main()
