"""The pass interface: what a width or depth method gives the engine, written down once.

A width pass says, for every role Dim that changes size, which source index each new index copies
(a `Plan`), and how copied weights are scaled and filled (a `WeightRule`); the shared resize engine
(onnxgrow/resize.py) applies both to every weight, bias, norm and shape constant. A depth pass says
which blocks to copy where; onnxgrow/blocks.py cuts and inserts them. A pass never touches the graph
itself, except through the optional `after` hook of a width pass.

Before a pass runs, each of its `requires` is checked against the model's TransformerSpec, and a
model that does not meet one is refused in one line (exit code 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from onnxgrow.errors import OnnxgrowError


@dataclass(frozen=True)
class Requirement:
    """A named condition on the model, and the one-line refusal when it does not hold."""
    name: str                       # e.g. "pre-norm blocks"
    holds: Callable[..., bool]      # spec -> bool
    refusal: str                    # the message for a model that does not meet it


class Pass:
    name: str = ""
    exact: bool = False  # function-preserving: the CLI refuses to write an output that does not validate
    requires: tuple[Requirement, ...] = ()

    def check(self, spec) -> None:
        """Refuse a model that does not meet one of `requires`."""
        for requirement in self.requires:
            if not requirement.holds(spec):
                raise OnnxgrowError(requirement.refusal)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} exact={self.exact}>"


class WidthPass(Pass):
    """Widen every role Dim (hidden, key/value heads, query group, each FFN) to a target size.

    `plans(spec, sizes, seed)` gets `sizes`, the target size of each role Dim (onnxgrow/sizes.py), and
    returns {Dim: Plan} for the Dims that change: Plan.source[j] is the source index that new index j
    copies, or -1 for a new index with no source (filled as the rule says). `rule(noise, seed)` says
    how the engine builds each weight from its copies: divide what an axis sums over by the number of
    copies (HyperCloning, FPI) or not (padding), and how to fill and perturb new entries. `after(spec,
    resizer)`, if a pass needs it, adjusts the resized weights (AKI borrows from the next layer).
    """

    default_noise = 0.0  # the CLI's `--noise` when not given

    def plans(self, spec, sizes: dict, seed: int = 0) -> dict:
        raise NotImplementedError

    def rule(self, noise: float = 0.0, seed: int = 0):
        raise NotImplementedError

    def after(self, spec, resizer) -> None:
        """Nothing by default: the engine's result is the pass's result."""


class DepthPass(Pass):
    """Add blocks, copies of the model's own blocks.

    `plan(spec, target, at)` gets the target number of blocks and, optionally, the block indices
    after which to insert (one entry per new block; `at` is None for "choose"). It returns
    {block index: [(source block, zero_output), ...]}: after original block `index`, insert copies of
    the listed source blocks in order; zero_output=True sets a copy's output projections (attention
    output, FFN down, and their biases) to zero, so that it starts as an identity on the stream.
    """

    def plan(self, spec, target: int, at: list[int] | None) -> dict[int, list[tuple[int, bool]]]:
        raise NotImplementedError
