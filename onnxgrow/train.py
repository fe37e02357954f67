"""Continue training an ONNX transformer (typically a grown one) and write the result back to ONNX.

    summary = train("wide.onnx", "corpus.txt", tokenizer="tokenizer.json", steps=1000)

The model runs through the torch bridge (onnxgrow.bridge); its float weights train in place and are
written back into the same graph at the end, so the output is the input graph with new weights.

Objective ("auto"): causal LM for decoders, masked LM for encoders. A decoder is a graph with a causal
mask (a Trilu, or a comparison of two position ranges); failing that, one with an LM head and no
token-type input. MLM masks 15% of the positions, BERT style (80% [MASK], 10% a random token, 10%
unchanged), and the loss is on those positions only. The mask token is the tokenizer's [MASK] or
<mask>; with bytes or .npy ids it is the last id of the vocabulary, which byte data never uses.

Logits: the graph's first output, when its last axis is the vocabulary. An encoder exported without
its head (BertModel, MiniLM: last_hidden_state) gets a tied head, logits = hidden @ token_embedding^T;
the embedding is then trained through both uses.

Distillation (`distill_from`, Incr-Pretrain style): the source model runs frozen through the bridge on
the same inputs; loss = (1 - alpha) * CE + alpha * KL(teacher || student) over the same positions.

Optimiser: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), gradient clipping at 1.0, and a
linear warmup (5% of the steps, at most 100) into a cosine decay to lr/10. bf16 autocast on CUDA,
float32 on the CPU.

Files next to the output OUT.onnx: OUT.ckpt (module state, optimiser, step, RNG and loss history;
`resume=True` continues from it) and OUT.loss.png (training and validation loss).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from . import api, bridge, modelio
from .errors import OnnxgrowError
from .tokens import load_tokens, open_tokenizer
from .validate import plan_inputs

SCHEDULE = "linear warmup (5% of steps, at most 100) then cosine decay to lr/10"
MASK_RATE = 0.15
MAX_VAL_WINDOWS = 64  # validation windows per evaluation: enough for a stable mean, cheap to run


# --- data ---------------------------------------------------------------------------------------------


def mask_token(tokenizer, vocab: int) -> int:
    if tokenizer is not None:
        tok = open_tokenizer(tokenizer)
        for name in ("[MASK]", "<mask>"):
            i = tok.token_to_id(name)
            if i is not None and i < vocab:
                return i
    return vocab - 1


# --- the model as a language model --------------------------------------------------------------------


def choose_objective(spec, m: ir.Model, plan) -> str:
    if any(node.op_type == "Trilu" for node in m.graph) or compares_positions(m.graph):
        return "clm"
    if any(s.kind == "token_types" for s in plan.specs):
        return "mlm"
    return "clm" if spec.lm_head is not None else "mlm"


def compares_positions(graph) -> bool:
    """A causal mask compares query positions with key positions: both sides come from a Range."""
    compare = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual"}
    return any(node.op_type in compare and all(from_range(v) for v in node.inputs) for node in graph)


def from_range(value, depth: int = 8) -> bool:
    through = {"Unsqueeze", "Reshape", "Add", "Sub", "Cast", "Expand", "Slice", "Squeeze", "Transpose"}
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return False
    if node.op_type == "Range":
        return True
    return node.op_type in through and from_range(node.inputs[0], depth - 1)


@dataclass
class LanguageModel:
    """A bridge module seen as ids -> logits, whatever its other inputs and outputs are."""

    module: bridge.OnnxModule
    plan: object  # validate.InputPlan
    vocab: int
    hidden: int
    embedding: str  # initializer name of the token embedding (for a tied head)
    has_head: bool
    templates: dict = field(default_factory=dict)  # (batch, seq) -> the plan's inputs for that shape

    @classmethod
    def build(cls, m: ir.Model, spec, device) -> "LanguageModel":
        module = bridge.to_torch(m).to(device)
        plan = plan_inputs(m)
        if not any(s.kind == "tokens" for s in plan.specs):
            raise OnnxgrowError("cannot tell which graph input holds the token ids")
        return cls(module, plan, spec.vocab.size, spec.hidden.size, spec.token_embedding.name, spec.lm_head is not None)

    def feeds(self, ids: torch.Tensor) -> dict:
        """Graph inputs for a batch of ids: full attention mask, token type 0, positions from 0 and an
        empty KV cache, shaped by the input plan."""
        b, s = ids.shape
        if (b, s) not in self.templates:
            self.templates[(b, s)] = self.plan.make(b, s, past_length=0)
        template = self.templates[(b, s)]
        out = {}
        for spec in self.plan.specs:
            x = torch.from_numpy(template[spec.name])
            if spec.kind == "tokens":
                x = ids.to(x.dtype)
            elif spec.kind == "mask":
                x = torch.ones_like(x)
            elif spec.kind == "token_types":
                x = torch.zeros_like(x)
            elif spec.kind == "float":
                x = torch.zeros_like(x)  # a cache of length 0
            out[spec.name] = x.to(ids.device)
        return out

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = next(iter(self.module(**self.feeds(ids)).values()))
        last = out.shape[-1] if out.dim() else None
        if out.dim() < 2 or math.prod(out.shape[:-1]) != ids.numel():  # one row of logits per token
            raise OnnxgrowError(f"the model's first output has shape {list(out.shape)} for {list(ids.shape)} "
                                f"token ids: not one row per token")
        if last == self.vocab and (self.has_head or last != self.hidden):
            return out
        if last == self.hidden:  # an encoder without its head: tie one to the token embedding
            return out @ self.module.initializer(self.embedding).t().to(out.dtype)
        raise OnnxgrowError(f"the model's first output has last axis {last}: neither the vocabulary "
                            f"({self.vocab}) nor the hidden size ({self.hidden})")


# --- batches and losses -------------------------------------------------------------------------------


def windows(tokens: np.ndarray, length: int, starts: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([tokens[i:i + length] for i in starts]))


def mlm_batch(ids: torch.Tensor, rng: np.random.Generator, vocab: int, mask_id: int):
    """(inputs, labels): 15% of positions chosen (at least one per row); labels -100 elsewhere."""
    chosen = rng.random(ids.shape) < MASK_RATE
    chosen[np.arange(ids.shape[0]), rng.integers(0, ids.shape[1], ids.shape[0])] = True
    roll = rng.random(ids.shape)
    inputs = ids.numpy().copy()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = rng.integers(0, vocab, int(swap.sum()))
    labels = np.where(chosen, ids.numpy(), -100)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def make_batch(window: torch.Tensor, objective: str, rng, vocab: int, mask_id: int):
    if objective == "clm":
        return window[:, :-1], window[:, 1:]
    return mlm_batch(window, rng, vocab, mask_id)


def loss_terms(student_logits, labels, teacher_logits=None):
    """(cross-entropy, KL(teacher || student) or None), averaged over the labelled positions."""
    logits = student_logits.float().reshape(-1, student_logits.shape[-1])
    labels = labels.reshape(-1)
    ce = F.cross_entropy(logits, labels, ignore_index=-100)
    if teacher_logits is None:
        return ce, None
    keep = labels != -100
    log_s = F.log_softmax(logits[keep], -1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, teacher_logits.shape[-1])[keep], -1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    return ce, kl


def lr_at(step: int, steps: int, lr: float) -> float:
    warmup = max(1, min(100, steps // 20))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


# --- files --------------------------------------------------------------------------------------------


def side_paths(output: Path) -> tuple[Path, Path]:
    base = output.name[:-5] if output.name.endswith(".onnx") else output.name
    return output.with_name(base + ".ckpt"), output.with_name(base + ".loss.png")


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write keeps the previous checkpoint


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise OnnxgrowError(f"no checkpoint to resume from: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OnnxgrowError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None


def plot_losses(path: Path, train_losses: list[float], val: list[tuple[int, float]]) -> None:
    # Figure + Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = np.arange(1, len(train_losses) + 1)
    ax.plot(steps, train_losses, lw=0.8, alpha=0.4, label="train")
    if len(train_losses) >= 10:
        k = max(2, len(train_losses) // 50)
        smooth = np.convolve(train_losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"train (mean of {k})")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OnnxgrowError(f"device {device!r} asked for, but torch sees no CUDA device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise OnnxgrowError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


def check_options(steps, batch, seq, lr, alpha, val_fraction, objective, log_every, checkpoint_every):
    if steps < 1 or batch < 1 or seq < 2:
        raise OnnxgrowError("steps and batch must be at least 1, seq at least 2")
    if not lr > 0:
        raise OnnxgrowError(f"lr must be positive, got {lr}")
    if not 0 <= alpha <= 1:
        raise OnnxgrowError(f"alpha must be within [0, 1], got {alpha}")
    if not 0 <= val_fraction < 1:
        raise OnnxgrowError(f"val_fraction must be within [0, 1), got {val_fraction}")
    if objective not in ("auto", "clm", "mlm"):
        raise OnnxgrowError(f"unknown objective {objective!r} (use auto, clm or mlm)")
    if log_every < 1 or checkpoint_every < 0:
        raise OnnxgrowError("log_every must be at least 1 and checkpoint_every at least 0")


# --- training -----------------------------------------------------------------------------------------


def train(model_path, data_path, *, tokenizer=None, use_bytes=False, steps, batch=8, seq=128, lr=3e-4,
          device="auto", distill_from=None, alpha=0.5, output=None, resume=False, objective="auto",
          val_fraction=0.1, seed=0, log_every=10, checkpoint_every=100, force=False, console=None) -> dict:
    """Train the model at `model_path` on `data_path` and write it back to ONNX; returns a summary.

    checkpoint_every=0 checkpoints only at the end. `console` (a rich Console) takes the progress
    display and the log lines; by default they go to stderr.
    """
    from rich.console import Console
    console = console or Console(stderr=True)
    check_options(steps, batch, seq, lr, alpha, val_fraction, objective, log_every, checkpoint_every)
    model_path = Path(model_path)
    output = Path(output) if output is not None else api.default_output(model_path, "trained")
    inputs = (model_path,) + ((Path(distill_from),) if distill_from is not None else ())
    modelio.guard_output_path(output, inputs, force)  # refuse now, not after the training
    ckpt_path, plot_path = side_paths(output)
    dev = resolve_device(device)
    torch.manual_seed(seed)

    m = modelio.load(model_path)
    spec = api.structure(m)
    student = LanguageModel.build(m, spec, dev)
    if objective == "auto":
        objective = choose_objective(spec, m, student.plan)
    vocab = student.vocab
    tokens = load_tokens(data_path, tokenizer, use_bytes, vocab)
    max_pos = spec.config()["max_positions"]
    if max_pos is not None and seq > max_pos:
        raise OnnxgrowError(f"seq {seq} is longer than the model's {max_pos} learned positions")
    window = seq + 1 if objective == "clm" else seq
    n_val = int(len(tokens) * val_fraction)
    train_tokens, val_tokens = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    if len(train_tokens) < window:
        raise OnnxgrowError(f"too little data: {len(train_tokens)} training tokens, a window needs {window}")
    if val_fraction > 0 and len(val_tokens) < window:
        raise OnnxgrowError(f"the validation split holds {len(val_tokens)} tokens, a window needs {window}; "
                            "give more data, a larger val_fraction or a smaller seq")
    mask_id = mask_token(tokenizer, vocab)

    teacher = None
    if distill_from is not None:
        tm = modelio.load(distill_from)
        tspec = api.structure(tm)
        if tspec.vocab.size != vocab:
            raise OnnxgrowError(f"the teacher's vocabulary ({tspec.vocab.size}) differs from the student's ({vocab})")
        teacher = LanguageModel.build(tm, tspec, dev)
        teacher.module.eval().requires_grad_(False)

    autocast = dev.type == "cuda" and torch.cuda.is_bf16_supported()

    def forward_loss(ids, labels):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            logits = student.logits(ids)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher.logits(ids)
        ce, kl = loss_terms(logits, labels, t_logits)
        return ce if kl is None else (1 - alpha) * ce + alpha * kl

    # validation: fixed windows (spread over the held-out tokens) and fixed MLM masks
    n_windows = len(val_tokens) // window if val_fraction > 0 else 0
    val_starts = np.linspace(0, len(val_tokens) - window, min(n_windows, MAX_VAL_WINDOWS)).astype(np.int64)

    @torch.no_grad()
    def evaluate():
        if not len(val_starts):
            return None
        rng = np.random.default_rng(1234)
        student.module.eval()
        total, count = 0.0, 0
        for i in range(0, len(val_starts), batch):
            chunk = windows(val_tokens, window, val_starts[i:i + batch])
            ids, labels = make_batch(chunk, objective, rng, vocab, mask_id)
            loss = forward_loss(ids.to(dev), labels.to(dev))
            total += float(loss) * len(ids)
            count += len(ids)
        student.module.train()
        return total / count

    optimizer = make_optimizer(student.module, lr)
    rng = np.random.default_rng(seed)
    start, losses, val_history = 0, [], []
    if resume:
        state = load_checkpoint(ckpt_path)
        if state.get("objective") != objective:
            raise OnnxgrowError(f"{ckpt_path} was trained with objective {state.get('objective')}, not {objective}")
        try:
            student.module.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise OnnxgrowError(f"{ckpt_path} does not fit {model_path}: {e}".splitlines()[0]) from None
        start, losses, val_history = state["step"], list(state["losses"]), [tuple(v) for v in state["val"]]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if start >= steps:
            raise OnnxgrowError(f"{ckpt_path} is at step {start} already; ask for more than {start} steps")

    def checkpoint(step):
        save_checkpoint(ckpt_path, {
            "step": step, "model": student.module.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "losses": losses,
            "val": [list(v) for v in val_history], "objective": objective, "model_path": str(model_path)})

    val_start = evaluate()
    if val_start is not None and not (val_history and val_history[-1][0] == start):
        val_history.append((start, val_start))
    if val_start is not None:
        console.print(f"step {start}: validation loss {val_start:.4f} ({objective}, {len(train_tokens):,} "
                      f"training tokens, {len(val_tokens):,} held out, {dev.type})")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                        TimeRemainingColumn(), console=console)
    student.module.train()
    train_time, train_count = 0.0, 0
    with progress:
        task = progress.add_task("train", total=steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start, steps):
            t0 = time.perf_counter()
            starts = rng.integers(0, len(train_tokens) - window + 1, batch)
            ids, labels = make_batch(windows(train_tokens, window, starts), objective, rng, vocab, mask_id)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            loss = forward_loss(ids.to(dev), labels.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.module.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())  # syncs, so the timing below is the step's real time
            train_time += time.perf_counter() - t0
            train_count += ids.numel()
            done = step + 1
            if done % log_every == 0 or done == steps:
                progress.update(task, completed=done, loss=float(np.mean(losses[-log_every:])),
                                tps=train_count / train_time)
            if checkpoint_every and done % checkpoint_every == 0 and done < steps:
                v = evaluate()
                if v is not None:
                    val_history.append((done, v))
                    progress.console.print(f"step {done}: validation loss {v:.4f}")
                checkpoint(done)

    val_end = evaluate()
    if val_end is not None:
        val_history.append((steps, val_end))
        console.print(f"step {steps}: validation loss {val_end:.4f}")
    checkpoint(steps)
    plot_losses(plot_path, losses, val_history)

    trained = bridge.write_into(student.module, m)
    trained.metadata_props["onnxgrow.history"] = (
        trained.metadata_props.get("onnxgrow.history", "") + f"train:{objective}:steps={steps}" +
        (f",distill={alpha:g}" if teacher is not None else "") + ";")
    modelio.save(trained, output, input_paths=inputs, force=force)
    head = losses[start:start + 10] or losses[:10]
    return {
        "output": str(output), "checkpoint": str(ckpt_path), "plot": str(plot_path),
        "objective": objective, "device": str(dev), "schedule": SCHEDULE, "steps": steps,
        "start_step": start, "batch": batch, "seq": seq, "lr": lr,
        "distill_from": str(distill_from) if distill_from is not None else None, "alpha": alpha,
        "tokens_train": int(len(train_tokens)), "tokens_val": int(len(val_tokens)),
        "train_loss_start": float(np.mean(head)), "train_loss_end": float(np.mean(losses[-10:])),
        "val_loss_start": val_start, "val_loss_end": val_end, "val_history": [list(v) for v in val_history],
        "tokens_per_s": train_count / train_time if train_time else None, "train_seconds": train_time,
        "losses": losses,
    }
