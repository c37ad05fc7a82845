// The lattice's splat and blur passes on the GPU, shared by the CUDA filter (lattice_cuda.cu) and the CUDA
// mean field (csrc/crf/cuda/crf_cuda.cu). Grid-stride loops with int64 indices; consecutive threads take
// consecutive channels, so the [*, C] rows coalesce.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastseg {
namespace lattice {
// Internal linkage: each .cu file that includes this compiles its own kernels (no relocatable device code).
namespace {

// The splat is a gather over the CSR rows of the lattice's vertices, but the rows are far from even: on a
// 512x512 photograph the bilateral lattice's longest row holds 11549 entries, its mean 72, and a third of all
// entries sit in rows of over 1024. One thread per (vertex, channel) would leave the whole pass waiting on a
// few threads' serial loops. So every row is cut into chunks of at most kSplatChunk entries: one thread per
// (chunk, channel) sums its chunk into `partial`, then one thread per (vertex, channel) sums its row's chunks
// in order. Deterministic (fixed chunks, fixed order), no atomics. The chunking depends only on splat_offsets:
// make_splat_chunks builds it on the device, without a host synchronisation. Valid offsets (non-decreasing
// from 0 to E) make at most S = M + ceil(E / kSplatChunk) chunks per image; malformed ones can make more (rows
// clamped into 0..E may overlap), and chunks past S are then dropped: wrong sums, never out-of-bounds accesses.
constexpr int64_t kSplatChunk = 64;
constexpr int kPassThreads = 256;

// Blocks for a grid-stride loop over `items`, at most max_blocks (pass_max_blocks: 32 per SM).
inline unsigned int pass_grid(int64_t items, int64_t max_blocks) {
  return static_cast<unsigned int>(std::clamp<int64_t>((items + kPassThreads - 1) / kPassThreads, 1, max_blocks));
}

inline int64_t pass_max_blocks() {
  int device = 0, sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int64_t>(sm_count) * 32;
}

// Entries [first, last) of vertex v's row in one image's offsets (clamped into 0..E: malformed tables give
// wrong sums, never out-of-bounds reads), and its number of chunks.
__device__ __forceinline__ int64_t row_chunks(const int32_t* offsets, int64_t v, int64_t E, int64_t& first,
                                              int64_t& last) {
  first = min(max(int64_t(offsets[v]), int64_t(0)), E);
  last = min(max(int64_t(offsets[v + 1]), first), E);
  return (last - first + kSplatChunk - 1) / kSplatChunk;
}

// count[lb, v]: the chunks of vertex v's row.
__global__ void chunk_count_kernel(const int32_t* __restrict__ offsets, int64_t Bk, int64_t M, int64_t E,
                                   int32_t* __restrict__ count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < Bk * M; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t first, last;
    count[i] = static_cast<int32_t>(row_chunks(offsets + (i / M) * (M + 1), i % M, E, first, last));
  }
}

// chunk_vertex[lb, s] = v for each chunk s < S of vertex v, chunk_end[lb, v] being the inclusive prefix sum of
// the counts over the image's vertices (so v's chunks are chunk_end - count .. chunk_end - 1).
__global__ void chunk_vertex_kernel(const int32_t* __restrict__ offsets, const int64_t* __restrict__ chunk_end,
                                    int64_t Bk, int64_t M, int64_t E, int64_t S, int32_t* __restrict__ chunk_vertex) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < Bk * M; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t lb = i / M, v = i % M;
    int64_t first, last;
    const int64_t count = row_chunks(offsets + lb * (M + 1), v, E, first, last);
    for (int64_t s = chunk_end[i] - count; s < min(chunk_end[i], S); ++s) {
      chunk_vertex[lb * S + s] = static_cast<int32_t>(v);
    }
  }
}

