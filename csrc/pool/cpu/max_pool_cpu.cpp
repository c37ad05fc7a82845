// CPU kernels of fastseg::ext_max_pool2d_out and fastseg::ext_max_pool2d_backward_out.
//
// The per-element work is the shared math in pool/max_pool_math.h; this file only chooses the loop order
// and splits the work across threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "pool/max_pool_args.h"
#include "pool/max_pool_math.h"

namespace fastseg {
namespace pool {
namespace {

// Roughly the number of window taps one parallel_for chunk should handle (at::internal::GRAIN_SIZE), so
// small problems run on one thread and large ones split evenly.
constexpr int64_t kTapsPerChunk = 32768;

// Calls fn(n, c, h, w) for every element of an (N, C, H, W) tensor whose layout is `layout`, in parallel.
// Channels-innermost tensors are walked as rows of C (one (n, h, w) per work item), the others as rows of
// W (one (n, c, h) per work item), so each thread streams through contiguous memory in the common layouts.
template <typename Fn>
void parallel_for_each_element(const at::Tensor& layout, int64_t taps_per_element, const Fn& fn) {
  const int64_t N = layout.size(0), C = layout.size(1), H = layout.size(2), W = layout.size(3);
  if (channels_innermost(layout)) {
    const int64_t grain = std::max<int64_t>(1, kTapsPerChunk / std::max<int64_t>(1, C * taps_per_element));
    at::parallel_for(0, N * H * W, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t w = i % W, h = (i / W) % H, n = i / (W * H);
        for (int64_t c = 0; c < C; ++c) {
          fn(n, c, h, w);
        }
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kTapsPerChunk / std::max<int64_t>(1, W * taps_per_element));
    at::parallel_for(0, N * C * H, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t h = i % H, c = (i / H) % C, n = i / (H * C);
        for (int64_t w = 0; w < W; ++w) {
          fn(n, c, h, w);
        }
      }
    });
  }
}

template <typename scalar_t, typename idx_t>
void forward_impl(const at::Tensor& x, const at::Tensor& out, const at::Tensor& argmax,
                  const PoolWindow<int64_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  idx_t* argmax_data = argmax.mutable_data_ptr<idx_t>();
  const int64_t H = x.size(2), W = x.size(3);
  const auto xs = x.strides(), os = out.strides(), as = argmax.strides();

  parallel_for_each_element(out, p.kh * p.kw, [&](int64_t n, int64_t c, int64_t oh, int64_t ow) {
    max_pool2d_forward_element<scalar_t, acc_t, idx_t, int64_t>(
        x_data + n * xs[0] + c * xs[1], H, W, xs[2], xs[3], p, oh, ow,
        out_data + n * os[0] + c * os[1] + oh * os[2] + ow * os[3],
        argmax_data + n * as[0] + c * as[1] + oh * as[2] + ow * as[3]);
  });
}

template <typename scalar_t, typename idx_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& grad_in,
                   const PoolWindow<int64_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go_data = grad_out.const_data_ptr<scalar_t>();
  const idx_t* argmax_data = argmax.const_data_ptr<idx_t>();
  scalar_t* gi_data = grad_in.mutable_data_ptr<scalar_t>();
  const int64_t OH = grad_out.size(2), OW = grad_out.size(3), W = grad_in.size(3);
  const auto gos = grad_out.strides(), as = argmax.strides(), gis = grad_in.strides();

  parallel_for_each_element(grad_in, p.kh * p.kw, [&](int64_t n, int64_t c, int64_t ih, int64_t iw) {
    gi_data[n * gis[0] + c * gis[1] + ih * gis[2] + iw * gis[3]] =
        max_pool2d_backward_element<scalar_t, acc_t, idx_t, int64_t>(
            go_data + n * gos[0] + c * gos[1], gos[2], gos[3], argmax_data + n * as[0] + c * as[1], as[2], as[3],
            OH, OW, W, p, ih, iw);
  });
}

void max_pool2d_out_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& argmax,
                        at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation) {
  const auto p = check_max_pool2d_forward(x, out, argmax, kernel_size, stride, padding, dilation);
  if (out.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ext_max_pool2d_out_cpu", [&] {
    dispatch_argmax_dtype(argmax.scalar_type(), [&](auto idx_tag) {
      forward_impl<scalar_t, decltype(idx_tag)>(x, out, argmax, p);
    });
  });
}

void max_pool2d_backward_out_cpu(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& grad_in,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation) {
  const auto p = check_max_pool2d_backward(grad_out, argmax, grad_in, kernel_size, stride, padding, dilation);
  if (grad_in.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "ext_max_pool2d_backward_out_cpu", [&] {
        dispatch_argmax_dtype(argmax.scalar_type(), [&](auto idx_tag) {
          backward_impl<scalar_t, decltype(idx_tag)>(grad_out, argmax, grad_in, p);
        });
      });
}

}  // namespace
}  // namespace pool
}  // namespace fastseg

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("ext_max_pool2d_out", &fastseg::pool::max_pool2d_out_cpu);
  m.impl("ext_max_pool2d_backward_out", &fastseg::pool::max_pool2d_backward_out_cpu);
}
