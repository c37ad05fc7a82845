"""Which implementation runs an op: backend selection, the compiled extension, and build information.

Every fastseg op has up to four implementations:

- ``"triton"``: the Triton kernels. They run on CUDA tensors, and on CPU tensors when the environment
  variable ``TRITON_INTERPRET=1`` was set before triton was imported (Triton's interpreter; slow, for tests).
- ``"extension"``: the compiled extension ``fastseg._C``: C++ kernels for CPU tensors, CUDA kernels for
  CUDA tensors when it was built with CUDA.
- ``"aten"``: torch's own kernels, for ops where fastseg's gain is on the GPU and torch's kernel is the faster
  one on the CPU: fused_conv2d (torch's convolution, oneDNN on the CPU, with the affine folded into the weights
  and bias, and the residual and ReLU in place) and max_unpool2d's forward.
- ``"reference"``: plain PyTorch, the specification the kernels are tested against.

``"auto"`` (the default) picks Triton for CUDA tensors; for CPU tensors ATen where the op has it, else the
extension, else the reference. ``with fastseg.backend(name):`` forces one for the ops called inside the block
(per thread).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import warnings
from typing import Iterator

import torch

from fastseg._version import __version__

BACKENDS = ("auto", "triton", "extension", "aten", "reference")

_BUILD_HINT = (
    "Build it from the fastseg source tree with\n"
    "    pip install --no-build-isolation -e .\n"
    "(CPU and, when a CUDA toolkit and a CUDA build of torch are found, CUDA kernels; FASTSEG_CUDA=1 forces "
    "CUDA, FASTSEG_CUDA=0 builds CPU only), or in place with `python setup.py build_ext --inplace`."
)

_active_backend: contextvars.ContextVar[str] = contextvars.ContextVar("fastseg_backend", default="auto")

# op name -> the backends that implement it ("triton", "extension", "aten", "reference")
_op_backends: dict[str, frozenset[str]] = {}


class ExtensionUnavailableError(RuntimeError):
    """Raised when an op needs fastseg._C and it is missing, failed to load, or lacks the kernel."""


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the implementation used by fastseg ops inside the ``with`` block.

    Args:
        name: ``"auto"`` (default: Triton on CUDA; on CPU ATen, the C++ extension or the reference, in that
            order, whichever the op has), ``"triton"`` (Triton kernels; CPU tensors need ``TRITON_INTERPRET=1``),
            ``"extension"`` (fastseg._C's C++/CUDA kernels), ``"aten"`` (torch's own kernels, where an op has
            them) or ``"reference"`` (plain PyTorch).
    """
    if name not in BACKENDS:
        raise ValueError(f"fastseg.backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    token = _active_backend.set(name)
    try:
        yield
    finally:
        _active_backend.reset(token)


def current_backend() -> str:
    """The backend forced by the innermost ``fastseg.backend(...)`` block, or ``"auto"``."""
    return _active_backend.get()


def register_op(op: str, backends: set[str]) -> None:
    """Record which implementations an op has (used by select() and `python -m fastseg info`)."""
    _op_backends[op] = frozenset(backends)


def registered_ops() -> dict[str, frozenset[str]]:
    return dict(_op_backends)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_runs_on(device_type: str) -> bool:
    if not triton_available():
        return False
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())


def _extension_runs_on(device_type: str) -> bool:
    ext = extension()
    if ext is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and bool(ext.build_info()["cuda_kernels"]))


def select(op: str, device: torch.device) -> str:
    """The implementation ("triton", "extension", "aten" or "reference") that runs `op` on `device` now.

    Raises a RuntimeError naming what is missing when the forced backend cannot run there.
    """
    have = _op_backends[op]
    forced = current_backend()
    dev = device.type
    if forced == "auto":
        if dev == "cuda" and "triton" in have and _triton_runs_on(dev):
            return "triton"
        if "aten" in have:
            return "aten"
        if "extension" in have and _extension_runs_on(dev):
            return "extension"
        if dev == "cuda" and "triton" in have:
            raise RuntimeError(f"fastseg.{op}: CUDA tensors need triton, which is not installed")
        return "reference"
    if forced not in have:
        raise RuntimeError(
            f"fastseg.{op} has no {forced!r} implementation; it has: {', '.join(sorted(have))}"
        )
    if forced == "triton" and not _triton_runs_on(dev):
        if not triton_available():
            raise RuntimeError(f"fastseg.{op}: backend('triton') needs the triton package")
        raise RuntimeError(
            f"fastseg.{op}: backend('triton') on {dev} tensors needs TRITON_INTERPRET=1 set before "
            "triton is imported (Triton's CPU interpreter), or CUDA tensors"
        )
    if forced == "extension" and not _extension_runs_on(dev):
        require_extension()
        raise ExtensionUnavailableError(
            f"fastseg.{op}: fastseg._C was built without CUDA kernels, so backend('extension') cannot run "
            f"on {dev} tensors. Rebuild with FASTSEG_CUDA=1. " + _BUILD_HINT
        )
    return forced