// The chunking of Bk images' splat CSRs (splat_offsets [Bk, M + 1] int32, contiguous; E entries per image):
// chunk_end [Bk, M] int64 (inclusive prefix counts), chunk_vertex [Bk, S] (-1 past an image's last chunk), with
// S = M + ceil(E / kSplatChunk) >= any valid image's number of chunks, so no synchronisation is needed to size
// them.
struct SplatChunks {
  at::Tensor chunk_end, chunk_vertex;
  int64_t S;
};

inline SplatChunks make_splat_chunks(const at::Tensor& splat_offsets, int64_t Bk, int64_t M, int64_t E,
                                     int64_t max_blocks, cudaStream_t stream) {
  const int64_t S = M + (E + kSplatChunk - 1) / kSplatChunk;
  at::Tensor count = at::empty({Bk, M}, splat_offsets.options());
  chunk_count_kernel<<<pass_grid(Bk * M, max_blocks), kPassThreads, 0, stream>>>(
      splat_offsets.const_data_ptr<int32_t>(), Bk, M, E, count.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor chunk_end = at::cumsum(count, 1, at::kLong);  // int64: malformed rows can overlap and add up
  at::Tensor chunk_vertex = at::full({Bk, S}, -1, splat_offsets.options());
  chunk_vertex_kernel<<<pass_grid(Bk * M, max_blocks), kPassThreads, 0, stream>>>(
      splat_offsets.const_data_ptr<int32_t>(), chunk_end.const_data_ptr<int64_t>(), Bk, M, E, S,
      chunk_vertex.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {chunk_end, chunk_vertex, S};
}

// The values the splat gathers, for lattice image lb and channel c: q[b, p, l] with b = lb * folded + c / L and
// l = c % L, q being [Bk * folded, N, L] rows (folded > 1: one lattice serving `folded` images, their labels
// side by side in the channels, C = folded L), times pre[lb, p] (pre == nullptr: 1); q == nullptr: the values
// are 1 (a normalisation's filter(1)).
template <typename value_t, typename weight_t, typename acc_t>
struct SplatSource {
  const value_t* q;
  const acc_t* pre;
  const int32_t* offsets;  // [Bk, M + 1]
  const int32_t* points;   // [Bk, E]
  const weight_t* points_weight;
  int64_t N, E, L, C, folded;

  // sum over entries [first, last) of image lb's CSR of w * pre[p] * value(p, c)
  __device__ __forceinline__ acc_t sum(int64_t lb, int64_t c, int64_t first, int64_t last) const {
    const int32_t* pts = points + lb * E;
    const weight_t* pw = points_weight + lb * E;
    const value_t* values = q == nullptr ? nullptr : q + (lb * folded + c / L) * N * L + c % L;  // point p: [p * L]
    const acc_t* scale = pre == nullptr ? nullptr : pre + lb * N;
    acc_t acc = acc_t(0);
    for (int64_t e = first; e < last; ++e) {
      const int64_t p = min(max(int64_t(pts[e]), int64_t(0)), N - 1);
      acc_t x = values == nullptr ? acc_t(1) : static_cast<acc_t>(values[p * L]);
      if (scale != nullptr) {
        x *= scale[p];
      }
      acc += static_cast<acc_t>(pw[e]) * x;
    }
    return acc;
  }
};

// Phase 1: partial[lb, s, c] = the sum over chunk s (of vertex chunk_vertex[lb, s]); slots past the image's
// last chunk are skipped (never read).
template <typename value_t, typename weight_t, typename acc_t>
__global__ void splat_chunks_kernel(const SplatSource<value_t, weight_t, acc_t> src,
                                    const int64_t* __restrict__ chunk_end, const int32_t* __restrict__ chunk_vertex,
                                    int64_t Bk, int64_t M, int64_t S, acc_t* __restrict__ partial) {
  const int64_t C = src.C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < Bk * S * C;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, s = (i / C) % S, lb = i / (C * S);
    const int64_t v = chunk_vertex[lb * S + s];
    if (v < 0 || v >= M) {
      continue;
    }
    int64_t first, last;
    const int64_t count = row_chunks(src.offsets + lb * (M + 1), v, src.E, first, last);
    const int64_t j = s - (chunk_end[lb * M + v] - count);  // the chunk's place in its row
    const int64_t begin = min(first + j * kSplatChunk, last);
    partial[i] = src.sum(lb, c, begin, min(begin + kSplatChunk, last));
  }
}

// Phase 2: buf[lb, v, c] = the sum of vertex v's chunks below S, in order.
template <typename acc_t>
__global__ void splat_rows_kernel(const acc_t* __restrict__ partial, const int32_t* __restrict__ offsets,
                                  const int64_t* __restrict__ chunk_end, int64_t Bk, int64_t M, int64_t E, int64_t S,
                                  int64_t C, acc_t* __restrict__ buf) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < Bk * M * C;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, v = (i / C) % M, lb = i / (C * M);
    int64_t first, last;
    const int64_t count = row_chunks(offsets + lb * (M + 1), v, E, first, last);
    const int64_t end = chunk_end[lb * M + v];
    const acc_t* chunks = partial + lb * S * C + c;
    acc_t acc = acc_t(0);
    for (int64_t s = end - count; s < min(end, S); ++s) {
      acc += chunks[s * C];
    }
    buf[i] = acc;
  }
}

