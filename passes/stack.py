"""Stacking (StackBERT, Gong et al. 2019; G_stack, arXiv 2405.15319): repeat the block sequence.

[1..L] becomes [1..L, 1..L]; to a target that is not a multiple of L, the top blocks are repeated.
Not function-preserving: every block runs again on its own output.
"""

from __future__ import annotations

from .base import DepthPass


class Stack(DepthPass):
    name = "stack"
    exact = False

    def plan(self, spec, target: int, at: list[int] | None) -> dict[int, list[tuple[int, bool]]]:
        # `at` does not apply: the copies go on top, after the last block
        num = len(spec.blocks)
        extra = target - num
        sources = list(range(num)) * (extra // num) + list(range(num - extra % num, num))
        return {num - 1: [(j, False) for j in sources]}
