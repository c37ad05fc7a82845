"""Fully-connected CRF mean-field inference (Krähenbühl & Koltun 2011) over permutohedral lattices.

Semantics are pydensecrf's (densecrf v2), batched, 2-D or 3-D, any number of image channels, differentiable:

- unary energy U = -logits; Q0 = softmax(logits) over the labels;
- every iteration: tmp = -U - sum_k mu_k(Ktilde_k Q), Q = softmax(tmp);
- Ktilde_k is the Gaussian filter of kernel k on the permutohedral lattice, with pydensecrf's normalisations
  (NORMALIZE_SYMMETRIC by default: n = 1/sqrt(K 1 + 1e-20), Ktilde Q = n * K(n * Q); each pixel's own
  contribution included);
- mu_k is the label compatibility: Potts with weight w is mu(X) = -w X (messages add +w Ktilde Q); a matrix M
  is mu(X) = w * 0.5 (M + M^T) X, as pydensecrf's MatrixCompatibility (which symmetrises its matrix). For
  Potts, M = -I; the textbook Potts penalty 1 - I gives the same Q (softmax ignores the per-pixel constant
  sum_l (Ktilde Q)_l).

Kernels, with coordinates in physical units (index * spacing) per spatial axis:
- Gaussian (smoothness): features (x/sxy, y/sxy[, z/sxy]);
- bilateral (appearance): features (x/sxy, y/sxy[, z/sxy], c_0/srgb, ..., c_{C-1}/srgb).
x is the column (last axis), y the row, z the depth, in that order (pydensecrf's order, which matters: the
lattice approximation is not invariant under permuting features).

Each kernel's lattice is built once per call (the Gaussian one once for the whole batch: it depends only on
the grid) and reused by every iteration. Two implementations of the iterations:

- inference (nothing requires grad), with the compiled extension selected for the lattice, on CPU or CUDA
  float32/float64 tensors (CUDA: when fastseg._C has the CUDA kernel): one call of the fused op
  ext_crf_mean_field, which runs every iteration and the normalisations in C++/CUDA (the CPU kernel keeps Q in
  its lattices, the CUDA kernel on the device, with no host synchronisation);
- otherwise (autograd, the reference backend, other devices): torch ops over PermutohedralLattice.filter, so
  autograd reaches the logits, the kernel weights and the compatibility matrix.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from fastseg import _backend
from fastseg.ops.lattice import PermutohedralLattice, ensure_memory, lattice_bytes_lower_bound

# --- the lattice --------------------------------------------------------------------------------------------


def _build_lattice(features: Tensor):
    """One permutohedral lattice per image of `features` [B, d, N] (a seam for tests to substitute an exact
    Gaussian filter)."""
    return PermutohedralLattice(features)


NORMALIZATIONS = ("symmetric", "before", "after", "none")


@dataclass
class PairwiseTerm:
    """One pairwise potential: a lattice over [B_lat, d, N] features, its normalisation, its compatibility.

    compat is pydensecrf's LabelCompatibility as a tensor or number: a number w means Potts (mu(X) = -w X),
    a vector v [L] the diagonal mu(X) = diag(v) X, a matrix M [L, L] mu(X) = M X (callers symmetrise first).
    When the lattice holds a single image and the values a batch, the batch is folded into the channels.

    Internally marginals are points-major, [B, N, L] contiguous: the lattice reads and writes each point's
    labels as one contiguous vector (a [B, L, N] view with unit label stride), and softmax runs over the last
    dimension, so no iteration transposes anything.
    """

    lattice: object
    compat: float | Tensor
    normalization: str = "symmetric"
    shared: bool = False  # one lattice (B_lat = 1) for every image of the batch
    ones: Tensor | None = field(default=None, repr=False)  # [B_lat, 1, N] of the features' dtype and device
    _scales: tuple | None = field(default=None, repr=False)

    @classmethod
    def build(cls, features: Tensor, compat, normalization: str = "symmetric") -> "PairwiseTerm":
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        ones = features.new_ones(()).expand(features.shape[0], 1, features.shape[-1])
        return cls(_build_lattice(features), compat, normalization, shared=features.shape[0] == 1, ones=ones)

    def _normalizers(self) -> tuple[Tensor | None, Tensor | None]:
        """(pre, post), each [B_lat, N, 1] or None, from the filtered ones; computed on first use (the fused
        path computes them in the op instead)."""
        if self._scales is None:
            pre = post = None
            if self.normalization != "none":
                norm = self.lattice.filter(self.ones, normalization="none").transpose(1, 2)
                if self.normalization == "symmetric":
                    pre = post = 1.0 / torch.sqrt(norm + 1e-20)
                elif self.normalization == "before":
                    pre = 1.0 / (norm + 1e-20)
                else:
                    post = 1.0 / (norm + 1e-20)
            self._scales = (pre, post)
        return self._scales

    @property
    def pre(self) -> Tensor | None:
        return self._normalizers()[0]

    @property
    def post(self) -> Tensor | None:
        return self._normalizers()[1]

    def _lattice_filter(self, q: Tensor) -> Tensor:
        """K (pre q) for points-major q [B, N, L]: the lattice holds B images, or one image shared by the
        whole batch (then the batch is folded into the channels: one lattice, one filter call)."""
        B, N, L = q.shape
        if self.pre is not None:
            q = q * self.pre
        if self.shared and B > 1:
            folded = q.permute(1, 0, 2).reshape(1, N, B * L)
            out = self.lattice.filter(folded.transpose(1, 2), normalization="none").transpose(1, 2)
            return out.reshape(N, B, L).permute(1, 0, 2)
        return self.lattice.filter(q.transpose(1, 2), normalization="none").transpose(1, 2)

    def filter_points_major(self, q: Tensor) -> Tensor:
        """Ktilde q = post K (pre q) for points-major q [B, N, L]."""
        out = self._lattice_filter(q)
        return out if self.post is None else out * self.post

    def filter(self, q: Tensor) -> Tensor:
        """Ktilde q for q [B, L, N]."""
        return self.filter_points_major(q.transpose(1, 2)).transpose(1, 2)

    def message(self, q: Tensor) -> Tensor:
        """mu(Ktilde q) for q [B, L, N]: what pydensecrf subtracts from -U for this term."""
        q = q.transpose(1, 2)
        return -self.subtract_message(torch.zeros_like(q), q).transpose(1, 2)

    def subtract_message(self, acc: Tensor, q: Tensor) -> Tensor:
        """acc - mu(Ktilde q) for points-major acc and q [B, N, L], without materialising mu(Ktilde q) for
        Potts weights."""
        c = self.compat
        if self.post is not None and not (isinstance(c, Tensor) and c.dim() > 0):
            # Potts: the weight joins the post-normalisation, one pass: acc + K(pre q) * (post w)
            return torch.addcmul(acc, self._lattice_filter(q), self.post * c)
        filtered = self.filter_points_major(q)
        if isinstance(c, Tensor) and c.dim() == 2:
            return acc - torch.matmul(filtered, c.to(filtered.dtype).transpose(0, 1))
        if isinstance(c, Tensor) and c.dim() == 1:
            return torch.addcmul(acc, c.to(filtered.dtype), filtered, value=-1.0)
        if isinstance(c, Tensor):  # a 0-d (learnable) Potts weight
            return torch.addcmul(acc, c.to(filtered.dtype), filtered)
        return torch.add(acc, filtered, alpha=c)


# --- the fused inference path (the extension's CPU and CUDA kernels, no autograd) --------------------------


def _fused_ops_available() -> bool:
    return _backend.extension() is not None and hasattr(torch.ops.fastseg, "ext_crf_mean_field")


def _register_extension_fakes() -> None:
    if not _fused_ops_available():
        return

    @torch.library.register_fake("fastseg::ext_crf_mean_field")
    def _(logits, *terms_and_iterations):
        return logits.new_empty(logits.shape)


_register_extension_fakes()


def _can_fuse(logits: Tensor, terms: Sequence[PairwiseTerm]) -> bool:
    """The fused path serves inference: float32/float64 tensors, the extension selected for the lattice (on
    CUDA tensors that means a build with the CUDA kernels, the op's among them), real PermutohedralLattices
    (tests substitute exact filters), and nothing that autograd would have to reach."""
    if logits.dtype not in (torch.float32, torch.float64):
        return False
    if _backend.select("permutohedral_lattice", logits.device) != "extension":
        return False
    if torch.is_grad_enabled() and (logits.requires_grad or any(
            isinstance(t.compat, Tensor) and t.compat.requires_grad for t in terms)):
        return False
    return all(type(t.lattice) is PermutohedralLattice and t.lattice.device == logits.device for t in terms)


class _FusedTerm:
    """A PairwiseTerm as ext_crf_mean_field takes it: the seven lattice tables (the CPU kernel scatters through
    the first four, the CUDA kernel gathers through the splat CSR), the normalisation (which the op computes),
    a weight (Potts: w; a matrix compatibility: 1) and the matrix (None for Potts)."""

    def __init__(self, term: PairwiseTerm, dtype: torch.dtype):
        # splat_vertex, splat_weight, blur_neighbors, num_vertices, splat_offsets, splat_points, splat_points_weight
        self.tables = term.lattice._tables_for(dtype)
        self.normalization = term.normalization
        c = term.compat
        if isinstance(c, Tensor) and c.dim() == 0:
            c = float(c)
        if isinstance(c, Tensor):
            c = c.to(dtype)
            self.weight, self.compat = 1.0, (torch.diag(c) if c.dim() == 1 else c).contiguous()
        else:
            self.weight, self.compat = float(c), None


def _mean_field_fused(logits: Tensor, terms: Sequence[PairwiseTerm], iterations: int) -> Tensor:
    """mean_field as one ext_crf_mean_field call: every iteration in C++ (CPU) or CUDA."""
    fused = [_FusedTerm(t, logits.dtype) for t in terms]
    return torch.ops.fastseg.ext_crf_mean_field(logits, *([f.tables[i] for f in fused] for i in range(7)),
                                                [f.normalization for f in fused], [f.weight for f in fused],
                                                [f.compat for f in fused], iterations)


def mean_field(logits: Tensor, terms: Sequence[PairwiseTerm], iterations: int) -> Tensor:
    """pydensecrf's inference over [B, L, N] logits (= -U): Q0 = softmax(logits), then `iterations` updates
    Q = softmax(logits - sum_k mu_k(Ktilde_k Q)). Returns Q [B, L, N].

    With the extension selected, on the CPU or (in a build with the CUDA kernels) CUDA, when nothing requires
    grad (inference), all the iterations (and the normalisations) are one call of ext_crf_mean_field;
    otherwise the differentiable torch loop below runs."""
    if _can_fuse(logits, terms):
        return _mean_field_fused(logits, terms, iterations)
    logits = logits.transpose(1, 2).contiguous()  # points-major [B, N, L]
    q = torch.softmax(logits, dim=-1)
    for _ in range(iterations):
        tmp = logits
        for term in terms:
            tmp = term.subtract_message(tmp, q)
        q = torch.softmax(tmp, dim=-1)
    return q.transpose(1, 2)


# --- validation ---------------------------------------------------------------------------------------------


def _positive_per(value, count: int, what: str) -> list[float]:
    """A positive number, or a sequence of `count` positive numbers, as a list of floats."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = [float(value)] * count
    elif isinstance(value, (list, tuple)) and len(value) == count and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        values = [float(v) for v in value]
    else:
        raise ValueError(f"dense_crf: {what} must be a positive number or a sequence of {count}, got {value!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"dense_crf: {what} must be positive and finite, got {value!r}")
    return values


def _weight(value, what: str):
    """A kernel weight: None or a number (0 / None skip the kernel), or a tensor of one element."""
    if value is None:
        return 0.0
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"dense_crf: {what} must be a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        if not value.is_floating_point():
            value = value.float()
        return value.reshape(())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise ValueError(f"dense_crf: {what} must be finite, got {value!r}")
        return float(value)
    raise ValueError(f"dense_crf: {what} must be a number or a tensor, got {type(value).__name__}")


def _kernel_used(weight) -> bool:
    """A kernel weight of 0 (or None, which _weight makes 0) drops the kernel; a tensor weight never does."""
    return isinstance(weight, Tensor) or weight != 0.0


def _check_finite(*named: tuple[Tensor, str]) -> None:
    """Raise naming the first of the (tensor, name) pairs that holds a NaN or Inf. One min/max reduction per
    tensor (NaN propagates through it: no boolean temporary of the tensor's size), one device read for all."""
    checked = [(t, what) for t, what in named if t.numel() and t.is_floating_point()]
    if not checked:
        return
    finite = torch.stack([torch.isfinite(torch.stack(torch.aminmax(t))).all() for t, _ in checked]).tolist()
    for ok, (_, what) in zip(finite, checked):
        if not ok:
            raise ValueError(f"dense_crf: {what} contains NaN or Inf")


def _validate(logits, image, iterations, compatibility, spacing):
    if not isinstance(logits, Tensor) or not isinstance(image, Tensor):
        raise TypeError("dense_crf: logits and image must be torch.Tensors")
    if logits.dim() not in (4, 5):
        raise ValueError(f"dense_crf: logits must be [B, L, H, W] or [B, L, D, H, W], got shape "
                         f"{tuple(logits.shape)}")
    if image.dim() != logits.dim():
        raise ValueError(f"dense_crf: image must have the logits' rank ({logits.dim()}: [B, C, *spatial]), got "
                         f"shape {tuple(image.shape)}")
    if image.shape[0] != logits.shape[0] or image.shape[2:] != logits.shape[2:]:
        raise ValueError(f"dense_crf: image {tuple(image.shape)} and logits {tuple(logits.shape)} must have the "
                         "same batch size and spatial size")
    if logits.shape[1] < 1 or image.shape[1] < 1:
        raise ValueError("dense_crf: logits need at least one label and image at least one channel")
    if image.device != logits.device:
        raise ValueError(f"dense_crf: image is on {image.device}, logits on {logits.device}")
    if not logits.is_floating_point():
        raise ValueError(f"dense_crf: logits must be floating point, got {logits.dtype}")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 0:
        raise ValueError(f"dense_crf: iterations must be an integer >= 0, got {iterations!r}")
    ndim = logits.dim() - 2
    spacing = [1.0] * ndim if spacing is None else _positive_per(spacing, ndim, "spacing")
    L = logits.shape[1]
    if compatibility is not None:
        if not isinstance(compatibility, Tensor):
            compatibility = torch.as_tensor(compatibility)
        if compatibility.shape != (L, L):
            raise ValueError(f"dense_crf: compatibility must be an [L, L] = [{L}, {L}] matrix, got shape "
                             f"{tuple(compatibility.shape)}")
        _check_finite((compatibility, "compatibility"))
    return spacing, compatibility


def dense_crf_bytes_lower_bound(B: int, L: int, N: int, ndim: int, channels: int, gaussian: bool, bilateral: bool,
                                compute: torch.dtype) -> int:
    """Bytes that dense_crf certainly allocates (a lower bound, compared with the available memory before
    anything is built): the lattices' per-entry tables (lattice.lattice_bytes_lower_bound: the Gaussian lattice
    serves the batch, each image has its own bilateral one) and three [B, L, N] arrays (the logits in the
    compute dtype, Q, the result)."""
    required = 3 * B * L * N * compute.itemsize
    if gaussian:
        required += lattice_bytes_lower_bound(1, ndim, N, compute)
    if bilateral:
        required += lattice_bytes_lower_bound(B, ndim + channels, N, compute)
    return required


# --- features -----------------------------------------------------------------------------------------------


def _coordinates(spatial: Sequence[int], divisor: Sequence[float], device, dtype) -> Tensor:
    """[ndim, *spatial] features index / divisor per axis, in pydensecrf's order: x (last axis), y, z.

    Computed as pydensecrf does (i / sx in the compute precision), so float32 features are bit-identical."""
    axes = [torch.arange(n, device=device, dtype=dtype) / s for n, s in zip(spatial, divisor)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids[::-1])


def dense_crf(logits: Tensor, image: Tensor, *, iterations: int = 10, gaussian_sxy=3.0, gaussian_weight=3.0,
              bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_weight=10.0,
              compatibility: Tensor | None = None, spacing=None) -> Tensor:
    """Dense-CRF mean-field inference, pydensecrf's update, batched, 2-D or 3-D.

    Args:
        logits: [B, L, H, W] or [B, L, D, H, W] float; log-probabilities up to a per-pixel constant (the
            unary energy is -logits; pydensecrf's unary_from_softmax(p) is -log p).
        image: [B, C, *spatial] with any number of channels C, in the units of bilateral_srgb (0..255 colour
            values for 8-bit photographs, as pydensecrf). Not differentiated.
        iterations: mean-field updates (>= 0; 0 returns softmax(logits)).
        gaussian_sxy, bilateral_sxy: spatial standard deviations (pixels, or physical units with spacing): a
            number or one per spatial axis, in the tensor's axis order ((H, W) or (D, H, W)).
        bilateral_srgb: intensity standard deviation: a number or one per image channel.
        gaussian_weight, bilateral_weight: the kernels' Potts weights (or the factors of the compatibility
            matrix): numbers or one-element tensors (learnable); 0 or None drops the kernel.
        compatibility: None for Potts, or an [L, L] label compatibility M in pydensecrf's convention
            (MatrixCompatibility: positive entries penalise a label pair; Potts is -I): kernel k contributes
            -w_k * 0.5 (M + M^T) Ktilde_k Q to the next update's logits.
        spacing: physical voxel size per spatial axis ((H, W) or (D, H, W) order); coordinates are multiplied
            by it before dividing by the sxy.

    Returns:
        Q, the marginals: probabilities with the logits' shape, dtype (float32 compute for half types) and device.
    """
    spacing, compatibility = _validate(logits, image, iterations, compatibility, spacing)
    ndim = logits.dim() - 2
    B, L = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    N = math.prod(spatial)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w_gauss = _weight(gaussian_weight, "gaussian_weight")
    w_bilat = _weight(bilateral_weight, "bilateral_weight")
    # Before anything reads or allocates at this size (the finiteness checks walk every element).
    required = dense_crf_bytes_lower_bound(B, L, N, ndim, image.shape[1], _kernel_used(w_gauss), _kernel_used(w_bilat),
                                           compute)
    ensure_memory(required, logits.device, f"dense_crf of {B} x {L} labels x {N} points")
    _check_finite((logits, "logits"), (image, "image"))
    unary = logits.to(compute).reshape(B, L, N)
    if compatibility is not None:
        compatibility = compatibility.to(device=logits.device, dtype=compute)
        compatibility = 0.5 * (compatibility + compatibility.transpose(0, 1))

    g_sxy = _positive_per(gaussian_sxy, ndim, "gaussian_sxy")
    b_sxy = _positive_per(bilateral_sxy, ndim, "bilateral_sxy")
    srgb = _positive_per(bilateral_srgb, image.shape[1], "bilateral_srgb")

    terms = []
    for weight, kind in ((w_gauss, "gaussian"), (w_bilat, "bilateral")):
        if not _kernel_used(weight):
            continue
        sxy = g_sxy if kind == "gaussian" else b_sxy
        coords = _coordinates(spatial, [s / sp for sp, s in zip(spacing, sxy)], logits.device, compute)
        if kind == "gaussian":  # the same for every image: one lattice for the batch
            features = coords.reshape(1, ndim, N)
        else:
            sigma = torch.tensor(srgb, device=logits.device, dtype=compute).view(1, -1, *([1] * ndim))
            colour = image.detach().to(compute) / sigma
            features = torch.cat([coords.reshape(1, ndim, N).expand(B, ndim, N), colour.reshape(B, -1, N)], 1)
        if isinstance(weight, Tensor):
            weight = weight.to(device=logits.device, dtype=compute)
        # this term's compatibility in pydensecrf's terms: Potts weight w (mu(X) = -w X), or the matrix w M
        compat = weight if compatibility is None else weight * compatibility
        terms.append(PairwiseTerm.build(features.contiguous(), compat))

    q = mean_field(unary, terms, int(iterations))
    return q.reshape(logits.shape).to(logits.dtype)
