"""Identity blocks: new blocks that start out adding nothing to the residual stream.

A new block is a copy of the block before it with its output projections (attention output and FFN
down projection, and their biases) set to zero. In a pre-norm block the stream update is
x + Attn(LN(x)) and x + FFN(LN(x)); with zero output projections both terms vanish, so the model's
function is exactly preserved, while the copied Q/K/V, up and norm weights are real and start
receiving gradient as soon as the output projections move. Post-norm blocks compute LN(x + F(x)),
and LN(x) != x, so they cannot be made an identity this way: they are refused.
"""

from __future__ import annotations

from .base import DepthPass, Requirement

PRE_NORM = Requirement(
    "pre-norm blocks", lambda spec: spec.norm_position == "pre",
    "identity blocks need pre-norm blocks (LN(x + 0) != x in a post-norm model); use --method stack or interleave")


def spread(num_blocks: int, new: int) -> list[int]:
    """Positions (original block indices) after which to insert `new` blocks, evenly spread."""
    return sorted((t * num_blocks) // new + (num_blocks // new) - 1 if new <= num_blocks
                  else t % num_blocks for t in range(new))


def copies_in_place(num_blocks: int, target: int, at: list[int] | None, zero_output: bool) -> dict:
    """Each new block a copy of the block it follows: at `at`, or spread evenly."""
    positions = at if at is not None else spread(num_blocks, target - num_blocks)
    result: dict[int, list[tuple[int, bool]]] = {}
    for p in positions:
        result.setdefault(p, []).append((p, zero_output))
    return result


class Identity(DepthPass):
    name = "identity"
    exact = True
    requires = (PRE_NORM,)

    def plan(self, spec, target: int, at: list[int] | None) -> dict[int, list[tuple[int, bool]]]:
        return copies_in_place(len(spec.blocks), target, at, zero_output=True)
