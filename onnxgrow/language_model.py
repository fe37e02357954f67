"""An ONNX transformer seen as a language model: which objective it trains on, ids -> logits, the
batches of each objective and their losses. onnxgrow.training drives these; its docstring gives the rules
(causal vs masked LM, BERT-style masking, the tied head of a headless encoder, distillation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from . import bridge
from .errors import OnnxgrowError
from .tokens import open_tokenizer
from .verify import plan_inputs

log = logging.getLogger(__name__)

MASK_RATE = 0.15


# --- the objective ------------------------------------------------------------------------------------


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


def mask_token(tokenizer, vocab: int) -> int:
    """The id MLM puts in masked positions: the tokenizer's [MASK] or <mask>, else the last id."""
    if tokenizer is not None:
        tok = open_tokenizer(tokenizer)
        for name in ("[MASK]", "<mask>"):
            i = tok.token_to_id(name)
            if i is not None and i < vocab:
                return i
    return vocab - 1


# --- the model as ids -> logits -----------------------------------------------------------------------


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
        log.debug("language model on %s: vocab %d, hidden %d, %s", device, spec.vocab.size, spec.hidden.size,
                  "with an LM head" if spec.lm_head is not None else "no LM head")
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
            x = bridge.from_numpy(template[spec.name])
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
    """(inputs, labels) of a batch of windows: the next token for "clm", masked positions for "mlm"."""
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