# --- the compiled extension -------------------------------------------------------------------


def _release(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11): the part of torch's version that the C++ ABI depends on."""
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


def _build_config():
    """fastseg/_build_config.py (written by setup.py next to the extension it built), or None."""
    try:
        return importlib.import_module("fastseg._build_config")
    except ImportError:
        return None


def _torch_mismatch_message(built_for: str, variant: str | None) -> str:
    if variant is None:  # a source tree built in place
        fix = f"Rebuild fastseg against this torch. {_BUILD_HINT}"
    else:
        flavour = "CPU" if variant == "cpu" else variant
        wanted, have = (".".join(map(str, _release(v))) for v in (built_for, torch.__version__))
        fix = (
            f"Install torch {wanted}.x, or the fastseg {flavour} wheel built for torch {have} (see the README's "
            f"Wheels section), or rebuild fastseg from source against this torch: {_BUILD_HINT}"
        )
    return (
        f"fastseg {__version__} was built against torch {built_for}, but torch {torch.__version__} is installed; "
        f"its compiled extension fastseg._C only loads with the torch release it was built for. {fix}"
    )


def _load_extension():
    """Import fastseg._C and check it was built for this torch and this CUDA major version.

    Raises ImportError with rebuild instructions when it is missing or built for another torch/CUDA. The
    torch release is checked against _build_config.py before fastseg._C is imported: importing an extension
    built for another torch can fail with an undefined symbol, or crash.
    """
    config = _build_config()
    if config is not None and _release(config.torch_version) != _release(torch.__version__):
        raise ImportError(_torch_mismatch_message(config.torch_version, getattr(config, "variant", None)))
    try:
        _C = importlib.import_module("fastseg._C")
    except ImportError as err:
        raise ImportError(f"fastseg._C could not be imported ({err}). {_BUILD_HINT}") from err
    info = _C.build_info()
    if _release(info["torch_version"]) != _release(torch.__version__):
        raise ImportError(_torch_mismatch_message(info["torch_version"], None))
    built_cuda, runtime_cuda = info["cuda_version"], torch.version.cuda
    if built_cuda and runtime_cuda and built_cuda.split(".")[0] != runtime_cuda.split(".")[0]:
        raise ImportError(
            f"fastseg._C was built with CUDA {built_cuda}, but torch uses CUDA {runtime_cuda}. "
            f"Rebuild fastseg with a CUDA {runtime_cuda.split('.')[0]}.x toolkit. {_BUILD_HINT}"
        )
    if built_cuda and not runtime_cuda:
        raise ImportError(
            f"fastseg._C was built with CUDA {built_cuda}, but this torch is a CPU-only build. {_BUILD_HINT}"
        )
    return _C


_extension = None
_extension_error: ImportError | None = None


def _init_extension() -> None:
    """Load the extension once, at import; remember why it failed so C++ ops can say so."""
    global _extension, _extension_error
    try:
        _extension = _load_extension()
    except ImportError as err:
        _extension_error = err
        if any(f.startswith("_C.") for f in os.listdir(os.path.dirname(__file__))):
            # A compiled file is there but unusable: worth a warning, unlike a source checkout never built.
            warnings.warn(str(err), RuntimeWarning, stacklevel=3)


def extension():
    """The loaded fastseg._C module, or None."""
    return _extension


def extension_error() -> ImportError | None:
    return _extension_error


def require_extension():
    """fastseg._C, or an ExtensionUnavailableError saying why it is not there and how to build it."""
    if _extension is None:
        raise ExtensionUnavailableError(str(_extension_error))
    return _extension


def build_info() -> dict:
    """How this fastseg was built.

    Returns a dict: ``version`` (fastseg), ``torch_version`` (torch it was built against),
    ``cuda_version`` (CUDA toolkit it was built with, None for CPU-only), ``arch_list`` (CUDA architectures,
    None for CPU-only), ``cuda_kernels`` (whether CUDA kernels are compiled in), ``extension_loaded`` and
    ``extension_error`` (why fastseg._C is not usable, or None).
    """
    if _extension is None:
        info = {"version": __version__, "torch_version": None, "cuda_version": None, "arch_list": None,
                "cuda_kernels": False}
    else:
        info = dict(_extension.build_info())
    info["extension_loaded"] = _extension is not None
    info["extension_error"] = None if _extension_error is None else str(_extension_error)
    return info
