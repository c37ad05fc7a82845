"""fastseg: hand-written GPU kernels for semantic segmentation, behind a PyTorch API.

Every op has a plain-PyTorch reference next to its kernels; `fastseg.backend(...)` picks which runs.
"""

from fastseg import _backend

_backend._init_extension()

from fastseg._backend import backend, build_info, current_backend  # noqa: E402
from fastseg._version import __version__  # noqa: E402
from fastseg.ops.conv import fused_conv2d  # noqa: E402
from fastseg.ops.crf import dense_crf  # noqa: E402
from fastseg.ops.lattice import PermutohedralLattice  # noqa: E402
from fastseg.ops.max_pool import max_pool2d, max_pool2d_with_indices, max_unpool2d  # noqa: E402
from fastseg import nn  # noqa: E402
from fastseg import models  # noqa: E402
from fastseg.convert import optimize, revert  # noqa: E402

__all__ = [
    "__version__",
    "PermutohedralLattice",
    "backend",
    "build_info",
    "current_backend",
    "dense_crf",
    "fused_conv2d",
    "max_pool2d",
    "max_pool2d_with_indices",
    "max_unpool2d",
    "models",
    "nn",
    "optimize",
    "revert",
]
