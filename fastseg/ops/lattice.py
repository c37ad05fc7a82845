"""The permutohedral lattice (Adams, Baek & Davis 2010): fast high-dimensional Gaussian filtering.

``PermutohedralLattice(features)`` builds the lattice of a batch of feature maps once; ``.filter(values)``
then approximates, for every point i,

    out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j          (each point's own contribution included)

in time linear in the number of points, as Kraehenbuehl's densecrf (and pydensecrf) does. Features are the
positions already divided by their standard deviations (e.g. (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)).

The lattice is a set of tensors (the table format is documented with the schemas in csrc/fastseg.cpp):

    splat_vertex [B, N, d+1] int32, splat_weight [B, N, d+1], blur_neighbors [B, d+1, M, 2] int32,
    num_vertices [B] int64, splat_offsets [B, M+1] int32, splat_points [B, N(d+1)] int32,
    splat_points_weight [B, N(d+1)]

so the same tables serve the C++ kernels (fastseg._C), the plain-PyTorch reference below and torch.library.

Layers: the registered custom ops ``fastseg::lattice_build`` and ``fastseg::lattice_filter`` carry the fake
implementations (torch.compile) and autograd (the filter is linear in its values, and its adjoint is the same
filter with the blur directions in reverse order); each dispatches through fastseg._backend to the compiled
extension or the reference (the compiled ops are fastseg::ext_lattice_build / ext_lattice_filter, each with a
C++ and a CUDA kernel; the tables live on the features' device).
Gradients flow to the values, not to the features.

Performance: the kernels work on [N, C] rows. Channels-innermost values (channels_last, or a points-major
[B, N, C] tensor passed as .transpose(1, 2)) are read in place and give a channels-innermost result; other
layouts cost a transpose in and out.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from fastseg import _backend

_backend.register_op("permutohedral_lattice", {"extension", "reference"})

MAX_FEATURE_DIM = 32
# Largest |elevated coordinate| the int32 keys hold with room for the simplex and neighbour offsets
# (lattice_math.h's kMaxElevated).
_MAX_ELEVATED = 2.0**30
NORMALIZATIONS = ("none", "symmetric", "after")
_NUM_TABLES = 7


def slice_alpha(d: int) -> float:
    """The slice's normalisation 1 / (1 + 2^-d) (densecrf's alpha)."""
    return 1.0 / (1.0 + 2.0**-d)


def safe_feature_limit(d: int) -> float:
    """A |feature| bound under which the int32 lattice keys cannot overflow (any point, any direction).

    |elevated_i| <= max|f| sqrt(2/3) (d + 1) (H_d + 1) <= max|f| sqrt(2/3) (d + 1) (2 + ln d).
    """
    return _MAX_ELEVATED / (math.sqrt(2.0 / 3.0) * (d + 1) * (2.0 + math.log(d)))


# --- the plain-PyTorch reference ------------------------------------------------------------------------


def _overflow_error(features: Tensor, b: int, p: int) -> ValueError:
    point = features[b, :, p].double()
    values = ", ".join(f"{v:.6g}" for v in point.tolist())
    d = features.shape[1]
    if not bool(point.isfinite().all()):
        return ValueError(f"lattice_build: features must be finite, but image {b} point {p} has ({values})")
    return ValueError(
        f"lattice_build: feature values too large for the int32 lattice keys: image {b} point {p} has features "
        f"({values}) (max |feature| {point.abs().max().item():.6g}); with d = {d} features, keep |feature| below "
        f"about {safe_feature_limit(d):.6g}. Features are positions divided by the kernel's standard deviation "
        "(sigma): a tiny sigma or huge raw values (e.g. unscaled intensities or coordinates) overflow; use a "
        "larger sigma or rescale the features."
    )


def _reference_build_image(f: Tensor, b: int, features: Tensor):
    """One image's lattice from its features f [d, N]; the arithmetic of csrc/lattice/lattice_math.h, in
    float64, vectorised over points. Returns (vertex [N, d+1], weight [N, d+1] float64, keys [M, d])."""
    d, N = f.shape
    d1 = d + 1
    dev = f.device
    i = torch.arange(d, dtype=torch.float64, device=dev)
    scale = math.sqrt(2.0 / 3.0) * d1 / torch.sqrt((i + 1) * (i + 2))
    cf = f.double().t() * scale  # [N, d]
    # elevated[i] = sum_{m >= i} cf[m] - i cf[i - 1] (i >= 1), elevated[0] = sum cf; the sums accumulate from
    # the last feature down, as the C++ loop does.
    suffix = cf.flip(1).cumsum(1).flip(1)  # suffix[:, i] = sum_{m >= i} cf[m]
    after = torch.cat([suffix[:, 1:], torch.zeros(N, 1, dtype=torch.float64, device=dev)], 1)
    elevated = torch.cat([suffix[:, :1], after - torch.arange(1, d1, device=dev) * cf], 1)  # [N, d + 1]
    bad = ~(elevated.abs() <= _MAX_ELEVATED).all(1)
    if bool(bad.any()):
        raise _overflow_error(features, b, int(bad.nonzero()[0, 0]))

    down_factor = 1.0 / d1
    v = elevated * down_factor
    up, down = torch.ceil(v) * d1, torch.floor(v) * d1
    rem0 = torch.where(up - elevated < elevated - down, up, down).long()
    total = (rem0 // d1).sum(1, keepdim=True)
    # rank: how many coordinates have a larger remainder (ties: the lower index counts as larger)
    diff = elevated - rem0.double()
    di, dj = diff[:, :, None], diff[:, None, :]
    idx = torch.arange(d1, device=dev)
    later = idx[None, :] > idx[:, None]  # [i, j]: j > i
    rank = ((later & (dj > di)) | (~later & (idx[None, :] != idx[:, None]) & (dj >= di))).sum(2)
    lift = (total > 0) & (rank >= d1 - total)
    drop = (total < 0) & (rank < -total)
    rem0 = rem0 - d1 * lift + d1 * drop
    rank = rank + total - d1 * lift + d1 * drop

    delta = (elevated - rem0.double()) * down_factor
    bary = torch.zeros(N, d + 2, dtype=torch.float64, device=dev)
    bary.scatter_add_(1, d - rank, delta)
    bary.scatter_add_(1, d + 1 - rank, -delta)
    bary[:, 0] += 1.0 + bary[:, d + 1]
    weight = bary[:, :d1]

    k = torch.arange(d1, device=dev)
    # key of vertex k, coordinate j < d: rem0[j] + (k if rank[j] <= d - k else k - (d + 1))
    r = rank[:, None, :d]  # [N, 1, d]
    keys = rem0[:, None, :d] + torch.where(r <= d - k[None, :, None], k[None, :, None], k[None, :, None] - d1)
    uniq, vertex = torch.unique(keys.reshape(-1, d), dim=0, return_inverse=True)
    return vertex.reshape(N, d1), weight, uniq


def _reference_neighbours(keys: Tensor) -> Tensor:
    """blur_neighbors [d+1, M, 2] of one image's vertex keys [M, d] (-1 where absent)."""
    M, d = keys.shape
    d1 = d + 1
    step = torch.full((d1, d), -1, dtype=keys.dtype, device=keys.device)  # side 0: -1 everywhere but dir ...
    step[torch.arange(d), torch.arange(d)] = d  # ... +d at dir (dir == d: -1 everywhere)
    shifted = torch.stack([keys[None] + step[:, None], keys[None] - step[:, None]], 1)  # [d+1, 2, M, d]
    everything = torch.cat([keys, shifted.reshape(-1, d)])
    uniq, inv = torch.unique(everything, dim=0, return_inverse=True)
    ids = torch.full((uniq.shape[0],), -1, dtype=torch.long, device=keys.device)
    ids[inv[:M]] = torch.arange(M, device=keys.device)
    return ids[inv[M:]].reshape(d1, 2, M).permute(0, 2, 1)


