"""Op registries: one table per job, keyed by (domain, op_type) and the opset an op's meaning starts at.

Two jobs need a rule per ONNX operator: the dataflow analysis (which Dim each output axis is, see
`onnxgrow.shapeflow`) and the torch bridge (how to run the op, see `onnxgrow.bridge`). Each keeps an
`OpRegistry`, and a rule is a small function registered with a decorator:

    RULES = OpRegistry("dataflow rule")

    @RULES.register("MatMul")
    def matmul(flow, node, ins): ...

    @RULES.register("SkipLayerNormalization", domain="com.microsoft")
    def skip_layer_norm(flow, node, ins): ...

    @RULES.register("Split", since=18)      # the opset where the op's inputs or attributes changed
    def split_18(flow, node, ins): ...

`lookup` picks, among the rules of (domain, op_type), the one with the highest `since` that is not
above the model's opset for that domain. An op with no rule is named with its domain
(`com.microsoft:SkipLayerNormalization`), so a user can tell which ONNX Runtime form they hold.
"""

from __future__ import annotations

from typing import Callable

DEFAULT_DOMAINS = ("", "ai.onnx")
MICROSOFT = "com.microsoft"


def canonical_domain(domain: str | None) -> str:
    """'' and 'ai.onnx' are the same standard domain."""
    return "" if domain in (None, "", "ai.onnx") else domain


def op_label(domain: str | None, op_type: str) -> str:
    """How an op is named to a user: `MatMul`, `com.microsoft:SkipLayerNormalization`."""
    domain = canonical_domain(domain)
    return op_type if domain == "" else f"{domain}:{op_type}"


class OpRegistry:
    """A table of rules for one job, keyed by (domain, op_type, since-version)."""

    def __init__(self, what: str):
        self.what = what  # "dataflow rule", "torch implementation": used in messages
        self._rules: dict[tuple[str, str], list[tuple[int, Callable]]] = {}

    def register(self, *op_types: str, domain: str = "", since: int = 1, **extra):
        """Decorator: register `fn` for each of `op_types` in `domain` from opset `since` on.

        Keyword `extra` values are stored beside the function (for example a bridge op's host
        variant) and returned by `lookup_entry`.
        """
        def add(fn):
            for op_type in op_types:
                key = (canonical_domain(domain), op_type)
                entries = [e for e in self._rules.get(key, []) if e[0] != since]
                entries.append((since, (fn, extra)))
                self._rules[key] = sorted(entries, key=lambda e: e[0])
            return fn
        return add

    def lookup_entry(self, domain: str | None, op_type: str, opset: int | None = None):
        """(fn, extra) for the op at the model's opset of its domain, or None if there is no rule."""
        entries = self._rules.get((canonical_domain(domain), op_type))
        if not entries:
            return None
        if opset is None:  # opset unknown: the newest rule
            return entries[-1][1]
        usable = [entry for since, entry in entries if since <= opset]
        return usable[-1] if usable else None

    def lookup(self, domain: str | None, op_type: str, opset: int | None = None) -> Callable | None:
        entry = self.lookup_entry(domain, op_type, opset)
        return None if entry is None else entry[0]

    def __contains__(self, key: tuple[str, str]) -> bool:
        domain, op_type = key
        return (canonical_domain(domain), op_type) in self._rules

    def known(self) -> list[str]:
        """Every op this registry has a rule for, as labels (for docs and error hints)."""
        return sorted(op_label(d, o) for d, o in self._rules)

    def missing(self, domain: str | None, op_type: str) -> str:
        """The message for an op without a rule: `no dataflow rule for com.microsoft:Foo`."""
        return f"no {self.what} for {op_label(domain, op_type)}"
