"""ONNX Runtime sessions, in one place: which provider, how a session is opened, how a model is run.

Providers: `auto` (CUDA when this onnxruntime has it, else the CPU), `cpu`, `cuda` or `cuda:N` (the
N-th GPU). Every session is opened here, so three rules hold everywhere:

- CUDA sessions run with TF32 off: TF32 matmuls round to 10 mantissa bits, and source and target would
  differ by ~1e-3 for reasons that have nothing to do with a rewrite.
- ONNX Runtime's own fallback is off. On a CUDA failure it would print a banner on stdout (breaking
  `--json`) and retry on the CPU silently. Here `auto` falls back itself, with one line on stderr, and
  `cuda` fails with a one-line error. The provider actually used is on the session
  (`session.onnxgrow_provider`) and goes into every report.
- The CUDA libraries are preloaded (`onnxruntime.preload_dlls()`, ORT >= 1.21) before the first CUDA
  session, for installs that take CUDA and cuDNN from pip's nvidia-* wheels.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

try:
    import onnxruntime as ort
except ImportError:  # neither onnxruntime nor onnxruntime-gpu: said when a session is first needed
    ort = None

from .errors import OnnxgrowError, RuntimeRefused

log = logging.getLogger(__name__)

PROVIDER_HELP = "auto | cpu | cuda | cuda:N"
NO_KERNEL = "Could not find an implementation for"  # ORT has no kernel for an op in this dtype
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


# --- which provider -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderChoice:
    kind: str  # "auto" | "cpu" | "cuda"
    device: int = 0


def parse_provider(text: str) -> ProviderChoice:
    """`auto`, `cpu`, `cuda` or `cuda:N`; anything else is a one-line error."""
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", str(text).strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise OnnxgrowError(f"unknown provider {text!r} (use {PROVIDER_HELP})")
    return ProviderChoice(match.group(1), int(match.group(2) or 0))


def require_runtime():
    if ort is None:
        raise OnnxgrowError("ONNX Runtime is not installed: pip install 'onnxgrow[cpu]' "
                            "(or 'onnxgrow[gpu]' for CUDA)")
    return ort


def cuda_available() -> bool:
    return CUDA in require_runtime().get_available_providers()


def cuda_entry(device: int = 0) -> tuple[str, dict]:
    return (CUDA, {"use_tf32": "0", "device_id": str(device)})


def resolve_providers(provider: str = "auto") -> list:
    """The provider list a session is opened with first (`auto` may still fall back to the CPU)."""
    choice = parse_provider(provider)
    if choice.kind == "cpu":
        return [CPU]
    if choice.kind == "cuda" and not cuda_available():
        raise OnnxgrowError(f"provider {provider!r} asked for, but this onnxruntime has no "
                            f"{CUDA} (install onnxgrow[gpu], which brings onnxruntime-gpu)")
    if cuda_available():
        return [cuda_entry(choice.device), CPU]
    return [CPU]


_cuda_preloaded = False


def preload_cuda() -> None:
    """Load the CUDA/cuDNN libraries from pip's nvidia-* wheels before the first CUDA session."""
    global _cuda_preloaded
    if _cuda_preloaded:
        return
    _cuda_preloaded = True
    if "torch" in sys.modules:  # torch loaded them already (and a second copy could clash)
        return
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # a system CUDA install may still work: let session creation decide
            log.debug("onnxruntime.preload_dlls() failed: %s", e)


_runtime_checked = False


def check_single_runtime() -> None:
    """Warn once if both onnxruntime and onnxruntime-gpu are installed: they share one module, and
    whichever was installed last wins (a CPU build then silently runs `auto` on the CPU)."""
    global _runtime_checked
    if _runtime_checked:
        return
    _runtime_checked = True
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.distribution(dist)
            installed.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) > 1:
        log.warning("both onnxruntime and onnxruntime-gpu are installed and share the `onnxruntime` module; "
                    "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxgrow[gpu]' "
                    "(or '[cpu]')")


# --- opening a session ----------------------------------------------------------------------------


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Basic optimisations only: the extended fusions (attention, gelu, layernorm) match patterns that a
    # rewrite may break in one model and not the other, which would show up as numeric noise here.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = min(4, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: ORT would print warnings itself; we report in one line
    return options


def open_session(path: str | os.PathLike, provider: str = "auto", *, bridge_fallback: bool = False):
    """A session for the model at `path` on `provider`; `session.onnxgrow_provider` says which ran.

    With `bridge_fallback`, a model that ONNX Runtime has no kernels for in its dtype on this provider
    (bfloat16 on the CPU, and a few ops on CUDA) runs in the torch bridge instead, on the same device.
    """
    try:
        return _open_session(path, provider)
    except RuntimeRefused as e:
        if not (bridge_fallback and NO_KERNEL in str(e)):
            raise
        bridge = BridgeSession.open(path, provider)
        if bridge is None:
            raise
        log.info("%s runs in the torch bridge: %s", path, e)
        return bridge


def _open_session(path, provider: str):
    check_single_runtime()
    choice = parse_provider(provider)
    providers = resolve_providers(provider)
    if providers[0] != CPU:
        preload_cuda()
        try:
            return _create(path, providers)
        except OnnxgrowError as e:
            if choice.kind == "cuda":
                raise OnnxgrowError(f"onnxruntime could not start CUDA for {path}: {e}") from e
            print(f"warning: ONNX Runtime's CUDA provider failed for {path} ({e}); running on the CPU",
                  file=sys.stderr)
    return _create(path, [CPU])