def reference_lattice_build(features: Tensor) -> tuple[Tensor, ...]:
    """lattice_build in plain PyTorch: features [B, d, N] -> the seven tables (vertices numbered in key
    order, where the C++ build numbers them by first appearance)."""
    B, d, N = features.shape
    d1 = d + 1
    dev = features.device
    images = [_reference_build_image(features[b], b, features) for b in range(B)]
    counts = [keys.shape[0] for _, _, keys in images]
    Mmax = max(counts, default=0)
    E = N * d1
    splat_vertex = torch.empty(B, N, d1, dtype=torch.int32, device=dev)
    splat_weight = torch.empty(B, N, d1, dtype=features.dtype, device=dev)
    blur_neighbors = torch.full((B, d1, Mmax, 2), -1, dtype=torch.int32, device=dev)
    splat_offsets = torch.full((B, Mmax + 1), E, dtype=torch.int32, device=dev)
    splat_points = torch.empty(B, E, dtype=torch.int32, device=dev)
    splat_points_weight = torch.empty(B, E, dtype=features.dtype, device=dev)
    for b, (vertex, weight, keys) in enumerate(images):
        M = keys.shape[0]
        splat_vertex[b] = vertex
        splat_weight[b] = weight
        blur_neighbors[b, :, :M] = _reference_neighbours(keys).int()
        flat = vertex.reshape(-1)
        order = torch.sort(flat, stable=True).indices  # entries by vertex, points ascending within one
        splat_points[b] = (order // d1).int()
        splat_points_weight[b] = weight.reshape(-1)[order].to(features.dtype)
        splat_offsets[b, 0] = 0
        splat_offsets[b, 1 : M + 1] = torch.bincount(flat, minlength=M).cumsum(0).int()
    num_vertices = torch.tensor(counts, dtype=torch.int64, device=dev)
    return splat_vertex, splat_weight, blur_neighbors, num_vertices, splat_offsets, splat_points, splat_points_weight


def _rows_to_layout(rows: Tensor, values: Tensor) -> Tensor:
    """[B, N, C] rows as the filter's [B, C, N] result: channels-innermost when the values are (C > 1 and
    values.stride(1) == 1), else contiguous. The C++ kernels follow the same rule."""
    out = rows.transpose(1, 2)
    return out if _channels_innermost(values) else out.contiguous()


def _channels_innermost(values: Tensor) -> bool:
    return values.shape[1] > 1 and values.stride(1) == 1


def reference_lattice_filter(values: Tensor, splat_vertex: Tensor, splat_weight: Tensor, blur_neighbors: Tensor,
                             num_vertices: Tensor, splat_offsets: Tensor, splat_points: Tensor,
                             splat_points_weight: Tensor, reverse: bool) -> Tensor:
    """lattice_filter in plain PyTorch: the splat as an index_add_ over (splat_vertex, splat_weight) (the CUDA
    kernel gathers over the CSR instead), the blur with gathers, the slice as a weighted gather."""
    B, C, N = values.shape
    d1 = splat_vertex.shape[2]
    d = d1 - 1
    alpha = slice_alpha(d)
    rows = torch.empty(B, N, C, dtype=values.dtype, device=values.device)
    for b in range(B):
        M = int(num_vertices[b])
        vertex = splat_vertex[b].long()
        weight = splat_weight[b].to(values.dtype)
        x = values[b].t()  # [N, C]
        buf = torch.zeros(M, C, dtype=values.dtype, device=values.device)
        buf.index_add_(0, vertex.reshape(-1), (weight[:, :, None] * x[:, None, :]).reshape(-1, C))
        zero = torch.zeros(1, C, dtype=values.dtype, device=values.device)
        for step in range(d1):
            direction = d - step if reverse else step
            n = blur_neighbors[b, direction, :M].long()
            n = torch.where(n < 0, M, n)
            padded = torch.cat([buf, zero])
            buf = buf + 0.5 * (padded[n[:, 0]] + padded[n[:, 1]])
        rows[b] = alpha * (weight[:, :, None] * buf[vertex]).sum(1)
    return _rows_to_layout(rows, values)


# --- dispatch to one backend ------------------------------------------------------------------------


def _build_into(features: Tensor) -> tuple[Tensor, ...]:
    # "extension" on CUDA tensors means a build with the CUDA kernels, which has the build's and the filter's
    if _backend.select("permutohedral_lattice", features.device) == "extension":
        return tuple(torch.ops.fastseg.ext_lattice_build(features))
    return reference_lattice_build(features)


def _filter_into(values: Tensor, tables: Sequence[Tensor], reverse: bool) -> Tensor:
    if _backend.select("permutohedral_lattice", values.device) == "extension":
        return torch.ops.fastseg.ext_lattice_filter(values, *tables, reverse)
    return reference_lattice_filter(values, *tables, reverse)


# --- registered ops: autograd and fake implementations ------------------------------------------------


def _check_features(features: Tensor, what: str) -> None:
    if features.dim() != 3:
        raise ValueError(f"{what}: features must be [B, d, N], got shape {tuple(features.shape)}")
    if features.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{what}: features must be float32 or float64, got {features.dtype}")
    d = features.shape[1]
    if not 1 <= d <= MAX_FEATURE_DIM:
        raise ValueError(f"{what}: the feature dimension d must be in 1..{MAX_FEATURE_DIM}, got {d}")


@torch.library.custom_op("fastseg::lattice_build", mutates_args=())
def lattice_build(features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The lattice tables of features [B, d, N] (float32/float64, finite, 1 <= d <= 32): (splat_vertex,
    splat_weight, blur_neighbors, num_vertices, splat_offsets, splat_points, splat_points_weight)."""
    _check_features(features, "lattice_build")
    return _build_into(features)


def _fake_build(features: Tensor) -> tuple[Tensor, ...]:
    """Fake tables: the vertex count M is data-dependent (an unbacked size)."""
    B, d, N = features.shape
    M = torch.library.get_ctx().new_dynamic_size()
    return (
        features.new_empty((B, N, d + 1), dtype=torch.int32),
        features.new_empty((B, N, d + 1)),
        features.new_empty((B, d + 1, M, 2), dtype=torch.int32),
        features.new_empty((B,), dtype=torch.int64),
        features.new_empty((B, M + 1), dtype=torch.int32),
        features.new_empty((B, N * (d + 1)), dtype=torch.int32),
        features.new_empty((B, N * (d + 1))),
    )


@lattice_build.register_fake
def _(features):
    _check_features(features, "lattice_build")
    return _fake_build(features)


def _filter_result_like(values: Tensor) -> Tensor:
    B, C, N = values.shape
    if _channels_innermost(values):
        return values.new_empty((B, N, C)).transpose(1, 2)
    return values.new_empty((B, C, N))


@torch.library.custom_op("fastseg::lattice_filter", mutates_args=())
def lattice_filter(values: Tensor, splat_vertex: Tensor, splat_weight: Tensor, blur_neighbors: Tensor,
                   num_vertices: Tensor, splat_offsets: Tensor, splat_points: Tensor, splat_points_weight: Tensor,
                   reverse: bool) -> Tensor:
    """values [B, C, N] filtered through a lattice (the tables of lattice_build, weights in the values' dtype):
    splat, blur along directions 0..d (d..0 when reverse: the adjoint), slice. [B, C, N], channels-innermost
    when the values are."""
    return _filter_into(values, (splat_vertex, splat_weight, blur_neighbors, num_vertices, splat_offsets,
                                 splat_points, splat_points_weight), reverse)


@lattice_filter.register_fake
def _(values, splat_vertex, splat_weight, blur_neighbors, num_vertices, splat_offsets, splat_points,
      splat_points_weight, reverse):
    return _filter_result_like(values)


def _filter_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:8])
    ctx.reverse = inputs[8]
    ctx.backend = _backend.current_backend()


# The blur is a product of symmetric per-direction stencils and slice = splat^T, so the adjoint of the filter
# is the same filter with the directions in reverse order. The backward runs on its forward's backend.
def _filter_grad(ctx, grad):
    tables = ctx.saved_tensors
    with _backend.backend(ctx.backend):
        grad_values = torch.ops.fastseg.lattice_filter(grad, *tables, not ctx.reverse)
    return (grad_values,) + (None,) * 8


lattice_filter.register_autograd(_filter_grad, setup_context=_filter_setup_context)


def _register_extension_fakes() -> None:
    """Fake implementations of the extension's ops, for opcheck and torch.compile."""
    if _backend.extension() is None or not hasattr(torch.ops.fastseg, "ext_lattice_build"):
        return

    torch.library.register_fake("fastseg::ext_lattice_build")(_fake_build)

    @torch.library.register_fake("fastseg::ext_lattice_filter")
    def _(values, *tables_and_reverse):
        return _filter_result_like(values)


_register_extension_fakes()


# --- memory: refuse what cannot fit, before allocating --------------------------------------------------
#
# A build too large for the machine must raise, not crash: on the CPU, Linux overcommits memory and kills the
# process when the pages are touched, long after an allocation succeeded. So the callers compare a lower bound
# of what they will allocate (never an over-estimate: that would refuse work that fits) with what is available.


def lattice_bytes_lower_bound(images: int, d: int, N: int, dtype: torch.dtype) -> int:
    """Bytes that lattices of `images` images of N points with d features certainly hold once built: the four
    per-entry tables (splat_vertex, splat_weight, splat_points, splat_points_weight: N (d + 1) entries each,
    per image). Not counted: the tables sized by the vertex count (unknown before the build) and the build's
    scratch."""
    weight = dtype.itemsize
    return images * N * (d + 1) * 2 * (4 + weight)


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on `device`: on the CPU, the kernel's MemAvailable (Linux; None
    elsewhere); on CUDA, the free device memory plus what torch's caching allocator holds unused."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Below this many bytes the query is skipped: reading MemAvailable (or the GPU's free memory) costs more than a
# small problem, and a machine that cannot find 64 MiB fails in the allocator with a clear error anyway.
MEMORY_CHECK_ABOVE_BYTES = 64 * 2**20


def ensure_memory(required: int, device: torch.device, what: str) -> None:
    """Raise a MemoryError naming `what` when `required` bytes (a lower bound) exceed the available memory."""
    if required < MEMORY_CHECK_ABOVE_BYTES:
        return
    available = available_memory_bytes(device)
    if available is not None and required > available:
        raise MemoryError(
            f"{what} needs at least {required / 2**30:.2f} GiB of {device.type} memory, but only "
            f"{available / 2**30:.2f} GiB are available: use a smaller crop or volume, downsample it, or process "
            "the batch in parts")


# --- the public class -----------------------------------------------------------------------------------


class PermutohedralLattice:
    """A permutohedral lattice built once from a batch of feature maps, for repeated Gaussian filtering.

    Args:
        features: [B, d, *spatial] or [B, d, N] float tensor (float16/bfloat16 are computed in float32), each
            feature already divided by its standard deviation, 1 <= d <= 32, all finite. Every image gets its
            own lattice. Not differentiable (gradients flow to the filtered values only).

    Attributes:
        batch_size, feature_dim, num_points (N = prod(spatial)), spatial_shape, num_vertices (list, per image),
        tables (the seven tensors of lattice_build).

    ``filter(values)`` approximates sum_j exp(-|f_i - f_j|^2 / 2) v_j (own contribution included).
    """

    def __init__(self, features: Tensor):
        if not isinstance(features, Tensor):
            raise TypeError(f"PermutohedralLattice: features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() < 3:
            raise ValueError(
                f"PermutohedralLattice: features must be [B, d, *spatial] or [B, d, N], got shape "
                f"{tuple(features.shape)}")
        if not features.dtype.is_floating_point:
            raise ValueError(f"PermutohedralLattice: features must be floating point, got {features.dtype}")
        B, d = features.shape[:2]
        if not 1 <= d <= MAX_FEATURE_DIM:
            raise ValueError(f"PermutohedralLattice: the feature dimension d must be in 1..{MAX_FEATURE_DIM}, got {d}")
        f = features.detach()
        if f.dtype not in (torch.float32, torch.float64):
            f = f.float()
        self.batch_size = B
        self.feature_dim = d
        self.spatial_shape = tuple(features.shape[2:])
        self.num_points = math.prod(self.spatial_shape)
        f = f.reshape(B, d, self.num_points)
        ensure_memory(lattice_bytes_lower_bound(B, d, self.num_points, f.dtype), f.device,
                      f"PermutohedralLattice of {B} x {self.num_points} points, d = {d}")
        # NaN / Inf (and features too large for the int32 keys) raise a ValueError from the build itself.
        self.device = f.device
        self.dtype = f.dtype
        self.tables = tuple(torch.ops.fastseg.lattice_build(f))
        self._tables_by_dtype: dict[torch.dtype, tuple[Tensor, ...]] = {f.dtype: self.tables}
        self._norms: dict[tuple[str, torch.dtype], Tensor] = {}

    @property
    def num_vertices(self) -> list[int]:
        """The vertex count of each image's lattice, read from the tables when asked (on CUDA, a device read)."""
        return [int(m) for m in self.tables[3].tolist()]

    def __repr__(self) -> str:
        return (f"PermutohedralLattice(batch_size={self.batch_size}, feature_dim={self.feature_dim}, "
                f"spatial_shape={self.spatial_shape}, num_vertices={self.num_vertices})")

    def _tables_for(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The tables with the weights in `dtype` (cast once and cached)."""
        if dtype not in self._tables_by_dtype:
            t = self.tables
            self._tables_by_dtype[dtype] = (t[0], t[1].to(dtype), *t[2:6], t[6].to(dtype))
        return self._tables_by_dtype[dtype]

    def _flat_values(self, values: Tensor) -> Tensor:
        if not isinstance(values, Tensor):
            raise TypeError(f"PermutohedralLattice.filter: values must be a torch.Tensor, got {type(values).__name__}")
        if values.dim() < 3 or values.shape[0] != self.batch_size:
            raise ValueError(
                f"PermutohedralLattice.filter: values must be [B, C, *spatial] or [B, C, N] with B = "
                f"{self.batch_size}, got shape {tuple(values.shape)}")
        trailing = tuple(values.shape[2:])
        if trailing != self.spatial_shape and trailing != (self.num_points,):
            raise ValueError(
                f"PermutohedralLattice.filter: values' points {trailing} do not match the lattice's spatial shape "
                f"{self.spatial_shape} (or N = {self.num_points})")
        if values.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"PermutohedralLattice.filter: values must be float32 or float64, got {values.dtype}")
        if values.device != self.device:
            raise ValueError(
                f"PermutohedralLattice.filter: values are on {values.device}, the lattice on {self.device}")
        return values.reshape(self.batch_size, values.shape[1], self.num_points)

    def _raw_filter(self, flat: Tensor, reverse: bool = False) -> Tensor:
        return torch.ops.fastseg.lattice_filter(flat, *self._tables_for(flat.dtype), reverse)

    def normalizer(self, normalization: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The per-point factor n [B, 1, N] of a normalization: 1 / sqrt(filter(1) + 1e-20) ("symmetric"),
        1 / (filter(1) + 1e-20) ("after"). Computed once per lattice and dtype."""
        key = (normalization, dtype)
        if key not in self._norms:
            ones = torch.ones(self.batch_size, 1, self.num_points, dtype=dtype, device=self.device)
            with torch.no_grad():
                mass = self._raw_filter(ones) + 1e-20
            self._norms[("symmetric", dtype)] = mass.rsqrt()
            self._norms[("after", dtype)] = mass.reciprocal()
        return self._norms[key]

    def filter(self, values: Tensor, normalization: str = "none") -> Tensor:
        """Gaussian-filter values [B, C, *spatial] (or [B, C, N]) through the lattice; differentiable.

        normalization: "none" (the plain filter), "symmetric" (n * filter(n * v), n = 1 / sqrt(filter(1) +
        1e-20), densecrf's NORMALIZE_SYMMETRIC) or "after" (n * filter(v), n = 1 / (filter(1) + 1e-20)).
        Returns the values' shape; channels-last / channels-innermost values give a channels-innermost result.
        """
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"PermutohedralLattice.filter: normalization must be one of {', '.join(NORMALIZATIONS)}, got "
                f"{normalization!r}")
        flat = self._flat_values(values)
        if normalization == "none":
            out = self._raw_filter(flat)
        elif normalization == "symmetric":
            n = self.normalizer("symmetric", flat.dtype)
            out = n * self._raw_filter(n * flat)
        else:
            out = self.normalizer("after", flat.dtype) * self._raw_filter(flat)
        return out.reshape(values.shape)
