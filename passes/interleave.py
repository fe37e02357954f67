"""Interleaving (bert2BERT's depth growth): each block is followed by a copy of itself.

[1, 2, ..., L] becomes [1, 1, 2, 2, ..., L, L]; to a smaller target, copies are spread evenly.
Not function-preserving: the copy runs again on the block's output.
"""

from __future__ import annotations

from .base import DepthPass
from .identity import copies_in_place


class Interleave(DepthPass):
    name = "interleave"
    exact = False

    def plan(self, spec, target: int, at: list[int] | None) -> dict[int, list[tuple[int, bool]]]:
        return copies_in_place(len(spec.blocks), target, at, zero_output=False)
