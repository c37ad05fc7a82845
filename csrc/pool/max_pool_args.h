// Host-side argument checks and dtype dispatch shared by the CPU and CUDA max-pool ops.
//
// The Python wrapper (fastseg/ops/max_pool.py) already validates and allocates; these checks exist because
// the ops are also reachable directly through torch.ops.fastseg, where a wrong shape or dtype would
// otherwise read or write out of bounds.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <limits>

#include "pool/max_pool_math.h"

namespace fastseg {
namespace pool {

// Output size along one dimension, PyTorch's pooling_output_shape (floor or ceil mode).
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t num = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  // Division rounding towards -inf, as PyTorch's div_rtn: num is negative for inputs smaller than the window.
  int64_t out = num / s;
  if (num % s != 0 && num < 0) {
    --out;
  }
  ++out;
  // In ceil mode the last window must start inside the input or the left padding.
  if (ceil_mode && (out - 1) * s >= in + p) {
    --out;
  }
  return out;
}

inline PoolWindow<int64_t> check_window(const char* op, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                        c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation must have 2 elements each, got ", kernel_size, ", ",
              stride, ", ", padding, ", ", dilation);
  const PoolWindow<int64_t> p{kernel_size[0], kernel_size[1], stride[0], stride[1],
                              padding[0],     padding[1],     dilation[0], dilation[1]};
  TORCH_CHECK(p.kh > 0 && p.kw > 0, op, ": kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK(p.sh > 0 && p.sw > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(p.dh > 0 && p.dw > 0, op, ": dilation must be positive, got ", dilation);
  // PyTorch's bound; it also keeps the first in-bounds tap inside the window, so its offset fits argmax.
  TORCH_CHECK(p.ph >= 0 && p.pw >= 0 && p.ph <= ((p.kh - 1) * p.dh + 1) / 2 &&
                  p.pw <= ((p.kw - 1) * p.dw + 1) / 2,
              op, ": padding must be non-negative and at most half the effective kernel size, got padding ",
              padding, " for kernel_size ", kernel_size, " and dilation ", dilation);
  return p;
}

// The output extent must be the floor- or ceil-mode size for the input extent.
inline void check_output_extent(const char* op, const char* dim, int64_t in, int64_t out, int64_t k, int64_t s,
                                int64_t p, int64_t d) {
  const int64_t floor_size = pooled_size(in, k, s, p, d, false);
  const int64_t ceil_size = pooled_size(in, k, s, p, d, true);
  TORCH_CHECK(out == floor_size || out == ceil_size, op, ": output ", dim, " is ", out, " but an input ", dim,
              " of ", in, " pools to ", floor_size, " (or ", ceil_size, " in ceil mode)");
}

inline void check_4d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", st);
}

// int64 holds plane indices; int8/int16/int32 hold window offsets in [0, kh * kw).
inline void check_argmax_dtype(const char* op, const at::Tensor& argmax, const PoolWindow<int64_t>& p) {
  const auto st = argmax.scalar_type();
  int64_t max_offset = 0;
  switch (st) {
    case at::kLong:
      return;
    case at::kChar:
      max_offset = std::numeric_limits<int8_t>::max();
      break;
    case at::kShort:
      max_offset = std::numeric_limits<int16_t>::max();
      break;
    case at::kInt:
      max_offset = std::numeric_limits<int32_t>::max();
      break;
    default:
      TORCH_CHECK(false, op, ": argmax must be int8, int16, int32 (window offsets) or int64 (plane indices), got ",
                  st);
  }
  TORCH_CHECK(p.kh * p.kw - 1 <= max_offset, op, ": a ", p.kh, "x", p.kw, " window has offsets up to ",
              p.kh * p.kw - 1, ", which do not fit argmax's dtype ", st);
}

inline void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                              const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

// The kernels write every element of `written` from elements of `read`: they must not share memory, and a
// written tensor must not alias itself (expanded dims would make threads race on one element).
inline void check_no_overlap(const at::Tensor& written, std::initializer_list<const at::Tensor*> read) {
  at::assert_no_internal_overlap(written);
  for (const at::Tensor* r : read) {
    at::assert_no_overlap(written, *r);
  }
}

