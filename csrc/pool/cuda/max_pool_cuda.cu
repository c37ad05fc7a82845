// CUDA kernels of fastseg::ext_max_pool2d_out and fastseg::ext_max_pool2d_backward_out: the CUDA twin of the
// Triton kernels in fastseg/ops/max_pool_kernels.py.
//
// One thread per output element (forward) or per input element (backward, a gather, so no atomics and a
// deterministic result), grid-stride loops. The per-element work is the shared math in
// pool/max_pool_math.h, which the CPU kernels run too.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE/cuSOLVER headers, which
// a minimal CUDA toolkit (nvcc + runtime) lacks. c10::cuda::getCurrentCUDAStream is the function that
// at::cuda::getCurrentCUDAStream names.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "pool/max_pool_args.h"
#include "pool/max_pool_math.h"

namespace fastseg {
namespace pool {
namespace {

constexpr int kThreads = 256;
// Enough resident blocks to fill every SM several times over; the grid-stride loop covers the rest, so
// huge tensors do not need huge grids.
constexpr int kBlocksPerSM = 32;

template <typename I>
struct Strides4 {
  I n, c, h, w;
};

template <typename I>
Strides4<I> strides_of(const at::Tensor& t) {
  return {static_cast<I>(t.stride(0)), static_cast<I>(t.stride(1)), static_cast<I>(t.stride(2)),
          static_cast<I>(t.stride(3))};
}

// Splits a linear work index into (n, c, h, w). Consecutive threads get consecutive w (NCHW-like layouts)
// or consecutive c (channels_last), so their loads and stores coalesce.
template <typename I>
__device__ __forceinline__ void unravel_nchw(I i, bool channels_last, I C, I H, I W, I& n, I& c, I& h, I& w) {
  if (channels_last) {
    c = i % C;
    i /= C;
    w = i % W;
    i /= W;
    h = i % H;
    n = i / H;
  } else {
    w = i % W;
    i /= W;
    h = i % H;
    i /= H;
    c = i % C;
    n = i / C;
  }
}

template <typename scalar_t, typename idx_t, typename I>
__global__ void max_pool2d_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                          idx_t* __restrict__ argmax, I C, I H, I W, I OH, I OW,
                                          Strides4<I> xs, Strides4<I> os, Strides4<I> as, PoolWindow<I> p,
                                          bool channels_last, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    I n, c, oh, ow;
    unravel_nchw<I>(static_cast<I>(i), channels_last, C, OH, OW, n, c, oh, ow);
    max_pool2d_forward_element<scalar_t, acc_t, idx_t, I>(
        x + n * xs.n + c * xs.c, H, W, xs.h, xs.w, p, oh, ow, out + n * os.n + c * os.c + oh * os.h + ow * os.w,
        argmax + n * as.n + c * as.c + oh * as.h + ow * as.w);
  }
}

template <typename scalar_t, typename idx_t, typename I>
__global__ void max_pool2d_backward_kernel(const scalar_t* __restrict__ grad_out, const idx_t* __restrict__ argmax,
                                           scalar_t* __restrict__ grad_in, I C, I H, I W, I OH, I OW,
                                           Strides4<I> gos, Strides4<I> as, Strides4<I> gis, PoolWindow<I> p,
                                           bool channels_last, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    I n, c, ih, iw;
    unravel_nchw<I>(static_cast<I>(i), channels_last, C, H, W, n, c, ih, iw);
    grad_in[n * gis.n + c * gis.c + ih * gis.h + iw * gis.w] =
        max_pool2d_backward_element<scalar_t, acc_t, idx_t, I>(grad_out + n * gos.n + c * gos.c, gos.h, gos.w,
                                                               argmax + n * as.n + c * as.c, as.h, as.w, OH, OW,
                                                               W, p, ih, iw);
  }
}

// 32-bit index arithmetic is markedly cheaper on the GPU (integer division above all); it is safe when every
// element offset of every tensor, the number of work items, and every intermediate of the window arithmetic
// (oh * sh - ph + r * dh, i + ph - (kh - 1) * dh + sh, r * kw + c; at most `reach` in magnitude) stay below 2**31.
bool fits_int32(std::initializer_list<const at::Tensor*> tensors, const PoolWindow<int64_t>& p, int64_t H,
                int64_t W, int64_t OH, int64_t OW) {
  constexpr int64_t limit = std::numeric_limits<int32_t>::max();
  const int64_t reach_h = OH * p.sh + p.ph + p.kh * p.dh + H;
  const int64_t reach_w = OW * p.sw + p.pw + p.kw * p.dw + W;
  if (reach_h >= limit || reach_w >= limit || p.kh * p.kw >= limit) {
    return false;
  }
  for (const at::Tensor* t : tensors) {
    if (t->numel() == 0) {
      continue;
    }
    int64_t max_offset = 0;
    for (int64_t d = 0; d < t->dim(); ++d) {
      max_offset += (t->size(d) - 1) * t->stride(d);
    }
    if (max_offset >= limit || t->numel() >= limit) {
      return false;
    }
  }
  return true;
}

