"""Continue training an ONNX transformer (typically a grown one) and write the result back to ONNX.

    summary = train("wide.onnx", "corpus.txt", tokenizer="tokenizer.json", steps=1000)

The model runs through the torch bridge (onnxgrow.bridge); its float weights train in place and are
written back into the same graph at the end, so the output is the input graph with new weights.
train() drives a Trainer, which holds one run's state (module, optimiser, schedule, data, RNG, loss
history) and can be driven by hand; onnxgrow.language_model sees the graph as ids -> logits:

    trainer = Trainer.build(modelio.load("wide.onnx"), "corpus.txt", use_bytes=True, steps=1000,
                            batch=8, seq=128, lr=3e-4, device=torch.device("cpu"))
    loss = trainer.step(); held_out = trainer.evaluate(); trainer.save_checkpoint(Path("run.ckpt"))

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
linear warmup (5% of the steps, at most 100) into a cosine decay to lr/10. Precision
(onnxgrow/precision.py): float32 on the CPU; autocast on CUDA (bfloat16 from compute capability 8.0,
float16 with loss scaling before); float16/bfloat16 models keep float32 master weights. A non-finite
loss or weight stops the run (exit 1) before anything is written.

Files next to the output OUT.onnx: OUT.ckpt (module state, optimiser, step, RNG and loss history;
`resume=True` continues from it) and OUT.loss.png (training and validation loss).

Under torchrun (onnxgrow/distributed.py) `batch` is the global batch: every rank draws it from the same
RNG and trains on its slice, in micro-batches of `micro_batch` windows; gradients are averaged with DDP,
or sharded with FSDP2 (`fsdp=True`, then OUT.ckpt is a sharded checkpoint folder). Only rank 0 prints
and writes; the first line printed names the layout ("ddp, 2 ranks, global batch 8 = 2 x 4").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from . import api, bridge, distributed, metadata, modelio, precision, recipes
from .errors import NOT_PRESERVED, OnnxgrowError
from .language_model import LanguageModel, choose_objective, loss_terms, make_batch, mask_token, windows
from .static_shapes import fit, fit_sequence
from .tokens import load_tokens

# names that lived here before language_model.py and tokens.py: callers may still import them from here
from .language_model import MASK_RATE, compares_positions, from_range, mlm_batch  # noqa: F401, E402
from .tokens import open_tokenizer  # noqa: F401, E402

log = logging.getLogger(__name__)

SCHEDULE = "linear warmup (5% of steps, at most 100) then cosine decay to lr/10"
DEFAULT_BATCH, DEFAULT_SEQ = 8, 128
MAX_VAL_WINDOWS = 64  # validation windows per evaluation: enough for a stable mean, cheap to run


# --- optimiser and schedule ---------------------------------------------------------------------------


SCHEDULES = ("cosine", "constant")


def lr_at(step: int, steps: int, lr: float, warmup_from: float = 0.0, schedule: str = "cosine") -> float:
    """The rate at `step`: a linear warmup from lr * warmup_from (a grown model's recipe starts it at the
    source's final rate), then a cosine decay to lr/10, or `constant` (the growth benchmark's long runs)."""
    warmup = max(1, min(100, steps // 20))
    if step < warmup:
        return lr * (warmup_from + (1 - warmup_from) * (step + 1) / warmup)
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params: list[torch.Tensor], lr: float, scales: list[float] | None = None) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only; `scales` (one per parameter, default 1) multiply each
    parameter's rate (param group key "lr_scale"), for a grown model's recipe."""
    scales = scales or [1.0] * len(params)
    groups = []
    for scale in sorted(set(scales), reverse=True):
        for decay, keep in ((0.1, lambda p: p.dim() >= 2), (0.0, lambda p: p.dim() < 2)):
            members = [p for p, s in zip(params, scales) if s == scale and keep(p)]
            if members or scale == 1.0:  # the plain layout (two groups) whatever the model
                groups.append({"params": members, "weight_decay": decay, "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


# --- the training run ---------------------------------------------------------------------------------


class Trainer:
    """One training run in memory: the student (and a frozen teacher), the train/validation tokens, the
    optimiser and its schedule, the data RNG and the loss history.

    step() trains on one random batch; evaluate() gives the held-out loss; save_checkpoint and
    load_checkpoint carry all of the state, so a resumed run takes the same steps as a straight one.
    `layout` (distributed.Layout) spreads each batch over torchrun's ranks; by default one process.
    """

    def __init__(self, student: LanguageModel, train_tokens: np.ndarray, val_tokens: np.ndarray, *,
                 objective: str, steps: int, batch: int, seq: int, lr: float, mask_id: int,
                 device=torch.device("cpu"), teacher: LanguageModel | None = None, alpha: float = 0.5,
                 seed: int = 0, model_path=None, fixed_batch: bool = False,
                 layout: distributed.Layout | None = None, recipe: recipes.Recipe = recipes.PLAIN,
                 lr_scales: dict | None = None, schedule: str = "cosine"):
        self.student, self.teacher, self.alpha = student, teacher, alpha
        self.objective, self.mask_id, self.device = objective, mask_id, device
        self.steps, self.batch, self.seq, self.lr = steps, batch, seq, lr  # steps: the schedule's length
        self.window = window_length(seq, objective)
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.model_path = model_path  # recorded in checkpoints and named in their errors
        self.fixed_shape = fixed_batch  # a static-shape export: windows fit its batch and sequence
        # validation: fixed windows (spread over the held-out tokens) and fixed MLM masks
        n_windows = min(len(val_tokens) // self.window, MAX_VAL_WINDOWS)
        if fixed_batch and n_windows:  # a static-shape export takes whole batches only
            n_windows = max(batch, n_windows // batch * batch)
        self.val_starts = np.linspace(0, len(val_tokens) - self.window, n_windows).astype(np.int64)
        self.layout = layout or distributed.Layout("single", 1, 0, batch, batch)
        # what the training forward runs: the module, or its DDP wrapper (FSDP shards the module in place)
        self.trainee = dataclasses.replace(student, module=distributed.wrap(student.module, self.layout))
        named = [(n, p) for n, p in student.module.named_parameters() if p.requires_grad]
        trainable = [p for _, p in named]
        self.precision = precision.choose(trainable, device)
        self.master = precision.MasterWeights(trainable)  # float32 copies of half-precision weights
        if self.layout.sharded and self.master.state():
            raise OnnxgrowError("--fsdp trains float32 weights only; this model's are float16/bfloat16 "
                                "(train it without --fsdp)")
        self.loss_scale = precision.LossScale(self.precision.loss_scaling)
        self.recipe, self.schedule = recipe, schedule
        scales = [(lr_scales or {}).get(n, 1.0) for n, _ in named]  # master.params() follow `trainable`
        self.optimizer = make_optimizer(self.master.params(), lr, scales)
        log.debug("precision: %s", self.precision.describe())
        self.rng = np.random.default_rng(seed)  # data order and MLM masks
        self.steps_done = 0
        self.updated = False  # whether any optimiser step has changed the weights (in this process or before)
        self.losses: list[float] = []  # training loss of every step, from the first (resumed runs too)
        self.val_history: list[tuple[int, float]] = []  # (step, validation loss)
        self.train_time, self.tokens_seen = 0.0, 0  # this process's steps only, for tokens/s

    @classmethod
    def build(cls, m: ir.Model, data_path, *, tokenizer=None, use_bytes=False, steps, batch, seq, lr,
              device, objective="auto", val_fraction=0.1, seed=0, distill_from=None, alpha=0.5,
              model_path=None, micro_batch=None, fsdp=False, recipe="auto", schedule="cosine") -> "Trainer":
        """A Trainer for model `m` on the tokens of `data_path` (text or .npy), the last `val_fraction`
        held out; `distill_from` is the path of a teacher model. `batch` is the global batch, run in
        micro-batches of `micro_batch` windows on each of torchrun's ranks (distributed.plan).
        `recipe`: a name in recipes.RECIPES ("auto": chosen from the model's onnxgrow.history)."""
        spec = api.structure(m)
        fixed_batch = spec.static_shape()[0]
        layout = plan_layout(batch, micro_batch, fixed_batch, fsdp)
        batch = layout.batch
        seq = fit_sequence(spec, seq, DEFAULT_SEQ)
        student = LanguageModel.build(m, spec, device)
        if objective == "auto":
            objective = choose_objective(spec, m, student.plan)
            log.debug("objective: %s", objective)
        tokens = load_tokens(data_path, tokenizer, use_bytes, student.vocab)
        train_tokens, val_tokens = split_tokens(tokens, window_length(seq, objective), val_fraction)
        mask_id = mask_token(tokenizer, student.vocab)
        teacher = load_teacher(distill_from, student.vocab, device) if distill_from is not None else None
        chosen = recipes.choose(recipe, metadata.history(m))
        log.info("%s", chosen.describe())
        return cls(student, train_tokens, val_tokens, objective=objective, steps=steps, batch=batch, seq=seq,
                   lr=lr, mask_id=mask_id, device=device, teacher=teacher, alpha=alpha, seed=seed,
                   model_path=model_path, fixed_batch=fixed_batch is not None, layout=layout, recipe=chosen,
                   lr_scales=recipes.lr_scales(student.module, spec, chosen), schedule=schedule)

    def loss(self, ids: torch.Tensor, labels: torch.Tensor, model: LanguageModel | None = None) -> torch.Tensor:
        """Cross-entropy on the labelled positions, mixed with KL to the teacher when there is one.
        `model`: what runs the student (the training wrapper), by default the student itself."""
        autocast = self.precision.autocast
        with torch.autocast(self.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = (model or self.student).logits(ids)
            t_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher.logits(ids)
        ce, kl = loss_terms(logits, labels, t_logits)
        return ce if kl is None else (1 - self.alpha) * ce + self.alpha * kl

    def batch_of(self, tokens: np.ndarray, starts: np.ndarray, rng: np.random.Generator):
        """(inputs, labels) on the device, for the windows of `tokens` at `starts`."""
        ids, labels = make_batch(windows(tokens, self.window, starts), self.objective, rng,
                                 self.student.vocab, self.mask_id)
        # on CUDA an id past the table is an asynchronous device assert that poisons the context
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.student.vocab:
            raise OnnxgrowError(f"token ids reach {int(ids.max())}, outside the model's vocabulary of "
                                f"{self.student.vocab}")
        return ids.to(self.device), labels.to(self.device)

    def step(self) -> float:
        """One optimiser step on a random global batch of training windows; returns its loss.

        Every rank draws the whole global batch (and its MLM masks) from the same RNG, then trains on
        its slice: the batch is the same windows whatever the number of ranks, and the RNGs stay equal."""
        t0 = time.perf_counter()
        starts = self.rng.integers(0, len(self.train_tokens) - self.window + 1, self.batch)
        ids, labels = self.batch_of(self.train_tokens, starts, self.rng)
        lr = lr_at(self.steps_done, self.steps, self.lr, self.recipe.warmup_from, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.student.module.train()
        self.student.module.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.loss_scale.value
        value = self.accumulate(ids, labels, scale)  # syncs, so the timing below is the step's real time
        precision.check_finite_loss(value, self.steps_done, lr, updated=self.updated)
        self.master.take_grads(scale)
        self.apply_gradients(lr)
        self.losses.append(value)
        self.train_time += time.perf_counter() - t0
        self.tokens_seen += ids.numel()  # the global batch's: tokens/s of the whole run
        self.steps_done += 1
        return self.losses[-1]

    def accumulate(self, ids: torch.Tensor, labels: torch.Tensor, scale: float) -> float:
        """Forward and backward this rank's slice of the global batch, micro-batch by micro-batch;
        returns the global batch's loss.

        A micro-batch's mean loss is weighted by its share of the global batch's labelled positions
        (times the ranks, as DDP and FSDP average gradients over them): the gradient is the global
        batch's mean however it is split, also for MLM, whose rows hold different numbers of labels."""
        total = int((labels != -100).sum())
        share = self.layout.share(len(ids))
        ids, labels = ids[share], labels[share]
        micro, world, value = self.layout.micro, self.layout.world, 0.0
        for i in range(0, len(ids), micro):
            x, y = ids[i:i + micro], labels[i:i + micro]
            weight = int((y != -100).sum()) * world / total
            with distributed.no_sync(self.trainee.module, last=i + micro >= len(ids)):
                loss = self.loss(x, y, self.trainee)
                loss = loss * weight if weight != 1.0 else loss
                (loss * scale if scale != 1.0 else loss).backward()
            value += loss.item() / world
        return distributed.sum_over_ranks(value, self.device)

    def apply_gradients(self, lr: float) -> None:
        """Clip and step (in float32 for half-precision weights); a float16 overflow skips the step."""
        params = self.master.params()
        finite = precision.grads_finite(params)
        self.loss_scale.update(overflow=not finite)
        if not finite:
            if self.loss_scale.enabled:
                return  # the scale was too large: it is halved, and this batch skipped
            raise OnnxgrowError(f"training diverged: gradients are not finite at step {self.steps_done + 1} "
                                f"(lr {lr:g}); nothing written (try a smaller --lr)", NOT_PRESERVED)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        self.master.copy_back()
        self.updated = True

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the held-out windows, None without any. The same windows and masks every time."""
        if not len(self.val_starts):
            return None
        rng = np.random.default_rng(1234)  # its own: evaluating leaves the training data order alone
        self.student.module.eval()
        total, count = 0.0, 0
        # every rank runs every window (FSDP gathers weights in each forward: all ranks must take part)
        for i in range(0, len(self.val_starts), self.layout.micro):
            ids, labels = self.batch_of(self.val_tokens, self.val_starts[i:i + self.layout.micro], rng)
            total += float(self.loss(ids, labels)) * len(ids)
            count += len(ids)
        self.student.module.train()
        return total / count

    def validate(self) -> float | None:
        """evaluate(), recorded in val_history at the current step (once: a resumed run has it already)."""
        v = self.evaluate()
        if v is not None and not (self.val_history and self.val_history[-1][0] == self.steps_done):
            self.val_history.append((self.steps_done, v))
        return v

    def save_checkpoint(self, path: Path) -> None:
        """Every rank calls this: a sharded run writes a checkpoint folder together, otherwise rank 0
        writes one file (the ranks hold the same state)."""
        precision.check_finite_weights(self.student.module, f"at step {self.steps_done}")
        run = {"loss_scale": self.loss_scale.value, "step": self.steps_done, "rng": self.rng.bit_generator.state,
               "torch_rng": torch.get_rng_state(), "losses": self.losses,
               "val": [list(v) for v in self.val_history], "objective": self.objective,
               "model_path": str(self.model_path)}
        if self.layout.sharded:
            distributed.save_sharded(path, self.student.module, self.optimizer, self.master.state(), run,
                                     self.layout)
        elif self.layout.main:
            # written by the module-level save_checkpoint, looked up at call time (tests stand in for it)
            save_checkpoint(path, {**run, "master": self.master.state(), "model": self.student.module.state_dict(),
                                   "optimizer": self.optimizer.state_dict()})
        log.debug("checkpoint at step %d: %s", self.steps_done, path)

    def load_checkpoint(self, path: Path) -> None:
        """Continue the run saved at `path`: weights, optimiser moments, step, RNGs and loss history.
        A sharded folder (from a run with --fsdp) loads under any layout, resharded to this one."""
        if path.is_dir():
            state = distributed.load_sharded(path, self.student.module, self.optimizer, self.master.state())
            self.master.copy_back()
        else:
            state = self.load_whole(path)
        if state.get("objective") != self.objective:
            raise OnnxgrowError(f"{path} was trained with objective {state.get('objective')}, not {self.objective}")
        self.loss_scale.value = state.get("loss_scale", self.loss_scale.value)
        self.steps_done, self.losses = state["step"], list(state["losses"])
        self.updated = self.steps_done > 0
        self.val_history = [tuple(v) for v in state["val"]]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if self.steps_done >= self.steps:
            raise OnnxgrowError(f"{path} is at step {self.steps_done} already; "
                                f"ask for more than {self.steps_done} steps")
        log.debug("resumed from %s at step %d", path, self.steps_done)

    def load_whole(self, path: Path) -> dict:
        """Load a one-file checkpoint into the module, optimiser and master weights; returns it."""
        if self.layout.sharded:
            raise OnnxgrowError(f"{path} is a checkpoint of a run without --fsdp: resume it without --fsdp")
        state = load_checkpoint(path)
        if state.get("objective") != self.objective:
            raise OnnxgrowError(f"{path} was trained with objective {state.get('objective')}, not {self.objective}")
        try:
            self.student.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise OnnxgrowError(f"{path} does not fit {self.model_path}: {e}".splitlines()[0]) from e
        self.master.load(state.get("master", []))
        return state


def plan_layout(batch, micro_batch, fixed_batch, fsdp: bool) -> distributed.Layout:
    """The run's layout. A static-shape export fixes the windows of each forward: the micro-batch is
    its batch, and the global batch defaults to one micro-batch per rank."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed.launched() else 1
    if fixed_batch is None:
        return distributed.plan(DEFAULT_BATCH if batch is None else batch, micro_batch, fsdp)
    if world == 1 and micro_batch is None:
        return distributed.plan(fit("--batch", batch, fixed_batch, DEFAULT_BATCH), None, fsdp)
    micro_batch = fit("--micro-batch", micro_batch, fixed_batch, fixed_batch)
    return distributed.plan(micro_batch * world if batch is None else batch, micro_batch, fsdp)


def window_length(seq: int, objective: str) -> int:
    return seq + 1 if objective == "clm" else seq  # a causal window also holds the last label


def split_tokens(tokens: np.ndarray, window: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training tokens, held-out tokens): the last `val_fraction` of the data is held out."""
    n_val = int(len(tokens) * val_fraction)
    train_tokens, val_tokens = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    if len(train_tokens) < window:
        raise OnnxgrowError(f"too little data: {len(train_tokens)} training tokens, a window needs {window}")
    if val_fraction > 0 and len(val_tokens) < window:
        raise OnnxgrowError(f"the validation split holds {len(val_tokens)} tokens, a window needs {window}; "
                            "give more data, a larger val_fraction or a smaller seq")
    return train_tokens, val_tokens


def load_teacher(path, vocab: int, device) -> LanguageModel:
    """The frozen model to distil from; it must share the student's vocabulary."""
    tm = modelio.load(path)
    tspec = api.structure(tm)
    if tspec.vocab.size != vocab:
        raise OnnxgrowError(f"the teacher's vocabulary ({tspec.vocab.size}) differs from the student's ({vocab})")
    teacher = LanguageModel.build(tm, tspec, device)
    teacher.module.eval().requires_grad_(False)
    return teacher


# --- files --------------------------------------------------------------------------------------------


def side_paths(output: Path) -> tuple[Path, Path]:
    base = output.name[:-5] if output.name.endswith(".onnx") else output.name
    return output.with_name(base + ".ckpt"), output.with_name(base + ".loss.png")


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    if path.is_dir():  # a sharded checkpoint (a run with --fsdp) resumed without it
        shutil.rmtree(path)
    os.replace(tmp, path)  # a crash mid-write keeps the previous checkpoint


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise OnnxgrowError(f"no checkpoint to resume from: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OnnxgrowError(f"{path} is not a readable checkpoint ({type(e).__name__})") from e


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
    except RuntimeError as e:
        raise OnnxgrowError(f"unknown device {device!r} (use auto, cpu or cuda)") from e


def check_options(steps, batch, seq, lr, alpha, val_fraction, objective, log_every, checkpoint_every,
                  schedule="cosine"):
    if steps < 1 or (batch is not None and batch < 1) or (seq is not None and seq < 2):
        raise OnnxgrowError("steps and batch must be at least 1, seq at least 2")
    if not lr > 0:
        raise OnnxgrowError(f"lr must be positive, got {lr}")
    if not 0 <= alpha <= 1:
        raise OnnxgrowError(f"alpha must be within [0, 1], got {alpha}")
    if not 0 <= val_fraction < 1:
        raise OnnxgrowError(f"val_fraction must be within [0, 1), got {val_fraction}")
    if objective not in ("auto", "clm", "mlm"):
        raise OnnxgrowError(f"unknown objective {objective!r} (use auto, clm or mlm)")
    if schedule not in SCHEDULES:
        raise OnnxgrowError(f"unknown schedule {schedule!r} (use {', '.join(SCHEDULES)})")
    if log_every < 1 or checkpoint_every < 0:
        raise OnnxgrowError("log_every must be at least 1 and checkpoint_every at least 0")


# --- training -----------------------------------------------------------------------------------------


def train(model_path, data_path, *, tokenizer=None, use_bytes=False, steps, batch=None, seq=None, lr=3e-4,
          device="auto", distill_from=None, alpha=0.5, output=None, resume=False, objective="auto",
          val_fraction=0.1, seed=0, log_every=10, checkpoint_every=100, force=False, console=None,
          micro_batch=None, fsdp=False, recipe="auto", schedule="cosine") -> dict:
    """Train the model at `model_path` on `data_path` and write it back to ONNX; returns a summary.

    batch and seq default to 8 and 128, or to what a static-shape export fixes; seq to no more than a
    learned position table's rows (static_shapes.fit, fit_sequence).
    checkpoint_every=0 checkpoints only at the end. `console` (a rich Console) takes the progress
    display and the log lines; by default they go to stderr. Under torchrun, `batch` is the global
    batch, `micro_batch` the windows of one forward, and `fsdp` shards the run (onnxgrow.distributed);
    only rank 0 prints and writes. `recipe` (onnxgrow.recipes) adapts the rates and warmup to a model
    that was grown or subcloned ("auto": chosen from its history; "none": the plain schedule);
    `schedule`: "cosine" (to lr/10) or "constant" after the warmup.
    """
    from rich.console import Console
    check_options(steps, batch, seq, lr, alpha, val_fraction, objective, log_every, checkpoint_every, schedule)
    main = os.environ.get("RANK", "0") == "0"
    console = (console or Console(stderr=True)) if main else Console(quiet=True)
    model_path = Path(model_path)
    output = Path(output) if output is not None else api.default_output(model_path, "trained")
    inputs = (model_path,) + ((Path(distill_from),) if distill_from is not None else ())
    if main:  # the one writer checks (on several nodes, only its filesystem holds the output)
        modelio.guard_output_path(output, inputs, force)  # refuse now, not after the training
    torch.manual_seed(seed)
    with distributed.session(resolve_device(device)) as dev:
        m = modelio.load(model_path)
        trainer = Trainer.build(m, data_path, tokenizer=tokenizer, use_bytes=use_bytes, steps=steps, batch=batch,
                                seq=seq, lr=lr, device=dev, objective=objective, val_fraction=val_fraction,
                                seed=seed, distill_from=distill_from, alpha=alpha, model_path=model_path,
                                micro_batch=micro_batch, fsdp=fsdp, recipe=recipe, schedule=schedule)
        summary = run_training(trainer, console, resume, log_every, checkpoint_every, output, distill_from)
        history = (f"train:{trainer.objective}:steps={steps}" +
                   (f",distill={alpha:g}" if distill_from is not None else ""))
        write_model(trainer, m, history, output, inputs, force)
    return summary


def run_training(trainer: Trainer, console, resume, log_every, checkpoint_every, output, distill_from) -> dict:
    """Resume if asked, validate, train to the end, validate and checkpoint; the run's summary."""
    ckpt_path, plot_path = side_paths(output)
    precision.check_finite_weights(trainer.student.module, "before training", given=True)
    if resume:
        trainer.load_checkpoint(ckpt_path)
    start = trainer.steps_done
    val_start = trainer.validate()
    if val_start is not None:
        precision.check_finite_loss(val_start, start, trainer.lr, updated=trainer.updated)
    # the log's first line; after the checks above, so that a refusal is the one line printed
    console.print(trainer.layout.describe())
    console.print(trainer.recipe.describe())
    if trainer.fixed_shape:
        console.print(f"windows of {trainer.seq} tokens, {trainer.layout.micro} per forward: the model's static shape")
    if val_start is not None:
        console.print(f"step {start}: validation loss {val_start:.4f} ({trainer.objective}, "
                      f"{len(trainer.train_tokens):,} training tokens, {len(trainer.val_tokens):,} held out, "
                      f"{trainer.device.type}, {trainer.precision.describe()})")
    run_steps(trainer, console, log_every, checkpoint_every, ckpt_path)
    val_end = trainer.validate()
    if val_end is not None:
        console.print(f"step {trainer.steps}: validation loss {val_end:.4f}")
    trainer.save_checkpoint(ckpt_path)
    if trainer.layout.main:
        plot_losses(plot_path, trainer.losses, trainer.val_history)
    return run_summary(trainer, start, val_start, val_end, output, ckpt_path, plot_path, distill_from)


def write_model(trainer: Trainer, m: ir.Model, history: str, output: Path, inputs, force: bool) -> None:
    """Rank 0 writes the trained weights into `m` and saves it (a sharded module is gathered first,
    on every rank); the others wait until it is written."""
    precision.check_finite_weights(trainer.student.module, "at the end")
    weights = distributed.gathered(trainer.student.module, trainer.layout)
    if trainer.layout.main:
        trained = bridge.write_into(weights, m)
        metadata.append_history(trained, history)
        modelio.save(trained, output, input_paths=inputs, force=force)
    distributed.barrier()


def run_steps(trainer: Trainer, console, log_every: int, checkpoint_every: int, ckpt_path: Path) -> None:
    """Step `trainer` to the end of its schedule under a progress bar; every `checkpoint_every` steps
    before the last, validate and checkpoint (train() does both after the last)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                        TimeRemainingColumn(), console=console)
    steps = trainer.steps
    with progress:
        task = progress.add_task("train", total=steps, completed=trainer.steps_done, loss=float("nan"), tps=0.0)
        while trainer.steps_done < steps:
            trainer.step()
            done = trainer.steps_done
            if done % log_every == 0 or done == steps:
                progress.update(task, completed=done, loss=float(np.mean(trainer.losses[-log_every:])),
                                tps=trainer.tokens_seen / trainer.train_time)
            if checkpoint_every and done % checkpoint_every == 0 and done < steps:
                v = trainer.validate()
                if v is not None:
                    progress.console.print(f"step {done}: validation loss {v:.4f}")
                trainer.save_checkpoint(ckpt_path)


def run_summary(trainer: Trainer, start: int, val_start, val_end, output, ckpt_path, plot_path, distill_from) -> dict:
    """What train() returns: its files, settings, losses and speed."""
    t, losses = trainer, trainer.losses
    head = losses[start:start + 10] or losses[:10]
    return {
        "output": str(output), "checkpoint": str(ckpt_path), "plot": str(plot_path),
        "objective": t.objective, "device": str(t.device), "precision": t.precision.describe(),
        "schedule": SCHEDULE if t.schedule == "cosine" else "linear warmup then constant",
        "recipe": t.recipe.name, "recipe_reason": t.recipe.describe(),
        "lr_groups": sorted({g["lr_scale"] for g in t.optimizer.param_groups if g["params"]}), "steps": t.steps,
        "start_step": start, "batch": t.batch, "seq": t.seq, "lr": t.lr,
        "distill_from": str(distill_from) if distill_from is not None else None, "alpha": t.alpha,
        "tokens_train": int(len(t.train_tokens)), "tokens_val": int(len(t.val_tokens)),
        "train_loss_start": float(np.mean(head)), "train_loss_end": float(np.mean(losses[-10:])),
        "val_loss_start": val_start, "val_loss_end": val_end, "val_history": [list(v) for v in t.val_history],
        "tokens_per_s": t.tokens_seen / t.train_time if t.train_time else None, "train_seconds": t.train_time,
        "losses": losses, "layout": t.layout.describe(), "rank": t.layout.rank,
    }