// The splat of `src` through Bk lattices of M (padded) vertices into buf [Bk, M, C], by the chunks of
// make_splat_chunks; partial holds at least Bk * chunks.S * C values.
template <typename value_t, typename weight_t, typename acc_t>
void splat(const SplatSource<value_t, weight_t, acc_t>& src, const SplatChunks& chunks, int64_t Bk, int64_t M,
           acc_t* partial, acc_t* buf, int64_t max_blocks, cudaStream_t stream) {
  splat_chunks_kernel<value_t, weight_t, acc_t><<<pass_grid(Bk * chunks.S * src.C, max_blocks), kPassThreads, 0,
                                                  stream>>>(src, chunks.chunk_end.const_data_ptr<int64_t>(),
                                                            chunks.chunk_vertex.const_data_ptr<int32_t>(), Bk, M,
                                                            chunks.S, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  splat_rows_kernel<acc_t><<<pass_grid(Bk * M * src.C, max_blocks), kPassThreads, 0, stream>>>(
      partial, src.offsets, chunks.chunk_end.const_data_ptr<int64_t>(), Bk, M, src.E, chunks.S, src.C, buf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Over B lattices of M (padded) vertices with C channels, channels innermost ([B, M, C]; consecutive threads
// take consecutive channels, so the rows coalesce): out[b, v, c] = in[b, v, c] + 0.5 (in[b, n1, c] +
// in[b, n2, c]) along one direction, n1 and n2 from neighbors [B, d + 1, M, 2] (-1, or any id outside 0..M-1:
// no neighbour; malformed ids are never read). A gather: deterministic, no atomics.
template <typename acc_t>
__global__ void blur_kernel(const acc_t* __restrict__ in, const int32_t* __restrict__ neighbors, int dir, int d1,
                            int64_t B, int64_t M, int64_t C, acc_t* __restrict__ out) {
  const int64_t total = B * M * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C;
    const int64_t v = (i / C) % M;
    const int64_t b = i / (C * M);
    const int32_t* n = neighbors + ((b * d1 + dir) * M + v) * 2;
    const acc_t* inb = in + b * M * C;
    acc_t side = acc_t(0);
    const int32_t n1 = n[0], n2 = n[1];
    if (n1 >= 0 && n1 < M) {
      side += inb[int64_t(n1) * C + c];
    }
    if (n2 >= 0 && n2 < M) {
      side += inb[int64_t(n2) * C + c];
    }
    out[i] = in[i] + acc_t(0.5) * side;
  }
}

}  // namespace
}  // namespace lattice
}  // namespace fastseg