template <typename I>
PoolWindow<I> narrow_window(const PoolWindow<int64_t>& p) {
  return {static_cast<I>(p.kh), static_cast<I>(p.kw), static_cast<I>(p.sh), static_cast<I>(p.sw),
          static_cast<I>(p.ph), static_cast<I>(p.pw), static_cast<I>(p.dh), static_cast<I>(p.dw)};
}

// Call under the CUDAGuard: the SM count is the current device's.
unsigned int grid_size(int64_t total) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min(wanted, static_cast<int64_t>(sm_count) * kBlocksPerSM));
}

template <typename scalar_t, typename idx_t, typename I>
void launch_forward(const at::Tensor& x, const at::Tensor& out, const at::Tensor& argmax,
                    const PoolWindow<int64_t>& p) {
  const int64_t total = out.numel();
  max_pool2d_forward_kernel<scalar_t, idx_t, I>
      <<<grid_size(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), argmax.mutable_data_ptr<idx_t>(),
          static_cast<I>(x.size(1)), static_cast<I>(x.size(2)), static_cast<I>(x.size(3)),
          static_cast<I>(out.size(2)), static_cast<I>(out.size(3)), strides_of<I>(x), strides_of<I>(out),
          strides_of<I>(argmax), narrow_window<I>(p), channels_innermost(out), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename idx_t, typename I>
void launch_backward(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& grad_in,
                     const PoolWindow<int64_t>& p) {
  const int64_t total = grad_in.numel();
  max_pool2d_backward_kernel<scalar_t, idx_t, I>
      <<<grid_size(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_out.const_data_ptr<scalar_t>(), argmax.const_data_ptr<idx_t>(), grad_in.mutable_data_ptr<scalar_t>(),
          static_cast<I>(grad_in.size(1)), static_cast<I>(grad_in.size(2)), static_cast<I>(grad_in.size(3)),
          static_cast<I>(grad_out.size(2)), static_cast<I>(grad_out.size(3)), strides_of<I>(grad_out),
          strides_of<I>(argmax), strides_of<I>(grad_in), narrow_window<I>(p), channels_innermost(grad_in), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void max_pool2d_out_cuda(const at::Tensor& x, const at::Tensor& out, const at::Tensor& argmax,
                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation) {
  const auto p = check_max_pool2d_forward(x, out, argmax, kernel_size, stride, padding, dilation);
  if (out.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  const bool small = fits_int32({&x, &out, &argmax}, p, x.size(2), x.size(3), out.size(2), out.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ext_max_pool2d_out_cuda", [&] {
    dispatch_argmax_dtype(argmax.scalar_type(), [&](auto idx_tag) {
      using idx_t = decltype(idx_tag);
      if (small) {
        launch_forward<scalar_t, idx_t, int32_t>(x, out, argmax, p);
      } else {
        launch_forward<scalar_t, idx_t, int64_t>(x, out, argmax, p);
      }
    });
  });
}

void max_pool2d_backward_out_cuda(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& grad_in,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation) {
  const auto p = check_max_pool2d_backward(grad_out, argmax, grad_in, kernel_size, stride, padding, dilation);
  if (grad_in.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const bool small = fits_int32({&grad_out, &argmax, &grad_in}, p, grad_in.size(2), grad_in.size(3),
                                grad_out.size(2), grad_out.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "ext_max_pool2d_backward_out_cuda", [&] {
        dispatch_argmax_dtype(argmax.scalar_type(), [&](auto idx_tag) {
          using idx_t = decltype(idx_tag);
          if (small) {
            launch_backward<scalar_t, idx_t, int32_t>(grad_out, argmax, grad_in, p);
          } else {
            launch_backward<scalar_t, idx_t, int64_t>(grad_out, argmax, grad_in, p);
          }
        });
      });
}

}  // namespace
}  // namespace pool
}  // namespace fastseg

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("ext_max_pool2d_out", &fastseg::pool::max_pool2d_out_cuda);
  m.impl("ext_max_pool2d_backward_out", &fastseg::pool::max_pool2d_backward_out_cuda);
}