def _create(path, providers: list) -> ort.InferenceSession:
    options = session_options()
    try:
        try:
            # from the path, not from bytes, so external data is found next to the model
            session = ort.InferenceSession(str(path), options, providers=providers, enable_fallback=0)
        except Exception as e:
            if "Cannot parse data from external tensors" not in str(e):
                raise
            session = _session_with_small_tensors_inline(Path(path), options, providers)
    except Exception as e:
        message = one_line(e)
        if NO_KERNEL in message and providers == [CPU]:
            # ORT's CPU provider has no kernel for some op/type pairs, most bfloat16 arithmetic among them
            message += (" (ONNX Runtime's CPU provider has no kernel for this op in this model's dtype; "
                        "bfloat16 models need --provider cuda with onnxruntime-gpu)")
        raise RuntimeRefused(f"onnxruntime could not load {path}: {message}", path) from e
    session.onnxgrow_path = str(path)  # for error messages; a session opened from bytes has no path
    session.onnxgrow_provider = session.get_providers()[0]
    return session


def open_from_bytes(model: bytes, data_folder: Path | None, provider: str, label: str):
    """A session for a model held in memory (a cut of a bigger one) whose weights stay in the external
    data files of `data_folder`; `label` names it in errors."""
    check_single_runtime()
    options = session_options()
    # a copy of every weight in MLAS's packed layout would double the memory for a few small runs
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False  # the arena rounds a block's weights up and keeps what it took
    if data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_folder))
    providers = resolve_providers(provider)
    if providers[0] != CPU:
        preload_cuda()
    try:
        session = ort.InferenceSession(model, options, providers=providers, enable_fallback=0)
    except Exception as e:
        raise RuntimeRefused(f"onnxruntime could not load {label}: {one_line(e)}", label) from e
    session.onnxgrow_path = label
    session.onnxgrow_provider = session.get_providers()[0]
    return session


def _session_with_small_tensors_inline(path: Path, options, providers) -> ort.InferenceSession:
    """Open a model whose shape constants (Reshape shapes, Unsqueeze axes) live in external data.

    ORT's shape inference cannot read file-backed external data (onnxruntime#21325), so a model saved
    with every tensor external fails to load. Small tensors are read into the proto; the weights stay
    in their file, which ORT is told where to find since the model now comes from bytes.
    """
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if uses_external_data(tensor) and math.prod(tensor.dims) * itemsize <= 64 * 2**10:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers, enable_fallback=0)


# --- running --------------------------------------------------------------------------------------


class BridgeSession:
    """The torch bridge in place of an ONNX Runtime session: same outputs, by name, in host memory."""

    def __init__(self, module, path, device):
        self.module, self.device = module, device
        self.onnxgrow_path = str(path)
        self.onnxgrow_provider = f"torch bridge ({device})"

    @classmethod
    def open(cls, path, provider: str):
        """None when torch (the `train` extra) is not installed."""
        try:
            import torch

            from .bridge import to_torch
        except ImportError:
            return None
        device = torch.device("cpu" if parse_provider(provider).kind == "cpu" or not torch.cuda.is_available()
                              else f"cuda:{parse_provider(provider).device}")
        return cls(to_torch(path).to(device).eval(), path, device)

    def get_outputs(self):
        return [type("Output", (), {"name": n})() for n in self.module.output_names]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from .bridge import from_numpy
        with torch.no_grad():
            outputs = self.module(**{k: from_numpy(v) for k, v in feeds.items()})
        return {n: bridge_to_numpy(t) for n, t in outputs.items()}


def bridge_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def run_model(model, feeds: dict[str, np.ndarray], provider: str = "auto") -> dict[str, np.ndarray]:
    """Run a model (path or open session) on `feeds`; return every output by name, in host memory.

    Goes through an IO binding because numpy has no bfloat16 for ORT to hand back; the binding gives
    raw tensors that are read as ml_dtypes.bfloat16.
    """
    if isinstance(model, BridgeSession):
        return model.run(feeds)
    session = model if isinstance(model, ort.InferenceSession) else open_session(model, provider)
    name = getattr(session, "onnxgrow_path", None) or getattr(session, "_model_path", None) or str(model)
    try:
        binding = session.io_binding()
        held = [to_ortvalue(array) for array in feeds.values()]  # must outlive the run
        for input_name, value in zip(feeds, held):
            binding.bind_ortvalue_input(input_name, value)
        outputs = [o.name for o in session.get_outputs()]
        for output_name in outputs:
            binding.bind_output(output_name, "cpu")  # copied back to the host whichever device ran it
        session.run_with_iobinding(binding)
        return {n: to_numpy(v) for n, v in zip(outputs, binding.get_outputs())}
    except Exception as e:
        raise RuntimeRefused(f"onnxruntime could not run {name}: {one_line(e)}", name) from e


def to_ortvalue(array: np.ndarray) -> ort.OrtValue:
    array = np.asarray(array, order="C")  # not ascontiguousarray: it makes a scalar 1-d
    if array.dtype == ml_dtypes.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def to_numpy(value: ort.OrtValue) -> np.ndarray:
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    array = np.empty(value.shape(), dtype=np.uint16)
    if array.size:
        ctypes.memmove(array.ctypes.data, value.data_ptr(), array.nbytes)
    return array.view(ml_dtypes.bfloat16)


def one_line(error: Exception) -> str:
    """ORT's messages span lines and start with a status prefix; ours are one line."""
    text = " ".join(str(error).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text[:400] or type(error).__name__


check_single_runtime()  # once, at import: two runtimes installed is a broken install, whatever runs next
