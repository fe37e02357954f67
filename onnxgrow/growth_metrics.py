"""How much training a grown model saves, measured on loss curves (issue #16's protocol).

A curve is a list of (step, held-out loss), steps increasing. The grown arm is compared with the
*best* scratch arm (several learning rates, or seeds of one): whichever is lowest where it is read.

    H     head start: the steps the best scratch arm needs to reach the grown arm's loss at step 0
    S(N)  saved steps at budget N: N minus the steps the grown arm needs to stay at or below the best
          scratch arm's loss at step N
    R(N)  retention: S(N) / H (1: the whole head start kept; 0: none; below 0: the grown arm is behind)
          saving: N / (N - S(N)), the usual "x times fewer steps"

None means "not measurable in these curves": the scratch arm never reached the grown arm's start, or
the grown arm never got down to scratch's loss at N within its curve (it is worse than scratch there).
PAST marks a budget beyond the end of the scratch curve: not measured, neither good nor bad.
"""

from __future__ import annotations

import math
from typing import Sequence

Curve = Sequence[Sequence[float]]  # [(step, loss), ...]
PAST = "past the run"


def steps_to_reach(curve: Curve, loss: float) -> float | None:
    """The first step from which `curve` stays at or below `loss`, interpolated linearly between
    evaluations; None if its last point is above `loss`. "Stays" rather than "first touches", so that
    one lucky evaluation of a noisy curve does not count as arriving."""
    if curve[-1][1] > loss:
        return None
    k = len(curve) - 1
    while k > 0 and curve[k - 1][1] <= loss:
        k -= 1
    if k == 0:
        return float(curve[0][0])
    (s0, v0), (s1, v1) = curve[k - 1], curve[k]
    return s0 + (v0 - loss) / (v0 - v1) * (s1 - s0)


def loss_at(curve: Curve, step: float) -> float | None:
    """The curve's loss at `step`, interpolated; None past its last evaluation."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    if curve and curve[-1][0] == step:
        return curve[-1][1]
    return None


def head_start(grown: Curve, scratch: Sequence[Curve]) -> float | None:
    """H: the fewest steps any scratch curve needs to reach the grown curve's loss at step 0."""
    reached = [r for r in (steps_to_reach(c, grown[0][1]) for c in scratch) if r is not None]
    return min(reached) if reached else None


def best_scratch_loss(scratch: Sequence[Curve], step: float) -> float | None:
    losses = [v for v in (loss_at(c, step) for c in scratch) if v is not None]
    return min(losses) if losses else None


def saved_steps(grown: Curve, scratch: Sequence[Curve], budget: float) -> float | None:
    """S(N): N minus the steps the grown curve needs to stay at or below the best scratch loss at N.
    Negative when the grown arm gets there after N steps; None when it never does in its curve."""
    target = best_scratch_loss(scratch, budget)
    if target is None:
        return None
    reach = steps_to_reach(grown, target)
    return None if reach is None else budget - reach


def retention(saved: float | None, head: float | None) -> float | None:
    """R(N) = S(N) / H."""
    if saved is None or not head:
        return None
    return saved / head


def saving(budget: float, saved: float | None) -> float | None:
    """N / (N - S(N)); infinite when the grown arm starts at or below scratch's loss at N."""
    if saved is None:
        return None
    return math.inf if saved >= budget else budget / (budget - saved)


def saving_with_source(budget: float, saved: float | None, scratch_step_s: float, grown_step_s: float,
                       source_s: float) -> float | None:
    """The saving in seconds when the source's own training counts against the grown arm."""
    if saved is None:
        return None
    return budget * scratch_step_s / ((budget - saved) * grown_step_s + source_s)


def measure(grown: Curve, scratch: Sequence[Curve], multiples=(1, 2, 4)) -> dict:
    """H, and R and the saving at budgets of H times each of `multiples` (keys "1H", "2H", ...)."""
    head = head_start(grown, scratch)
    out = {"head_start": head, "saved": {}, "retention": {}, "savings": {}}
    end = min(c[-1][0] for c in scratch)
    for k in multiples:
        key = f"{k}H"
        if head and k * head > end:
            out["saved"][key] = out["retention"][key] = out["savings"][key] = PAST
            continue
        s = saved_steps(grown, scratch, k * head) if head else None
        out["saved"][key], out["retention"][key] = s, retention(s, head)
        out["savings"][key] = saving(k * head, s) if head else None
    return out


def median_and_range(values: Sequence[float | None]) -> dict:
    """Median, min and max; a None (not measurable: behind scratch) ranks below every number, and
    PAST (budget not run) is left out."""
    ranked = sorted((v for v in values if v != PAST), key=lambda v: -math.inf if v is None else v)
    if not ranked:
        return {"median": None, "min": None, "max": None, "n": 0}
    mid = len(ranked) // 2
    if len(ranked) % 2:
        median = ranked[mid]
    else:
        a, b = ranked[mid - 1], ranked[mid]
        median = None if a is None or b is None else (a + b) / 2
    return {"median": median, "min": ranked[0], "max": ranked[-1], "n": len(ranked)}
