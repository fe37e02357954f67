"""The one exception type the tool raises on purpose.

Every command catches OnnxgrowError at the top and prints its message as a single line, so a user
never sees a traceback for a problem with their input. The exit code says what kind of problem it was.
"""

BAD_INPUT = 2  # the model, a path or an option is unusable
NOT_PRESERVED = 1  # the rewrite ran but the outputs differ beyond tolerance


class OnnxgrowError(Exception):
    def __init__(self, message: str, exit_code: int = BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


class UnsupportedGraph(OnnxgrowError):
    """The graph is valid ONNX but its structure could not be fully classified."""
