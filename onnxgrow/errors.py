"""The exceptions the tool raises on purpose, and the exit codes they map to.

Every command catches OnnxgrowError at the top and prints its message as a single line, so a user
never sees a traceback for a problem with their input. The exit code says whose problem it was:

    0  done (and, where checked, outputs preserved)
    1  the rewrite ran and was checked, but the outputs differ beyond tolerance
    2  the input model, a path or an option is unusable
    3  onnxgrow failed: its own output did not check out, or an unexpected exception in its code
       (a bug: the CLI says "internal error" and asks for a report; --verbose shows the traceback)

Inside the library, causes are chained (`raise OnnxgrowError(...) from e`) and logged through module
loggers (`logging.getLogger(__name__)`); only the CLI turns an exception into one line.
"""

from __future__ import annotations

NOT_PRESERVED = 1  # the rewrite ran but the outputs differ beyond tolerance
BAD_INPUT = 2  # the model, a path or an option is unusable
INTERNAL = 3  # onnxgrow's own output or code failed


class OnnxgrowError(Exception):
    def __init__(self, message: str, exit_code: int = BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


class UnsupportedGraph(OnnxgrowError):
    """The graph is valid ONNX but its structure could not be fully classified.

    Like onnxscript's `MatchResult.fail(reason, node)`, a refusal carries the node it stopped at, and
    its message names the node, so the user can find the place in a graph viewer.
    """

    def __init__(self, reason: str, node=None):
        self.reason = reason
        self.node = node
        super().__init__(f"{reason} (at {describe_node(node)})" if node is not None else reason)


class InternalError(OnnxgrowError):
    """onnxgrow's own output failed a check (checker, ONNX Runtime) that a correct rewrite passes."""

    def __init__(self, message: str):
        super().__init__(f"internal error: {message} (a bug in onnxgrow: please report it)", INTERNAL)


class RuntimeRefused(OnnxgrowError):
    """ONNX Runtime could not load or run the model at `path` (which may be the input, or ours)."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


def describe_node(node) -> str:
    """`com.microsoft:Attention node 'Attention_0'`: an op with its domain, and the node's name."""
    from .registry import op_label
    return f"{op_label(getattr(node, 'domain', ''), node.op_type)} node {node.name!r}"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for one-line reports ('' if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
