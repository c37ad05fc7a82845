// CUDA kernel of fastseg::ext_lattice_filter over the tables of ext_lattice_build (format: csrc/fastseg.cpp).
//
// The build stays on the CPU (a sequential hash per image; fastseg/ops/lattice.py builds CUDA features there
// and moves the tables); the filter, which a CRF runs many times per build, runs here. All images go in one
// launch per pass: work items are (image, padded vertex or point, channel), consecutive threads take
// consecutive channels, so the [*, C] row reads and writes coalesce. Padding vertices (>= num_vertices[b])
// have empty splat rows and no neighbours, so they stay 0 and no one reads them: the kernels never need
// num_vertices, hence no host synchronisation. Every pass is a gather (no atomics): the result is
// deterministic.
//
// Ids are not validated against num_vertices on the device (that would need a synchronisation); instead every
// id is clamped into its padded table, so malformed tables give wrong numbers, never out-of-bounds accesses.
//
// NOT RUN YET: written and compiled without a GPU; the CPU tests cover the table format and the math.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "lattice/lattice_args.h"
#include "lattice/lattice_math.h"

namespace fastseg {
namespace lattice {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 32;

unsigned int grid_size(int64_t total) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t wanted = std::max<int64_t>(1, (total + kThreads - 1) / kThreads);
  return static_cast<unsigned int>(std::min(wanted, static_cast<int64_t>(sm_count) * kBlocksPerSM));
}

// buf[b, v, c] = sum over v's CSR row of w * x[b, point, c].
template <typename scalar_t, typename acc_t>
__global__ void splat_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ offsets,
                             const int32_t* __restrict__ points, const scalar_t* __restrict__ points_weight,
                             int64_t B, int64_t M, int64_t N, int64_t C, int64_t E, acc_t* __restrict__ buf) {
  const int64_t total = B * M * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C;
    const int64_t v = (i / C) % M;
    const int64_t b = i / (C * M);
    const int32_t* off = offsets + b * (M + 1);
    const int64_t first = min(max(int64_t(off[v]), int64_t(0)), E);
    const int64_t last = min(max(int64_t(off[v + 1]), first), E);
    const int32_t* pts = points + b * E;
    const scalar_t* pw = points_weight + b * E;
    const scalar_t* xb = x + b * N * C;
    acc_t acc = acc_t(0);
    for (int64_t e = first; e < last; ++e) {
      const int64_t p = min(max(int64_t(pts[e]), int64_t(0)), N - 1);
      acc += static_cast<acc_t>(pw[e]) * static_cast<acc_t>(xb[p * C + c]);
    }
    buf[i] = acc;
  }
}

// out[b, v, c] = in[b, v, c] + 0.5 (in[b, n1, c] + in[b, n2, c]) along one direction.
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
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ext_lattice_filter_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto acc_opts = values.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      at::Tensor buf0 = at::empty({s.B, s.Mmax, s.C}, acc_opts);
      at::Tensor buf1 = at::empty({s.B, s.Mmax, s.C}, acc_opts);
      const int64_t vertex_items = s.B * s.Mmax * s.C;
      splat_kernel<scalar_t, acc_t><<<grid_size(vertex_items), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), so.const_data_ptr<int32_t>(), sp.const_data_ptr<int32_t>(),
          spw.const_data_ptr<scalar_t>(), s.B, s.Mmax, s.N, s.C, E, buf0.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (int step = 0; step <= d; ++step) {
        const int dir = reverse ? d - step : step;
        blur_kernel<acc_t><<<grid_size(vertex_items), kThreads, 0, stream>>>(
            buf0.const_data_ptr<acc_t>(), bn.const_data_ptr<int32_t>(), dir, d1, s.B, s.Mmax, s.C,
            buf1.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        std::swap(buf0, buf1);
      }
      slice_kernel<scalar_t, acc_t><<<grid_size(rows.numel()), kThreads, 0, stream>>>(
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
  m.impl("ext_lattice_filter", &fastseg::lattice::lattice_filter_cuda);
}
