"""pydensecrf.densecrf's API (DenseCRF2D, DenseCRF, constants) computed by fastseg's permutohedral lattice.

A pydensecrf script changes its import lines only:

    import fastseg.compat.pydensecrf.densecrf as dcrf   # was: import pydensecrf.densecrf as dcrf
    from fastseg.compat.pydensecrf.utils import unary_from_softmax   # was: from pydensecrf.utils import ...

Same constructors, methods, arguments, constants and results (numpy in, float32 numpy out: inference returns
the [nlabels, npoints] marginals, which np.array(Q), Q.reshape and np.argmax(Q, axis=0) use as pydensecrf's
MatrixXf). Differences: inputs need not be C-contiguous float32 (they are converted), LogisticUnary / learning
(setUnary, setUnaryEnergy(u, f)) are not provided, and `map(n)` (absent from pydensecrf2) returns the argmax
labels. `device=` on the constructors runs the lattice on a torch device (default CPU).

Kernel types (DIAG_KERNEL, FULL_KERNEL, CONST_KERNEL) only matter to pydensecrf's parameter learning; they are
accepted and do not change inference. Normalisations follow pydensecrf's DenseKernel exactly:
NO_NORMALIZATION filters as is, NORMALIZE_BEFORE / NORMALIZE_AFTER divide by K1 before / after the filter,
NORMALIZE_SYMMETRIC (default) divides by sqrt(K1) on both sides.
"""

from __future__ import annotations

import enum
import numbers

import numpy as np
import torch

from fastseg.ops.crf import PairwiseTerm, mean_field

__all__ = [
    "CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "KernelType",
    "NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC", "NormalizationType",
    "DenseCRF", "DenseCRF2D",
]


class KernelType(enum.IntEnum):
    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


class NormalizationType(enum.IntEnum):
    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = KernelType.CONST_KERNEL, KernelType.DIAG_KERNEL, KernelType.FULL_KERNEL
NO_NORMALIZATION = NormalizationType.NO_NORMALIZATION
NORMALIZE_BEFORE = NormalizationType.NORMALIZE_BEFORE
NORMALIZE_AFTER = NormalizationType.NORMALIZE_AFTER
NORMALIZE_SYMMETRIC = NormalizationType.NORMALIZE_SYMMETRIC

_NORMALIZATION_NAMES = {
    NO_NORMALIZATION: "none", NORMALIZE_BEFORE: "before", NORMALIZE_AFTER: "after", NORMALIZE_SYMMETRIC: "symmetric",
}


def _compat(compat, nlabels: int):
    """pydensecrf's _labelcomp: a number is Potts, a vector diagonal, a matrix (symmetrised) full."""
    if isinstance(compat, numbers.Number) and not isinstance(compat, bool):
        return float(compat)
    array = np.asarray(compat, dtype=np.float32)
    if array.ndim == 1:
        if array.shape[0] != nlabels:
            raise ValueError(f"Bad shape for a diagonal compatibility (Need ({nlabels},), got {array.shape})")
        return torch.from_numpy(array.copy())
    if array.ndim == 2:
        if array.shape != (nlabels, nlabels):
            raise ValueError(f"Bad shape for a matrix compatibility (Need {(nlabels, nlabels)}, got {array.shape})")
        matrix = torch.from_numpy(array.copy())
        return 0.5 * (matrix + matrix.T)
    raise ValueError("LabelCompatibility of dimension >2 not meaningful.")


