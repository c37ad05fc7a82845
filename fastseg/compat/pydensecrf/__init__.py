"""pydensecrf's API on fastseg: `fastseg.compat.pydensecrf.densecrf` mirrors `pydensecrf.densecrf`,
`fastseg.compat.pydensecrf.utils` mirrors `pydensecrf.utils`; the classes and constants are re-exported here.

    import fastseg.compat.pydensecrf.densecrf as dcrf      # was: import pydensecrf.densecrf as dcrf
    from fastseg.compat.pydensecrf.utils import unary_from_softmax, create_pairwise_bilateral
"""

from fastseg.compat.pydensecrf import densecrf, utils
from fastseg.compat.pydensecrf.densecrf import (
    CONST_KERNEL,
    DIAG_KERNEL,
    FULL_KERNEL,
    NO_NORMALIZATION,
    NORMALIZE_AFTER,
    NORMALIZE_BEFORE,
    NORMALIZE_SYMMETRIC,
    DenseCRF,
    DenseCRF2D,
    KernelType,
    NormalizationType,
)

__all__ = [
    "CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "KernelType",
    "NO_NORMALIZATION", "NORMALIZE_AFTER", "NORMALIZE_BEFORE", "NORMALIZE_SYMMETRIC", "NormalizationType",
    "DenseCRF", "DenseCRF2D", "densecrf", "utils",
]
