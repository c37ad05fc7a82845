// CUDA kernels of fastseg::ext_lattice_build and fastseg::ext_lattice_filter (table format: csrc/fastseg.cpp).
//
// Build, all images in each launch: (1) per point, elevation, enclosing simplex and barycentric weights (the
// shared math of lattice/lattice_math.h, in double as the CPU build and with its products rounded as there
// (mul_rn: no FMA contraction), so both builds find the same simplices);
// (2) per splat entry (point, simplex vertex), the vertex's key goes into the image's open-addressing table
// (linear probing over int32 slots, 2 E or more of them so that a probe always ends): a slot holds the index of
// the first entry that claimed it with atomicCAS, and since every entry's key is a function of its point's
// simplex (written by (1)), any thread can compare its key with a slot's exactly; no locks, no spinning;
// (3) the occupied slots, numbered in slot order by a prefix sum, are the vertices (a host synchronisation
// reads the vertex counts, to size the tables, and the first bad point of each image); (4) per vertex and
// direction, the two neighbours are looked up in the now read-only table; (5) the splat CSR is a stable sort
// of the entries by vertex (points ascending within a row, as the CPU build). Vertex numbering differs from
// the CPU build's (first appearance); the filter does not depend on it.
//
// Filter: all images go in one launch per pass: work items are (image, padded vertex or point, channel),
// consecutive threads take consecutive channels, so the [*, C] row reads and writes coalesce; the splat's CSR
// rows are cut into chunks first (lattice/cuda/passes.cuh), so that long rows do not serialise it. Padding vertices
// (>= num_vertices[b]) have empty splat rows and no neighbours, so they stay 0 and no one reads them: the
// kernels never need num_vertices, hence no host synchronisation. Every pass is a gather (no atomics): the
// result is deterministic.
//
// The filter does not validate ids against num_vertices on the device (that would need a synchronisation);
// instead every id is clamped into its padded table, so malformed tables give wrong numbers, never
// out-of-bounds accesses.
//
// The filter has run on an H100 (matches the CPU filter); the build is NOT RUN YET on a GPU: written and
// compiled without one. tests/test_cuda_emulation.py runs both on the CPU (tests/cuda_emulation) against the
// CPU build and filter, also under AddressSanitizer; concurrent inserts into the table are the GPU tests'.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/full.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "lattice/cuda/passes.cuh"
#include "lattice/lattice_args.h"
#include "lattice/lattice_math.h"

namespace fastseg {
namespace lattice {
namespace {

// --- build ------------------------------------------------------------------------------------------------

// elevation_scale(i, d) for i < d, passed by value to the point kernel.
struct ElevationScales {
  double s[kMaxDim];
};

// Per point of B images of N: rem0 and rank into simplex [B, N, 2 (d + 1)], the barycentric weights into
// weight [B, N, d + 1]. A point whose coordinates fail (not finite, or too large for the keys) lowers bad[b]
// to its index and gets the simplex of the origin, so the later passes stay well-defined; the build raises.
template <typename F>
__global__ void simplex_kernel(const F* __restrict__ f, int64_t fs_b, int64_t fs_d, int64_t fs_n, int d, int64_t B,
                               int64_t N, ElevationScales scale, int32_t* __restrict__ simplex,
                               F* __restrict__ weight, unsigned long long* __restrict__ bad) {
  const int d1 = d + 1;
  double elevated[kMaxDim + 1];
  double bary[kMaxDim + 2];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, p = i % N;
    elevate<double, F>(f + b * fs_b + p * fs_n, fs_d, d, scale.s, elevated);
    int32_t* rem0 = simplex + i * 2 * d1;
    int32_t* rank = rem0 + d1;
    if (!simplex_of<double>(elevated, d, rem0, rank)) {
      atomicMin(bad + b, static_cast<unsigned long long>(p));
      for (int k = 0; k <= d; ++k) {
        rem0[k] = 0;
        rank[k] = k;
        weight[i * d1 + k] = F(0);
      }
      continue;
    }
    barycentric<double>(elevated, rem0, rank, d, bary);
    for (int k = 0; k <= d; ++k) {
      weight[i * d1 + k] = static_cast<F>(bary[k]);
    }
  }
}

// Whether splat entry e (point e / (d + 1), vertex e % (d + 1)) of an image's simplex table has this key.
__device__ inline bool entry_has_key(const int32_t* simplex, int32_t e, int d, const int32_t* key) {
  const int d1 = d + 1;
  const int32_t* rem0 = simplex + int64_t(e / d1) * 2 * d1;
  const int k = e % d1;
  for (int j = 0; j < d; ++j) {
    if (vertex_coord(rem0, rem0 + d1, d, k, j) != key[j]) {
      return false;
    }
  }
  return true;
}

// Per splat entry of B images of E: claims its key's slot in the image's table ([B, capacity], -1 = empty,
// else the claiming entry) or finds the slot an equal key claimed; slot[b, e] = that slot. With at most E keys
// in at least 2 E slots, every probe sequence meets an empty slot or the key.
__global__ void insert_kernel(const int32_t* __restrict__ simplex, int d, int64_t B, int64_t E, int64_t capacity,
                              int32_t* __restrict__ table, uint32_t* __restrict__ slot) {
  const int d1 = d + 1;
  const uint64_t mask = static_cast<uint64_t>(capacity) - 1;
  int32_t key[kMaxDim];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * E; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / E;
    const int32_t e = static_cast<int32_t>(i % E);
    const int32_t* image_simplex = simplex + b * E * 2;  // E * 2 = N * 2 (d + 1)
    const int32_t* rem0 = image_simplex + int64_t(e / d1) * 2 * d1;
    vertex_key(rem0, rem0 + d1, d, e % d1, key);
    int32_t* image_table = table + b * capacity;
    uint64_t h = hash_key(key, d) & mask;
    while (true) {
      // Slots go from -1 to an entry once and never change again: a stale -1 only costs the atomicCAS.
      int32_t owner = __ldcg(image_table + h);
      if (owner < 0) {
        owner = atomicCAS(image_table + h, -1, e);
        if (owner < 0) {
          break;  // claimed
        }
      }
      if (entry_has_key(image_simplex, owner, d, key)) {
        break;
      }
      h = (h + 1) & mask;
    }
    slot[i] = static_cast<uint32_t>(h);
  }
}

// Per slot of B images: the owner entry of vertex slot_count[b, slot] - 1 for occupied slots (slot_count: the
// occupied slots up to and including this one).
__global__ void vertex_owner_kernel(const int32_t* __restrict__ table, const int32_t* __restrict__ slot_count,
                                    int64_t B, int64_t capacity, int64_t Mmax, int32_t* __restrict__ owner) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * capacity;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t e = table[i];
    if (e >= 0) {
      owner[(i / capacity) * Mmax + slot_count[i] - 1] = e;
    }
  }
}