class DenseCRF:
    """A fully-connected CRF over `nvar` points and `nlabels` labels (pydensecrf.densecrf.DenseCRF)."""

    def __init__(self, nvar: int, nlabels: int, *, device: str | torch.device = "cpu"):
        self._nvar = int(nvar)
        self._nlabel = int(nlabels)
        self._device = torch.device(device)
        self._unary: torch.Tensor | None = None
        self._terms: list[PairwiseTerm] = []

    # -- the model
    def setUnaryEnergy(self, u, f=None) -> None:
        if f is not None:
            raise NotImplementedError("fastseg.compat.pydensecrf: the logistic unary (setUnaryEnergy(u, f)) is not "
                                      "provided; pass the unary energy only")
        u = np.asarray(u)
        if u.ndim != 2 or u.shape[0] != self._nlabel or u.shape[1] != self._nvar:
            raise ValueError("Bad shape for unary energy (Need {}, got {})".format(
                (self._nlabel, self._nvar), u.shape))
        self._unary = torch.from_numpy(np.array(u, dtype=np.float32, order="C")).to(self._device)

    def setUnary(self, u) -> None:
        raise NotImplementedError("fastseg.compat.pydensecrf: Unary objects are not provided; use setUnaryEnergy")

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self._nvar:
            raise ValueError("Bad shape for pairwise energy (Need (?, {}), got {})".format(
                self._nvar, features.shape))
        self._add(torch.from_numpy(np.array(features, dtype=np.float32, order="C")), compat, kernel, normalization)

    def _add(self, features: torch.Tensor, compat, kernel, normalization) -> None:
        KernelType(kernel)  # raises ValueError for an unknown kernel type
        normalization = NormalizationType(normalization)
        features = features.to(self._device).reshape(1, features.shape[0], self._nvar)
        self._terms.append(PairwiseTerm.build(features, _compat(compat, self._nlabel),
                                              _NORMALIZATION_NAMES[normalization]))

    # -- inference
    def _logits(self) -> torch.Tensor:
        if self._unary is None:
            return torch.zeros(1, self._nlabel, self._nvar, device=self._device)
        return -self._unary.unsqueeze(0)

    @staticmethod
    def _numpy(q: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(q.reshape(q.shape[-2], q.shape[-1]).detach().cpu().numpy(), dtype=np.float32)

    def inference(self, niter: int) -> np.ndarray:
        """The marginals Q [nlabels, nvar] (float32) after `niter` mean-field iterations."""
        with torch.no_grad():
            return self._numpy(mean_field(self._logits(), self._terms, int(niter)))

    def map(self, niter: int) -> np.ndarray:
        """The most likely label per point after `niter` iterations (int64 [nvar])."""
        return np.argmax(self.inference(niter), axis=0)

    def startInference(self):
        """(Q, tmp1, tmp2) as pydensecrf: Q the initial marginals; stepInference(Q, tmp1, tmp2) updates Q in place."""
        q = self.inference(0)
        return q, np.zeros_like(q), np.zeros_like(q)

    def stepInference(self, Q, tmp1, tmp2) -> None:
        with torch.no_grad():
            q = torch.from_numpy(np.asarray(Q, dtype=np.float32)).to(self._device).unsqueeze(0)
            tmp = self._logits()
            for term in self._terms:
                tmp = tmp - term.message(q)
            Q[...] = self._numpy(torch.softmax(tmp, dim=1))
            if isinstance(tmp1, np.ndarray) and tmp1.shape == Q.shape:
                tmp1[...] = self._numpy(tmp)

    def klDivergence(self, Q) -> float:
        """KL(Q || P) up to a constant, as pydensecrf: sum Q log Q + sum U Q + sum_k sum Q * mu_k(Ktilde_k Q)."""
        with torch.no_grad():
            q = torch.from_numpy(np.asarray(Q, dtype=np.float32)).to(self._device).unsqueeze(0)
            kl = (q * torch.log(q.clamp_min(1e-20))).double().sum()
            if self._unary is not None:
                kl += (self._unary.unsqueeze(0) * q).double().sum()
            for term in self._terms:
                kl += (q * term.message(q)).double().sum()
            return float(kl)


class DenseCRF2D(DenseCRF):
    """A CRF over the pixels of a W x H image (pydensecrf.densecrf.DenseCRF2D); pixel index y * W + x."""

    def __init__(self, w: int, h: int, nlabels: int, *, device: str | torch.device = "cpu"):
        super().__init__(int(w) * int(h), nlabels, device=device)
        self._w, self._h = int(w), int(h)

    def _grid(self, sx: float, sy: float) -> torch.Tensor:
        y, x = torch.meshgrid(torch.arange(self._h, dtype=torch.float32), torch.arange(self._w, dtype=torch.float32),
                              indexing="ij")
        return torch.stack([x / np.float32(sx), y / np.float32(sy)]).reshape(2, -1)

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        if isinstance(sxy, numbers.Number):
            sxy = (sxy, sxy)
        self._add(self._grid(sxy[0], sxy[1]), compat, kernel, normalization)

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL,
                             normalization=NORMALIZE_SYMMETRIC) -> None:
        if isinstance(sxy, numbers.Number):
            sxy = (sxy, sxy)
        if isinstance(srgb, numbers.Number):
            srgb = (srgb, srgb, srgb)
        rgbim = np.asarray(rgbim)
        if rgbim.ndim != 3 or rgbim.shape[0] != self._h or rgbim.shape[1] != self._w:
            raise ValueError("Bad shape for pairwise bilateral (Need {}, got {})".format(
                (self._h, self._w, 3), rgbim.shape))
        if rgbim.shape[2] != 3:
            raise ValueError("addPairwiseBilateral only works for RGB images. For other types, use "
                             "`utils.create_pairwise_bilateral` to construct your own pairwise energy and add it "
                             "through `addPairwiseEnergy`.")
        if rgbim.dtype != np.uint8:
            raise ValueError(f"addPairwiseBilateral needs a uint8 image (as pydensecrf), got {rgbim.dtype}")
        colour = torch.from_numpy(np.ascontiguousarray(rgbim)).to(torch.float32).reshape(-1, 3).T
        colour = colour / torch.tensor([np.float32(s) for s in srgb]).view(3, 1)
        self._add(torch.cat([self._grid(sxy[0], sxy[1]), colour]), compat, kernel, normalization)


