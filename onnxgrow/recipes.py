"""How to continue training a model that onnxgrow grew or subcloned: the recipe `train` applies.

A grown model's head start erodes under the plain schedule (issue #16; ../shared/notes/growth-recipes.md):
- a matrix whose inputs were copied n times (HyperCloning, FPI, AKI) gets n identical gradient
  columns, and Adam moves each copy by about lr, so the function changes about n times faster than
  in the source. μP's rule says the same: such matrices train at lr / n;
- the source was trained to the end of a decaying schedule (onnxgrow's cosine ends at lr/10); a
  warmup from zero and then the full rate throws that annealing away. The grown model's warmup starts
  at the source's final rate instead.

The recipe is chosen from the model's `onnxgrow.history`, from the entries since its last training:

    widen:hypercloning:hidden=256,...:from=hidden=128,...   copied inputs x2 -> "grown" (lr/2, warm start)
    widen:pad:...                                           no copies       -> "warm"
    deepen:identity:layers=4                                no copies       -> "warm"
    subclone:...                                            not exact       -> "none"
    nothing, or train:... last                              a plain model   -> "none"

A subclone starts well above its source's loss (it is not function-preserving), so there is no
annealed state to keep; on the growth benchmark (docs/BENCHMARKS.md) its warm start kept less of the
head start than the plain schedule, so a subclone gets the plain one.

Names for `--recipe`: auto (from the history), none (the plain schedule), grown, mup, warm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

RECIPES = ("auto", "none", "grown", "mup", "warm")
COPYING_WIDTH_METHODS = {"hypercloning", "fpi", "aki"}  # new units are copies of old ones
SOURCE_FINAL_RATE = 0.1  # onnxgrow's cosine ends at lr/10: where the source's training left off


@dataclass(frozen=True)
class Recipe:
    name: str
    reason: str
    copy_factor: float = 1.0  # matrices (not embedding tables) train at lr / copy_factor
    warmup_from: float = 0.0  # the warmup starts at lr * warmup_from instead of near zero

    def describe(self) -> str:
        if self.name == "none":
            return f"recipe none ({self.reason}): the plain schedule"
        parts = []
        if self.copy_factor != 1:
            parts.append(f"matrices whose inputs were copied at lr/{self.copy_factor:g}")
        if self.warmup_from:
            parts.append(f"warmup from lr*{self.warmup_from:g} (the source's final rate)")
        return f"recipe {self.name} ({self.reason}): " + ", ".join(parts or ["the plain schedule"])


PLAIN = Recipe("none", "asked for")


def since_last_training(entries: list[str]) -> list[str]:
    """The history entries after the model's last `train:` entry (growth it has not trained since)."""
    last = max((i for i, e in enumerate(entries) if e.startswith("train:")), default=-1)
    return entries[last + 1:]


def sizes_of(text: str) -> dict[str, int]:
    """`ffn=688,hidden=256` -> {"ffn": 688, "hidden": 256}."""
    out = {}
    for item in text.split(","):
        role, _, n = item.partition("=")
        if n.isdigit():
            out[role] = int(n)
    return out


def widen_copy_factor(entry: str) -> float | None:
    """How many times a copying widen copied the hidden units (target / source hidden); None when the
    entry does not say what it widened from (histories written before the `from=` field)."""
    fields = entry.split(":")
    if len(fields) < 4 or not fields[3].startswith("from="):
        return None
    new, old = sizes_of(fields[2]), sizes_of(fields[3][len("from="):])
    if not old.get("hidden") or "hidden" not in new:
        return None
    return new["hidden"] / old["hidden"]


def from_history(entries: list[str]) -> Recipe:
    """The recipe for a model with history `entries` (oldest first)."""
    growth = since_last_training(entries)
    if not growth:
        why = "trained since it was grown" if entries else "no growth in its history"
        return Recipe("none", why)
    if growth[-1].startswith("subclone:"):
        return Recipe("none", "subcloned: not function-preserving, and the warm start did not help it")
    factor, steps = 1.0, []
    for entry in growth:
        command, _, rest = entry.partition(":")
        method = rest.partition(":")[0]
        steps.append(f"{command}:{method}" if command in ("widen", "deepen") else command)
        if command == "widen" and method in COPYING_WIDTH_METHODS:
            n = widen_copy_factor(entry)
            if n is None:
                log.warning("history entry %r does not say the source's width: its copy factor is unknown, "
                            "so matrices keep the full rate", entry)
            else:
                factor *= n
    why = "grown by " + " + ".join(steps)
    if factor > 1:
        return Recipe("grown", why, copy_factor=factor, warmup_from=SOURCE_FINAL_RATE)
    return Recipe("warm", why, warmup_from=SOURCE_FINAL_RATE)


def choose(name: str, entries: list[str]) -> Recipe:
    """The recipe `--recipe NAME` asks for, for a model with history `entries`."""
    if name not in RECIPES:
        from .errors import OnnxgrowError
        raise OnnxgrowError(f"unknown recipe {name!r} (use {', '.join(RECIPES)})")
    if name == "none":
        return PLAIN
    auto = from_history(entries)
    if name == "auto":
        return auto
    # a named recipe: its part of what the history says (mup and grown need a copy factor)
    factor = auto.copy_factor
    if name == "warm":
        return Recipe("warm", "asked for", warmup_from=SOURCE_FINAL_RATE)
    if name == "mup":
        return Recipe("mup", f"asked for; copy factor {factor:g} from the history", copy_factor=factor)
    return Recipe("grown", f"asked for; copy factor {factor:g} from the history", copy_factor=factor,
                  warmup_from=SOURCE_FINAL_RATE)


def lr_scales(module, spec, recipe: Recipe) -> dict:
    """{parameter name: lr multiplier} for the parameters the recipe slows down: every matrix but the
    embedding tables (whose rows are looked up, not summed over copied inputs). By name, which stays
    when FSDP swaps the Parameter objects."""
    if recipe.copy_factor == 1:
        return {}
    tables = {v.name for v in (spec.token_embedding, spec.position_embedding, spec.token_type_embedding)
              if v is not None}
    skip = {id(p) for p in (module.parameter(n) for n in tables) if p is not None}
    return {name: 1 / recipe.copy_factor for name, p in module.named_parameters()
            if p.requires_grad and p.dim() >= 2 and id(p) not in skip}
