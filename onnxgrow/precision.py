"""Mixed-precision training: which precision a run uses, float32 master weights, loss scaling.

A model whose weights are float16 or bfloat16 cannot be trained by running AdamW on those weights:
its eps (1e-8) rounds to 0 in float16, and an update smaller than half a unit in the last place of a
weight (2^-11 of it in float16, 2^-8 in bfloat16) is lost. So the optimiser keeps a float32 master
copy of every half-precision parameter:

    grad32 = float(grad16) / scale           the graph runs in its own dtype; gradients are unscaled
    master = AdamW(master, grad32)           in float32
    weight16 = round(master)                 what the graph runs with next, and what is written back

float16's range ends at 65504 and its smallest normal number is 6e-5, so small gradients underflow:
the loss is multiplied by `scale` before backward (dynamic loss scaling, as torch.amp.GradScaler
does: halve it and skip the step when a gradient overflows, double it after 2000 clean steps).
bfloat16 has float32's range and needs no scaling.

A float32 model trains in float32 on the CPU. On CUDA it runs under autocast: bfloat16 where the GPU
has native bfloat16 (compute capability 8.0 and up: `torch.cuda.is_bf16_supported()` also says yes on
older GPUs that only emulate it), else float16 with torch's GradScaler.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .errors import NOT_PRESERVED, OnnxgrowError

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # the lowest-precision dtype among the trainable weights
    autocast: torch.dtype | None  # autocast dtype for a float32 model on CUDA, else None

    @property
    def master_weights(self) -> bool:
        return self.weights in HALF

    @property
    def loss_scaling(self) -> bool:
        return self.weights == torch.float16 or self.autocast == torch.float16

    def describe(self) -> str:
        if self.master_weights:
            name = "float16" if self.weights == torch.float16 else "bfloat16"
            return f"{name} weights, float32 master weights" + (", dynamic loss scaling" if self.loss_scaling else "")
        if self.autocast is not None:
            name = "bfloat16" if self.autocast == torch.bfloat16 else "float16"
            return f"float32 weights, {name} autocast" + (", dynamic loss scaling" if self.loss_scaling else "")
        return "float32"


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bfloat16 natively (Ampere, compute capability 8.0, and later)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def choose(params, device: torch.device) -> Precision:
    dtypes = {p.dtype for p in params if p.dtype.is_floating_point}
    weights = torch.float16 if torch.float16 in dtypes else torch.bfloat16 if torch.bfloat16 in dtypes \
        else torch.float32
    autocast = None
    if device.type == "cuda" and weights == torch.float32:
        autocast = torch.bfloat16 if native_bf16(device) else torch.float16
    return Precision(weights, autocast)


class MasterWeights:
    """float32 copies of the half-precision parameters; the optimiser steps these, then the graph's
    weights are set to them, rounded to their own dtype. float32 parameters are stepped as they are
    (no copy: a float32 model costs no extra memory)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True) if p.dtype in HALF else None)
                      for p in params]

    def params(self) -> list[torch.Tensor]:
        """What the optimiser steps: the master copy of a half parameter, else the parameter itself."""
        return [p if m is None else m for p, m in self.pairs]

    def take_grads(self, scale: float) -> None:
        """Move each gradient onto what the optimiser steps, in float32 and divided by the loss scale."""
        for p, m in self.pairs:
            if m is not None:
                m.grad = None if p.grad is None else p.grad.float() / scale
            elif p.grad is not None and scale != 1.0:
                p.grad.div_(scale)

    @torch.no_grad()
    def copy_back(self) -> None:
        for p, m in self.pairs:
            if m is not None:
                p.copy_(m)

    def state(self) -> list[torch.Tensor]:
        return [m.detach() for _, m in self.pairs if m is not None]

    @torch.no_grad()
    def load(self, tensors: list[torch.Tensor]) -> None:
        masters = [m for _, m in self.pairs if m is not None]
        if len(masters) != len(tensors):
            raise OnnxgrowError(f"the checkpoint holds {len(tensors)} master weights, the model {len(masters)}")
        for m, t in zip(masters, tensors):
            m.copy_(t)
        self.copy_back()


class LossScale:
    """Dynamic loss scaling for float16 (GradScaler's rule); a constant 1 when it is off."""

    def __init__(self, enabled: bool, init: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.value, self.interval, self.clean = enabled, init if enabled else 1.0, growth_interval, 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.value, self.clean = max(self.value / 2, 1.0), 0
            log.debug("gradient overflow: loss scale now %g", self.value)
        else:
            self.clean += 1
            if self.clean % self.interval == 0:
                self.value *= 2


def grads_finite(params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def check_finite_loss(loss: float, step: int, lr: float, updated: bool = True) -> None:
    """A non-finite loss after updates is a diverged run (exit 1); before any update, the model as given
    is broken (exit 2: non-finite or huge weights), and no learning rate would help."""
    if math.isfinite(loss):
        return
    if not updated:
        raise OnnxgrowError(f"the model's loss is {loss} before any training step: its weights are broken "
                            "(non-finite or huge values); nothing written")
    raise OnnxgrowError(f"training diverged: the loss is {loss} at step {step + 1} (lr {lr:g}); nothing "
                        "written (try a smaller --lr)", NOT_PRESERVED)


def check_finite_weights(module, when: str, given: bool = False) -> None:
    """Refuse to write a model or checkpoint whose weights are not all finite; `given`: the weights
    are the model's as loaded (then the input is at fault, exit 2)."""
    bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad and given:
        raise OnnxgrowError(f"the model's weights are not finite {when} ({len(bad)}, first: {bad[0]}); "
                            "nothing written")
    if bad:
        raise OnnxgrowError(f"training diverged: {len(bad)} weight(s) are not finite {when} "
                            f"(first: {bad[0]}); nothing written (try a smaller --lr)", NOT_PRESERVED)