inline PoolWindow<int64_t> check_max_pool2d_forward(const at::Tensor& x, const at::Tensor& out,
                                                    const at::Tensor& argmax, c10::IntArrayRef kernel_size,
                                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                    c10::IntArrayRef dilation) {
  constexpr const char* op = "fastseg::ext_max_pool2d_out";
  const auto p = check_window(op, kernel_size, stride, padding, dilation);
  check_4d(op, "x", x);
  check_4d(op, "out", out);
  check_4d(op, "argmax", argmax);
  check_same_device(op, x, "x", out, "out");
  check_same_device(op, x, "x", argmax, "argmax");
  check_floating(op, "x", x);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  check_argmax_dtype(op, argmax, p);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1), op, ": out must have x's N and C ",
              x.sizes().slice(0, 2), ", got shape ", out.sizes());
  TORCH_CHECK(argmax.sizes() == out.sizes(), op, ": argmax must have out's shape ", out.sizes(), ", got ",
              argmax.sizes());
  check_output_extent(op, "height", x.size(2), out.size(2), p.kh, p.sh, p.ph, p.dh);
  check_output_extent(op, "width", x.size(3), out.size(3), p.kw, p.sw, p.pw, p.dw);
  check_no_overlap(out, {&x, &argmax});
  check_no_overlap(argmax, {&x});
  return p;
}

inline PoolWindow<int64_t> check_max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& argmax,
                                                     const at::Tensor& grad_in, c10::IntArrayRef kernel_size,
                                                     c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                     c10::IntArrayRef dilation) {
  constexpr const char* op = "fastseg::ext_max_pool2d_backward_out";
  const auto p = check_window(op, kernel_size, stride, padding, dilation);
  check_4d(op, "grad_out", grad_out);
  check_4d(op, "argmax", argmax);
  check_4d(op, "grad_in", grad_in);
  check_same_device(op, grad_out, "grad_out", argmax, "argmax");
  check_same_device(op, grad_out, "grad_out", grad_in, "grad_in");
  check_floating(op, "grad_out", grad_out);
  TORCH_CHECK(grad_in.scalar_type() == grad_out.scalar_type(), op, ": grad_in must have grad_out's dtype ",
              grad_out.scalar_type(), ", got ", grad_in.scalar_type());
  check_argmax_dtype(op, argmax, p);
  TORCH_CHECK(argmax.sizes() == grad_out.sizes(), op, ": argmax must have grad_out's shape ", grad_out.sizes(),
              ", got ", argmax.sizes());
  TORCH_CHECK(grad_in.size(0) == grad_out.size(0) && grad_in.size(1) == grad_out.size(1), op,
              ": grad_in must have grad_out's N and C ", grad_out.sizes().slice(0, 2), ", got shape ",
              grad_in.sizes());
  check_output_extent(op, "height", grad_in.size(2), grad_out.size(2), p.kh, p.sh, p.ph, p.dh);
  check_output_extent(op, "width", grad_in.size(3), grad_out.size(3), p.kw, p.sw, p.pw, p.dw);
  check_no_overlap(grad_in, {&grad_out, &argmax});
  return p;
}

// Calls f(idx_t{}) with the C++ type of argmax's dtype (checked by check_argmax_dtype). A generic lambda
// instead of AT_DISPATCH keeps the floating dispatch's scalar_t visible inside.
template <typename F>
void dispatch_argmax_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kChar:
      f(int8_t{});
      break;
    case at::kShort:
      f(int16_t{});
      break;
    case at::kInt:
      f(int32_t{});
      break;
    case at::kLong:
      f(int64_t{});
      break;
    default:
      TORCH_CHECK(false, "fastseg: unsupported argmax dtype ", st);
  }
}

// Whether t's channels are its innermost dimension in memory (channels_last). Kernels then walk C
// innermost so that neighbouring work items touch neighbouring memory; results do not depend on it.
inline bool channels_innermost(const at::Tensor& t) {
  return t.stride(1) < t.stride(3);
}

}  // namespace pool
}  // namespace fastseg
