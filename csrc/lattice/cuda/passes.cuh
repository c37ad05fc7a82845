// The lattice's splat and blur passes on the GPU, shared by the CUDA filter (lattice_cuda.cu) and the CUDA
// mean field (csrc/crf/cuda/crf_cuda.cu). Grid-stride loops with int64 indices; consecutive threads take
// consecutive channels, so the [*, C] rows coalesce.
#pragma once

#include <cstdint>

namespace fastseg {
namespace lattice {

// The splat as a gather over the CSR of Bk lattices (E = N (d + 1) entries each) into buf [Bk, M, C]:
// buf[lb, v, c] = sum over v's row (point p, weight w) of w * pre[lb, p] * q[b, p, l] with b = lb * folded +
// c / L and l = c % L, q being [Bk * folded, N, L] rows (folded > 1: one lattice serving `folded` images,
// their labels side by side in the channels, C = folded L). pre == nullptr: 1; q == nullptr: the values are 1
// (a normalisation's filter(1)). Ids are clamped into their tables: malformed CSRs never read out of bounds.
template <typename value_t, typename weight_t, typename acc_t>
__global__ void splat_kernel(const value_t* __restrict__ q, const acc_t* __restrict__ pre,
                             const int32_t* __restrict__ offsets, const int32_t* __restrict__ points,
                             const weight_t* __restrict__ points_weight, int64_t Bk, int64_t M, int64_t N,
                             int64_t E, int64_t L, int64_t C, int64_t folded, acc_t* __restrict__ buf) {
  const int64_t total = Bk * M * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C;
    const int64_t v = (i / C) % M;
    const int64_t lb = i / (C * M);
    const int32_t* off = offsets + lb * (M + 1);
    const int64_t first = min(max(int64_t(off[v]), int64_t(0)), E);
    const int64_t last = min(max(int64_t(off[v + 1]), first), E);
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
    buf[i] = acc;
  }
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

}  // namespace lattice
}  // namespace fastseg
