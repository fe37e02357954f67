"""Interleaving (bert2BERT's depth growth): each block is followed by a copy of itself.

[1, 2, ..., L] becomes [1, 1, 2, 2, ..., L, L]; to a smaller target, copies are spread evenly.
Not function-preserving: the copy runs again on the block's output.
"""

from __future__ import annotations

from passes.identity import spread

EXACT = False


def plan(spec, target: int, at: list[int] | None) -> dict[int, list[tuple[int, bool]]]:
    num = len(spec.blocks)
    positions = at if at is not None else spread(num, target - num)
    result: dict[int, list[tuple[int, bool]]] = {}
    for p in positions:
        result.setdefault(p, []).append((p, False))
    return result