// Per splat entry: splat_vertex[b, e] = the vertex of its slot.
__global__ void splat_vertex_kernel(const uint32_t* __restrict__ slot, const int32_t* __restrict__ slot_count,
                                    int64_t B, int64_t E, int64_t capacity, int32_t* __restrict__ splat_vertex) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * E; i += int64_t(gridDim.x) * blockDim.x) {
    splat_vertex[i] = slot_count[(i / E) * capacity + slot[i]] - 1;
  }
}

// Per (image, direction, padded vertex): the ids of the vertex's two neighbours along the direction, -1 when
// absent and for padding vertices, into neighbors [B, d + 1, Mmax, 2].
__global__ void neighbors_kernel(const int32_t* __restrict__ simplex, const int32_t* __restrict__ table,
                                 const int32_t* __restrict__ slot_count, const int32_t* __restrict__ owner,
                                 const int64_t* __restrict__ num_vertices, int d, int64_t B, int64_t E,
                                 int64_t capacity, int64_t Mmax, int32_t* __restrict__ neighbors) {
  const int d1 = d + 1;
  const uint64_t mask = static_cast<uint64_t>(capacity) - 1;
  int32_t key[kMaxDim], nkey[kMaxDim];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * d1 * Mmax;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = i % Mmax, dir = (i / Mmax) % d1, b = i / (Mmax * d1);
    int32_t* out = neighbors + i * 2;
    if (v >= num_vertices[b]) {
      out[0] = out[1] = -1;
      continue;
    }
    const int32_t* image_simplex = simplex + b * E * 2;
    const int32_t* image_table = table + b * capacity;
    const int32_t e = owner[b * Mmax + v];
    const int32_t* rem0 = image_simplex + int64_t(e / d1) * 2 * d1;
    vertex_key(rem0, rem0 + d1, d, e % d1, key);
    for (int side = 0; side < 2; ++side) {
      neighbour_key(key, d, static_cast<int>(dir), side, nkey);
      uint64_t h = hash_key(nkey, d) & mask;
      int32_t id = -1;
      for (int32_t t = image_table[h]; t >= 0; h = (h + 1) & mask, t = image_table[h]) {
        if (entry_has_key(image_simplex, t, d, nkey)) {
          id = slot_count[b * capacity + h] - 1;
          break;
        }
      }
      out[side] = id;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lattice_build_cuda(
    const at::Tensor& features) {
  const BuildShape shape = check_build_args(features);
  const int64_t B = shape.B, N = shape.N;
  const int d = shape.d, d1 = d + 1;
  const int64_t E = N * d1;
  const c10::cuda::CUDAGuard device_guard(features.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = pass_max_blocks();
  const auto int_opts = features.options().dtype(at::kInt);
  at::Tensor splat_vertex = at::empty({B, N, d1}, int_opts);
  at::Tensor splat_weight = at::empty({B, N, d1}, features.options());
  if (B * N == 0) {
    return {splat_vertex, splat_weight, at::empty({B, d1, 0, 2}, int_opts),
            at::zeros({B}, features.options().dtype(at::kLong)), at::zeros({B, 1}, int_opts),
            at::empty({B, E}, int_opts), at::empty({B, E}, features.options())};
  }
  int64_t capacity = 1;
  while (capacity < 2 * E) {
    capacity *= 2;
  }
  at::Tensor simplex = at::empty({B, N, 2 * d1}, int_opts);
  at::Tensor bad = at::full({B}, N, features.options().dtype(at::kLong));
  ElevationScales scale;
  for (int i = 0; i < d; ++i) {
    scale.s[i] = elevation_scale<double>(i, d);
  }
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "ext_lattice_build_cuda", [&] {
    simplex_kernel<scalar_t><<<pass_grid(B * N, max_blocks), kPassThreads, 0, stream>>>(
        features.const_data_ptr<scalar_t>(), features.stride(0), features.stride(1), features.stride(2), d, B, N,
        scale, simplex.mutable_data_ptr<int32_t>(), splat_weight.mutable_data_ptr<scalar_t>(),
        reinterpret_cast<unsigned long long*>(bad.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor table = at::full({B, capacity}, -1, int_opts);
  at::Tensor slot = at::empty({B, E}, int_opts);  // slot indices < capacity <= 2^32, stored as uint32
  uint32_t* const slot_ptr = reinterpret_cast<uint32_t*>(slot.mutable_data_ptr<int32_t>());
  insert_kernel<<<pass_grid(B * E, max_blocks), kPassThreads, 0, stream>>>(
      simplex.const_data_ptr<int32_t>(), d, B, E, capacity, table.mutable_data_ptr<int32_t>(), slot_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor slot_count = at::cumsum(table.ge(0), 1, at::kInt);
  const at::Tensor num_vertices = slot_count.select(1, capacity - 1).to(at::kLong).contiguous();
  // The one host synchronisation: the vertex counts size the tables; a bad point fails the build.
  const at::Tensor counts_and_bad = at::stack({num_vertices, bad}).cpu();
  const int64_t* nv = counts_and_bad.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    if (nv[B + b] < N) {
      throw_bad_point(features, b, nv[B + b]);
    }
  }
  const int64_t Mmax = *std::max_element(nv, nv + B);
  at::Tensor owner = at::empty({B, Mmax}, int_opts);
  vertex_owner_kernel<<<pass_grid(B * capacity, max_blocks), kPassThreads, 0, stream>>>(
      table.const_data_ptr<int32_t>(), slot_count.const_data_ptr<int32_t>(), B, capacity, Mmax,
      owner.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  splat_vertex_kernel<<<pass_grid(B * E, max_blocks), kPassThreads, 0, stream>>>(
      slot_ptr, slot_count.const_data_ptr<int32_t>(), B, E, capacity, splat_vertex.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor blur_neighbors = at::empty({B, d1, Mmax, 2}, int_opts);
  if (Mmax > 0) {
    neighbors_kernel<<<pass_grid(B * d1 * Mmax, max_blocks), kPassThreads, 0, stream>>>(
        simplex.const_data_ptr<int32_t>(), table.const_data_ptr<int32_t>(), slot_count.const_data_ptr<int32_t>(),
        owner.const_data_ptr<int32_t>(), num_vertices.const_data_ptr<int64_t>(), d, B, E, capacity, Mmax,
        blur_neighbors.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The splat CSR: entries sorted by vertex, stably, so each row lists its points in ascending order.
  const auto [sorted_vertex, entry] =
      at::sort(splat_vertex.view({B, E}), /*stable=*/std::optional<bool>(true), /*dim=*/1);
  const at::Tensor splat_points = at::floor_divide(entry, d1).to(at::kInt);
  const at::Tensor splat_points_weight = splat_weight.view({B, E}).gather(1, entry);
  const at::Tensor row_starts = at::arange(Mmax + 1, int_opts).expand({B, Mmax + 1}).contiguous();
  const at::Tensor splat_offsets = at::searchsorted(sorted_vertex, row_starts, /*out_int32=*/true);
  return {splat_vertex, splat_weight, blur_neighbors, num_vertices, splat_offsets, splat_points, splat_points_weight};
}

// --- filter -----------------------------------------------------------------------------------------------

// rows[b, p, c] = alpha * sum_k w[b, p, k] * buf[b, vertex[b, p, k], c].
template <typename scalar_t, typename acc_t>
__global__ void slice_kernel(const acc_t* __restrict__ buf, const int32_t* __restrict__ vertex,
                             const scalar_t* __restrict__ weight, int d1, int64_t B, int64_t M, int64_t N, int64_t C,
                             acc_t alpha, scalar_t* __restrict__ rows) {
  const int64_t total = B * N * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C;
    const int64_t p = (i / C) % N;
    const int64_t b = i / (C * N);
    const int32_t* vtx = vertex + (b * N + p) * d1;
    const scalar_t* w = weight + (b * N + p) * d1;
    const acc_t* bufb = buf + b * M * C;
    acc_t acc = acc_t(0);
    for (int k = 0; k < d1; ++k) {
      const int64_t v = min(max(int64_t(vtx[k]), int64_t(0)), M - 1);
      acc += static_cast<acc_t>(w[k]) * bufb[v * C + c];
    }
    rows[i] = static_cast<scalar_t>(alpha * acc);
  }
}

at::Tensor lattice_filter_cuda(const at::Tensor& values, const at::Tensor& splat_vertex,
                               const at::Tensor& splat_weight, const at::Tensor& blur_neighbors,
                               const at::Tensor& num_vertices, const at::Tensor& splat_offsets,
                               const at::Tensor& splat_points, const at::Tensor& splat_points_weight, bool reverse) {
  const FilterShape s = check_filter_args(values, splat_vertex, splat_weight, blur_neighbors, num_vertices,
                                          splat_offsets, splat_points, splat_points_weight);
  const c10::cuda::CUDAGuard device_guard(values.device());
  const bool channels_innermost = s.C > 1 && values.stride(1) == 1;
  at::Tensor rows = at::empty({s.B, s.N, s.C}, values.options());
  if (rows.numel() > 0 && s.Mmax > 0) {
    const at::Tensor x = values.transpose(1, 2).contiguous();
    const at::Tensor sv = splat_vertex.contiguous(), sw = splat_weight.contiguous(),
                     bn = blur_neighbors.contiguous(), so = splat_offsets.contiguous(), sp = splat_points.contiguous(),
                     spw = splat_points_weight.contiguous();
    const int d = static_cast<int>(s.d), d1 = d + 1;
    const int64_t E = s.N * d1;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t max_blocks = pass_max_blocks();
    const SplatChunks chunks = make_splat_chunks(so, s.B, s.Mmax, E, max_blocks, stream);
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ext_lattice_filter_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto acc_opts = values.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      at::Tensor buf0 = at::empty({s.B, s.Mmax, s.C}, acc_opts);
      at::Tensor buf1 = at::empty({s.B, s.Mmax, s.C}, acc_opts);
      const int64_t vertex_items = s.B * s.Mmax * s.C;
      at::Tensor partial = at::empty({s.B, chunks.S, s.C}, acc_opts);
      const SplatSource<scalar_t, scalar_t, acc_t> source{x.const_data_ptr<scalar_t>(), nullptr,
                                                          so.const_data_ptr<int32_t>(), sp.const_data_ptr<int32_t>(),
                                                          spw.const_data_ptr<scalar_t>(), s.N, E, /*L=*/s.C, s.C,
                                                          /*folded=*/1};
      splat(source, chunks, s.B, s.Mmax, partial.mutable_data_ptr<acc_t>(), buf0.mutable_data_ptr<acc_t>(),
            max_blocks, stream);
      for (int step = 0; step <= d; ++step) {
        const int dir = reverse ? d - step : step;
        blur_kernel<acc_t><<<pass_grid(vertex_items, max_blocks), kPassThreads, 0, stream>>>(
            buf0.const_data_ptr<acc_t>(), bn.const_data_ptr<int32_t>(), dir, d1, s.B, s.Mmax, s.C,
            buf1.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        std::swap(buf0, buf1);
      }
      slice_kernel<scalar_t, acc_t><<<pass_grid(rows.numel(), max_blocks), kPassThreads, 0, stream>>>(
          buf0.const_data_ptr<acc_t>(), sv.const_data_ptr<int32_t>(), sw.const_data_ptr<scalar_t>(), d1, s.B,
          s.Mmax, s.N, s.C, slice_alpha<acc_t>(d), rows.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (rows.numel() > 0) {
    rows.zero_();
  }
  const at::Tensor out = rows.transpose(1, 2);
  return channels_innermost ? out : out.contiguous();
}

}  // namespace
}  // namespace lattice
}  // namespace fastseg

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("ext_lattice_build", &fastseg::lattice::lattice_build_cuda);
  m.impl("ext_lattice_filter", &fastseg::lattice::lattice_filter_cuda);
}
