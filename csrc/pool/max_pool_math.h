// Max-pool 2d arithmetic shared by the CPU kernels (csrc/pool/cpu) and the CUDA kernels (csrc/pool/cuda).
//
// The CUDA kernels call these functions for every element they produce; the CPU kernels call them on their
// generic paths (any strides; the tests run them through strided outputs) and build their faster paths from
// the same pieces, so the CPU tests also cover the arithmetic the GPU runs. The semantics are
// fastseg/ops/CONTRACT_max_pool.md.
//
// The header is torch-free on purpose: scalar_t is any type that converts to and from acc_t (c10::Half and
// c10::BFloat16 do on host and device), and I is the index type (int32_t when every element offset fits,
// int64_t otherwise; the caller decides).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace fastseg {
namespace pool {

template <typename I>
struct PoolWindow {
  I kh, kw;  // kernel size
  I sh, sw;  // stride
  I ph, pw;  // padding
  I dh, dw;  // dilation
};

// Smallest tap t with start + t * dilation >= 0. PyTorch walks `while (start < 0) start += dilation`; this
// is the same tap in closed form. It is bounded by H/W only below, so in the degenerate case where no tap
// is in bounds it still names the tap PyTorch reports.
template <typename I>
FASTSEG_HOST_DEVICE inline I first_valid_tap(I start, I dilation) {
  return start >= 0 ? I(0) : (-start + dilation - 1) / dilation;
}

// The per-tap update of the running max: a larger value or any NaN replaces it, so NaN propagates (the
// last NaN wins) and ties keep the first maximum, exactly as PyTorch. `val != val` is the NaN test: it
// needs no host/device-specific isnan overload and is exact because fast-math is never enabled.
template <typename acc_t>
FASTSEG_HOST_DEVICE inline bool replaces_max(acc_t val, acc_t running_max) {
  return val > running_max || val != val;
}

// The argmax dtype selects the encoding: int64 stores PyTorch's flat index within the (n, c) plane,
// narrower dtypes store the window offset r * kw + c (the caller checked that kh * kw fits the dtype).
template <typename idx_t>
constexpr bool kPlaneIndices = sizeof(idx_t) == sizeof(int64_t);

template <typename idx_t, typename I>
FASTSEG_HOST_DEVICE inline idx_t encode_argmax(I r, I c, I kw, I ih, I iw, I W) {
  if constexpr (kPlaneIndices<idx_t>) {
    // 64-bit even with 32-bit offsets: a plane of H * W elements may exceed int32 by itself.
    return static_cast<int64_t>(ih) * W + iw;
  } else {
    return static_cast<idx_t>(r * kw + c);
  }
}

// Along one dimension: the output indices [lo, hi] whose windows span input index i, i.e.
// o * stride - pad <= i <= o * stride - pad + (kernel - 1) * dilation, clipped to [0, out_size). Finding
// the range takes two divisions, where testing each of the kernel's taps would take two per tap.
template <typename I>
FASTSEG_HOST_DEVICE inline void windows_spanning(I i, I kernel, I stride, I pad, I dilation, I out_size, I& lo,
                                                 I& hi) {
  const I first = i + pad - (kernel - 1) * dilation;  // lowest o * stride that still reaches i
  lo = first <= 0 ? I(0) : (first + stride - 1) / stride;
  const I last = (i + pad) / stride;  // i + pad >= 0
  hi = last < out_size - 1 ? last : out_size - 1;
}

// The tap index of input i in output o's window (o from windows_spanning), or -1 when i falls between two
// dilated taps. Dilation 1, the common case, needs no division.
template <typename I>
FASTSEG_HOST_DEVICE inline I tap_in_window(I i, I o, I stride, I pad, I dilation) {
  const I offset = i + pad - o * stride;
  if (dilation == 1) {
    return offset;
  }
  return offset % dilation == 0 ? offset / dilation : I(-1);
}

// Forward for output element (oh, ow) of one (n, c) plane. x points at the plane's first element and is
// addressed through its strides; out and argmax point at the element to write.
template <typename scalar_t, typename acc_t, typename idx_t, typename I>
FASTSEG_HOST_DEVICE inline void max_pool2d_forward_element(const scalar_t* x, I H, I W, I x_sh, I x_sw,
                                                           const PoolWindow<I>& p, I oh, I ow,
                                                           scalar_t* out, idx_t* argmax) {
  const I hstart = oh * p.sh - p.ph;
  const I wstart = ow * p.sw - p.pw;
  const I r0 = first_valid_tap(hstart, p.dh);
  const I c0 = first_valid_tap(wstart, p.dw);

  // Compare in acc_t (float for half/bfloat16) but keep the winning element itself, so the stored value
  // is bit-for-bit the input's (NaN payloads included).
  acc_t best = -static_cast<acc_t>(INFINITY);
  scalar_t best_val = static_cast<scalar_t>(best);
  // An all -inf window (or one with no in-bounds tap) points at its first in-bounds tap, like PyTorch.
  idx_t best_idx = encode_argmax<idx_t>(r0, c0, p.kw, hstart + r0 * p.dh, wstart + c0 * p.dw, W);

  // Row-major scan; taps below 0 are skipped by starting at (r0, c0), taps past H/W end the row/window.
  for (I r = r0; r < p.kh; ++r) {
    const I ih = hstart + r * p.dh;
    if (ih >= H) {
      break;
    }
    for (I c = c0; c < p.kw; ++c) {
      const I iw = wstart + c * p.dw;
      if (iw >= W) {
        break;
      }
      const scalar_t v = x[ih * x_sh + iw * x_sw];
      const acc_t a = static_cast<acc_t>(v);
      if (replaces_max(a, best)) {
        best = a;
        best_val = v;
        best_idx = encode_argmax<idx_t>(r, c, p.kw, ih, iw, W);
      }
    }
  }
  *out = best_val;
  *argmax = best_idx;
}

// Backward for input element (ih, iw) of one (n, c) plane, as a gather (no atomics): the sum of grad_out
// over the windows that hold (ih, iw) as tap (r, c) and whose argmax is that tap; 0 when there is none.
// grad_out and argmax point at the plane's first element and are addressed through their strides.
template <typename scalar_t, typename acc_t, typename idx_t, typename I>
FASTSEG_HOST_DEVICE inline scalar_t max_pool2d_backward_element(const scalar_t* grad_out, I go_sh, I go_sw,
                                                                const idx_t* argmax, I am_sh, I am_sw,
                                                                I OH, I OW, I W, const PoolWindow<I>& p,
                                                                I ih, I iw) {
  acc_t sum = acc_t(0);
  I oh_lo, oh_hi, ow_lo, ow_hi;
  windows_spanning(ih, p.kh, p.sh, p.ph, p.dh, OH, oh_lo, oh_hi);
  windows_spanning(iw, p.kw, p.sw, p.pw, p.dw, OW, ow_lo, ow_hi);
  // Ascending (oh, ow) is the order in which PyTorch's scatter adds the gradients, so float32 sums round
  // the same way.
  for (I oh = oh_lo; oh <= oh_hi; ++oh) {
    const I r = tap_in_window(ih, oh, p.sh, p.ph, p.dh);
    if (r < 0) {
      continue;
    }
    for (I ow = ow_lo; ow <= ow_hi; ++ow) {
      const I c = tap_in_window(iw, ow, p.sw, p.pw, p.dw);
      if (c >= 0 && argmax[oh * am_sh + ow * am_sw] == encode_argmax<idx_t>(r, c, p.kw, ih, iw, W)) {
        sum += static_cast<acc_t>(grad_out[oh * go_sh + ow * go_sw]);
      }
    }
  }
  return static_cast<scalar_t>(sum);
}

}  // namespace pool
}  // namespace fastseg
