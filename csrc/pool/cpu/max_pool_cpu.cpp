// CPU kernels of fastseg::ext_max_pool2d_out and fastseg::ext_max_pool2d_backward_out.
//
// The per-element work is the shared math in pool/max_pool_math.h; this file chooses the loop order and
// splits the work across threads with at::parallel_for. Faster paths give the same results as the generic
// per-element ones, which serve other strides (and cover the math the CUDA kernels share): the forward of
// channels-contiguous (channels_last) and of row-contiguous (NCHW) tensors scans each tap across a pixel's
// channels or a row's windows, vectorised (AVX2 where common/cpu_target.h allows); the backward of windows that
// do not overlap gives each input its one window's gradient where the argmax names it; the backward into other
// NCHW or channels_last gradients scatters each output's gradient to its argmax, in the gather's order of sums.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cpu_target.h"
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

// Channels per work item of the channels-contiguous backward scatter: its planes of sums for a block of
// channels stay in cache, and the blocks split across threads.
constexpr int64_t kChannelBlock = 64;

bool channels_contiguous(const at::Tensor& t) {
  return t.stride(1) == 1 && channels_innermost(t);
}

// One tap of the forward's vectorised scans, folded into the running maxima of `count` windows (a row's) or
// channels (a pixel's), by max_pool2d_forward_element's rules: the first tap sets them, as replacing the initial
// -inf would; later ones replace them by replaces_max. Value i of the tap is values[kContiguous ? i : i * step];
// best (acc_t), best_val (the winners' own bits: half types; unused when scalar_t is acc_t) and best_tap (the
// winner's int32 code) hold the state.
template <bool kContiguous, typename scalar_t, typename acc_t>
FASTSEG_ALWAYS_INLINE void scan_tap(const scalar_t* __restrict values, int64_t step, int64_t count, bool first,
                                    int32_t code, acc_t* __restrict best, scalar_t* __restrict best_val,
                                    int32_t* __restrict best_tap) {
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  if (first) {  // a loop of its own: `first || replaces_max(...)` keeps GCC from vectorising the select
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t t = values[kContiguous ? i : i * step];
      best[i] = static_cast<acc_t>(t);
      if constexpr (!same_type) {
        best_val[i] = t;
      }
      best_tap[i] = code;
    }
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t t = values[kContiguous ? i : i * step];
    const acc_t v = static_cast<acc_t>(t);
    const bool take = replaces_max(v, best[i]);
    best[i] = take ? v : best[i];
    if constexpr (!same_type) {
      best_val[i] = take ? t : best_val[i];
    }
    best_tap[i] = take ? code : best_tap[i];
  }
}

// The forward of channels-contiguous x, out and argmax (pixel_rows): per output pixel, each in-bounds tap of the
// window in row-major order updates all the pixel's channels at once (scan_tap), over contiguous memory, so the
// compare and select vectorise (AVX2 where use_avx2()). float and double keep the running maximum in the
// output itself; half types compare in float, in a buffer, and keep the winners' own bits in the output. Each
// channel's best tap is an int32 beside the values' 32-bit lanes (narrower or wider lanes slow the vectorised
// select: int64 plane indices 6x, int8 window offsets 1.3x): the argmax encoding itself for window offsets, and
// for int64 plane indices the tap's offset from the window's origin in the plane (r dh W + c dw: forward_impl
// checks that it fits), added to the origin's plane index once per pixel.
//
// The forward of inputs whose rows are contiguous (NCHW; plane_rows): a row of outputs (n, c, oh) at a time.
// The windows that lie wholly within the row's columns (all but a few at the edges) are scanned tap by tap
// across the row: each tap (r, c), in max_pool2d_forward_element's order, updates every interior window's
// running maximum (scan_tap), a loop over the windows of strided loads that vectorises (AVX2 where
// use_avx2()), with each window's best tap as an int32 code as in the channels-contiguous forward; the edge
// windows call max_pool2d_forward_element itself.
template <typename scalar_t, typename idx_t>
struct Forward {
  const scalar_t* x;
  scalar_t* out;
  idx_t* argmax;
  int64_t C, H, W, OH, OW;
  int64_t xs[4], os[4], as[4];
  PoolWindow<int64_t> p;
  bool channels;          // pixel_rows, else plane_rows
  int64_t ow_lo, ow_end;  // plane_rows' interior windows: ow * sw - pw >= 0 and ow * sw - pw + (kw - 1) * dw < W

  FASTSEG_ALWAYS_INLINE void rows(int64_t begin, int64_t end) const {
    if (channels) {
      pixel_rows(begin, end);
    } else {
      plane_rows(begin, end);
    }
  }

  // channels-contiguous: output rows (n, oh) begin .. end - 1
  FASTSEG_ALWAYS_INLINE void pixel_rows(int64_t begin, int64_t end) const {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> compared(same_type ? 0 : static_cast<size_t>(C));
    std::vector<int32_t> best_tap(static_cast<size_t>(C));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / OH, oh = row % OH;
      const int64_t hstart = oh * p.sh - p.ph, r0 = first_valid_tap(hstart, p.dh);
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t wstart = ow * p.sw - p.pw, c0 = first_valid_tap(wstart, p.dw);
        const scalar_t* x_n = x + n * xs[0];
        scalar_t* __restrict o = out + n * os[0] + oh * os[2] + ow * os[3];
        idx_t* __restrict a = argmax + n * as[0] + oh * as[2] + ow * as[3];
        acc_t* __restrict best = nullptr;
        if constexpr (same_type) {
          best = o;
        } else {
          best = compared.data();
        }
        int32_t* __restrict tap_of = best_tap.data();
        bool first = true;
        for (int64_t r = r0; r < p.kh; ++r) {
          const int64_t ih = hstart + r * p.dh;
          if (ih >= H) {
            break;
          }
          for (int64_t c = c0; c < p.kw; ++c) {
            const int64_t iw = wstart + c * p.dw;
            if (iw >= W) {
              break;
            }
            const scalar_t* __restrict tap = x_n + ih * xs[2] + iw * xs[3];
            const int32_t code = static_cast<int32_t>(
                kPlaneIndices<idx_t> ? r * p.dh * W + c * p.dw : encode_argmax<idx_t>(r, c, p.kw, ih, iw, W));
            scan_tap<true>(tap, 1, C, first, code, best, o, tap_of);
            first = false;
          }
        }
        if (first) {  // no tap in bounds (the argument checks rule it out): what the per-element scan gives
          std::fill(o, o + C, static_cast<scalar_t>(-static_cast<acc_t>(INFINITY)));
          std::fill(a, a + C, encode_argmax<idx_t>(r0, c0, p.kw, hstart + r0 * p.dh, wstart + c0 * p.dw, W));
          continue;
        }
        // The bound in a local: a store through a char-typed argmax may alias the member C, which GCC would
        // then reload after every store (a scalar loop).
        const int64_t channels_here = C;
        const int64_t origin = kPlaneIndices<idx_t> ? hstart * W + wstart : 0;
        for (int64_t j = 0; j < channels_here; ++j) {
          a[j] = static_cast<idx_t>(origin + tap_of[j]);
        }
      }
    }
  }

  // contiguous rows: output rows (n, c, oh) begin .. end - 1
  FASTSEG_ALWAYS_INLINE void plane_rows(int64_t begin, int64_t end) const {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> best_buffer(static_cast<size_t>(OW));
    std::vector<scalar_t> value_buffer(same_type ? 0 : static_cast<size_t>(OW));
    std::vector<int32_t> tap_buffer(static_cast<size_t>(OW));
    acc_t* __restrict best = best_buffer.data();
    scalar_t* __restrict best_val = value_buffer.data();
    int32_t* __restrict best_tap = tap_buffer.data();
    const int64_t sw = p.sw;
    for (int64_t row = begin; row < end; ++row) {  // (n, c, oh)
      const int64_t oh = row % OH, c = (row / OH) % C, n = row / (OH * C);
      const scalar_t* plane = x + n * xs[0] + c * xs[1];
      scalar_t* o = out + n * os[0] + c * os[1] + oh * os[2];
      idx_t* a = argmax + n * as[0] + c * as[1] + oh * as[2];
      const int64_t hstart = oh * p.sh - p.ph;
      const int64_t r0 = first_valid_tap(hstart, p.dh);
      const int64_t r_end = std::min(p.kh, (H - hstart + p.dh - 1) / p.dh);  // rows r0 .. r_end - 1 in 0..H-1
      const int64_t lo = ow_lo, hi = r0 < r_end ? ow_end : ow_lo;  // no row in bounds: every window an edge one
      auto edge = [&](int64_t ow) {  // scalar either way: a lambda (compiled for the baseline) costs nothing
        max_pool2d_forward_element<scalar_t, acc_t, idx_t, int64_t>(plane, H, W, xs[2], int64_t(1), p, oh, ow,
                                                                    o + ow * os[3], a + ow * as[3]);
      };
      for (int64_t ow = 0; ow < lo; ++ow) {
        edge(ow);
      }
      for (int64_t ow = hi; ow < OW; ++ow) {
        edge(ow);
      }
      if (lo >= hi) {
        continue;
      }
      for (int64_t r = r0; r < r_end; ++r) {
        for (int64_t tc = 0; tc < p.kw; ++tc) {
          // the tap of window ow is taps[ow * sw]
          const scalar_t* __restrict taps = plane + (hstart + r * p.dh) * xs[2] + tc * p.dw - p.pw;
          const int32_t code = static_cast<int32_t>(kPlaneIndices<idx_t> ? r * p.dh * W + tc * p.dw : r * p.kw + tc);
          scan_tap<false>(taps + lo * sw, sw, hi - lo, r == r0 && tc == 0, code, best + lo, best_val + lo,
                          best_tap + lo);
        }
      }
      const int64_t origin = kPlaneIndices<idx_t> ? hstart * W - p.pw : 0;  // window ow's origin: origin + ow * sw
      const int64_t o_step = os[3], a_step = as[3];  // locals: a char-typed argmax's stores may alias members
      for (int64_t ow = lo; ow < hi; ++ow) {
        if constexpr (same_type) {
          o[ow * o_step] = best[ow];
        } else {
          o[ow * o_step] = best_val[ow];
        }
        a[ow * a_step] = static_cast<idx_t>(kPlaneIndices<idx_t> ? origin + ow * sw + best_tap[ow] : best_tap[ow]);
      }
    }
  }
};

template <typename scalar_t, typename idx_t>
void forward_vectorised(const at::Tensor& x, const at::Tensor& out, const at::Tensor& argmax,
                        const PoolWindow<int64_t>& p, bool channels) {
  Forward<scalar_t, idx_t> f{x.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(),
                             argmax.mutable_data_ptr<idx_t>(),
                             x.size(1),
                             x.size(2),
                             x.size(3),
                             out.size(2),
                             out.size(3),
                             {},
                             {},
                             {},
                             p,
                             channels,
                             0,
                             0};
  for (int d = 0; d < 4; ++d) {
    f.xs[d] = x.stride(d);
    f.os[d] = out.stride(d);
    f.as[d] = argmax.stride(d);
  }
  f.ow_lo = std::min(f.OW, (p.pw + p.sw - 1) / p.sw);
  const int64_t last_start = f.W - 1 + p.pw - (p.kw - 1) * p.dw;  // the largest ow * sw of an interior window
  f.ow_end = last_start < 0 ? f.ow_lo : std::clamp(last_start / p.sw + 1, f.ow_lo, f.OW);
  // Work items: rows of output pixels (n, oh) or of outputs (n, c, oh): no division per output.
  const int64_t rows = channels ? out.size(0) * f.OH : out.size(0) * f.C * f.OH;
  const int64_t row_taps = (channels ? f.OW * f.C : f.OW) * p.kh * p.kw;
  parallel_rows(f, rows, std::max<int64_t>(1, kTapsPerChunk / std::max<int64_t>(1, row_taps)));
}

template <typename scalar_t, typename idx_t>
void forward_impl(const at::Tensor& x, const at::Tensor& out, const at::Tensor& argmax,
                  const PoolWindow<int64_t>& p) {
  // (the channels-contiguous and row scans keep each tap's code as an int32: a window offset, or for int64
  // plane indices the offset from the window's origin in the plane)
  constexpr int64_t int32_max = std::numeric_limits<int32_t>::max();
  const int64_t largest_code = kPlaneIndices<idx_t> ? (p.kh - 1) * p.dh * x.size(3) + (p.kw - 1) * p.dw
                                                    : p.kh * p.kw;
  const bool channels = channels_contiguous(x) && channels_contiguous(out) && channels_contiguous(argmax);
  if (largest_code <= int32_max && (channels || x.stride(3) == 1)) {
    forward_vectorised<scalar_t, idx_t>(x, out, argmax, p, channels);
    return;
  }
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

// The one window along a dimension that holds input index i when windows do not overlap ((kernel - 1) *
// dilation < stride), as (output index, tap), or tap -1 when none does (i in a gap, in the padding's shadow or
// past the last window).
inline void window_holding(int64_t i, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                           int64_t out_size, int64_t& o, int64_t& tap) {
  o = (i + pad) / stride;  // i + pad >= 0
  tap = o < out_size ? tap_in_window(i, o, stride, pad, dilation) : int64_t(-1);
  if (tap >= kernel) {
    tap = -1;
  }
}

// v where keep, else +0, without a branch (by the bits: a product with 0 would turn inf into NaN).
template <typename scalar_t>
FASTSEG_ALWAYS_INLINE scalar_t masked(scalar_t v, bool keep) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 8, uint64_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "masked: a 2-, 4- or 8-byte value");
  bits_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= static_cast<bits_t>(-static_cast<bits_t>(keep));
  std::memcpy(&v, &bits, sizeof bits);
  return v;
}

// Backward for windows that do not overlap (a 2x2 stride-2 pool): each input pixel lies in at most one window,
// found once per row and (through a table) per column; its gradient is that window's where the argmax names it,
// else 0 (what max_pool2d_backward_element sums over its single window). Channels-contiguous tensors go a pixel
// at a time with the channels innermost (the select vectorises), others a row of grad_in (n, c, ih) at a time
// (the caller checked that grad_in's rows are contiguous).
template <typename scalar_t, typename idx_t>
struct DisjointBackward {
  const scalar_t* grad_out;
  const idx_t* argmax;
  scalar_t* grad_in;
  int64_t C, H, W, OH;
  int64_t gos[4], as[4], gis[4];
  PoolWindow<int64_t> p;
  const int64_t* row_window;     // per input row ih: its window and tap (window_holding; tap -1 for a row in
  const int64_t* row_tap;        // no window)
  const int64_t* column_window;  // per input column iw: its window and tap (window_holding; window 0 and tap
  const int64_t* column_tap;     // -1 for a column in no window)
  bool channels;                 // rows are (n, ih) with channels innermost, else (n, c, ih)
  // NCHW rows of 2-wide, stride-2 windows (undilated) with contiguous grad_out and argmax rows: the windows
  // [pair_windows_begin, pair_windows_end) lie wholly inside the input's columns (an empty range otherwise)
  int64_t pair_windows_begin, pair_windows_end;

  FASTSEG_ALWAYS_INLINE void rows(int64_t begin, int64_t end) const {
    if (channels) {
      pixel_rows(begin, end);
    } else {
      plane_rows(begin, end);
    }
  }

  // The rows' coordinates are counted up from the first's, and each input row's window comes from a table: a
  // division per row costs as much as a short row's work.
  FASTSEG_ALWAYS_INLINE void pixel_rows(int64_t begin, int64_t end) const {
    int64_t ih = begin % H, n = begin / H;
    for (int64_t row = begin; row < end; ++row) {
      pixel_row(n, ih);
      if (++ih == H) {
        ih = 0;
        ++n;
      }
    }
  }

  FASTSEG_ALWAYS_INLINE void pixel_row(int64_t n, int64_t ih) const {
    const int64_t oh = row_window[ih], r = row_tap[ih];
    for (int64_t iw = 0; iw < W; ++iw) {
      // restrict: an int8 argmax is a char type, which may alias anything, and would keep the loop scalar
      scalar_t* __restrict gi = grad_in + n * gis[0] + ih * gis[2] + iw * gis[3];
      const int64_t ow = column_window[iw], c = column_tap[iw];
      if (r < 0 || c < 0) {
        std::fill(gi, gi + C, scalar_t(0));
        continue;
      }
      const scalar_t* __restrict go = grad_out + n * gos[0] + oh * gos[2] + ow * gos[3];
      const idx_t* __restrict a = argmax + n * as[0] + oh * as[2] + ow * as[3];
      const idx_t code = encode_argmax<idx_t>(r, c, p.kw, ih, iw, W);
      for (int64_t j = 0; j < C; ++j) {
        const scalar_t g = go[j];  // loaded either way: a select, not a branch, so the loop vectorises
        gi[j] = a[j] == code ? g : scalar_t(0);
      }
    }
  }

  FASTSEG_ALWAYS_INLINE void plane_rows(int64_t begin, int64_t end) const {
    int64_t ih = begin % H, c = (begin / H) % C, n = begin / (H * C);
    for (int64_t row = begin; row < end; ++row) {
      plane_row(n, c, ih);
      if (++ih == H) {
        ih = 0;
        if (++c == C) {
          c = 0;
          ++n;
        }
      }
    }
  }

  FASTSEG_ALWAYS_INLINE void plane_row(int64_t n, int64_t c, int64_t ih) const {
    scalar_t* __restrict gi = grad_in + n * gis[0] + c * gis[1] + ih * gis[2];
    const int64_t oh = row_window[ih], r = row_tap[ih];
    if (r < 0) {
      std::fill(gi, gi + W, scalar_t(0));
      return;
    }
    const scalar_t* __restrict go = grad_out + n * gos[0] + c * gos[1] + oh * gos[2];
    const idx_t* __restrict a = argmax + n * as[0] + c * as[1] + oh * as[2];
    if (pair_windows_end <= pair_windows_begin) {
      plane_columns(go, a, gi, ih, r, 0, W);
      return;
    }
    // 2-wide windows side by side: each window's pair of columns from its one gradient and code, in a loop
    // over the windows that vectorises (interleaved stores); the columns outside these windows one by one.
    const int64_t begin = 2 * pair_windows_begin - p.pw, end = 2 * pair_windows_end - p.pw;
    plane_columns(go, a, gi, ih, r, 0, begin);
    const idx_t first = encode_argmax<idx_t>(r, int64_t(0), int64_t(2), ih, begin, W);
    const idx_t second = encode_argmax<idx_t>(r, int64_t(1), int64_t(2), ih, begin + 1, W);
    const scalar_t* __restrict go_pairs = go + pair_windows_begin;
    const idx_t* __restrict a_pairs = a + pair_windows_begin;
    scalar_t* __restrict gi_pairs = gi + begin;
    // simdlen(8): eight windows a vector step. Left to itself GCC sizes the step by the narrowest type, 32 int8
    // codes, and a row of fewer windows (U-Net's and SegNet's deeper rows) would run wholly scalar.
#pragma omp simd simdlen(8)
    for (int64_t k = 0; k < pair_windows_end - pair_windows_begin; ++k) {
      // plane indices grow by 2 a window; window offsets name the same taps in every window
      const idx_t step = kPlaneIndices<idx_t> ? static_cast<idx_t>(2 * k) : idx_t(0);
      const scalar_t g = go_pairs[k];
      const idx_t code = a_pairs[k];
      gi_pairs[2 * k] = code == first + step ? g : scalar_t(0);
      gi_pairs[2 * k + 1] = code == second + step ? g : scalar_t(0);
    }
    plane_columns(go, a, gi, ih, r, end, W);
  }

  // Columns [begin, end) of input row ih (tap row r of its window), one at a time.
  FASTSEG_ALWAYS_INLINE void plane_columns(const scalar_t* __restrict go, const idx_t* __restrict a,
                                           scalar_t* __restrict gi, int64_t ih, int64_t r, int64_t begin,
                                           int64_t end) const {
    for (int64_t iw = begin; iw < end; ++iw) {
      // Loads and compares either way (a column in no window has window 0) and masks the bits: GCC turns
      // `named ? g : 0` into a branch here, which random argmaxes mispredict half the time.
      const int64_t ow = column_window[iw], tc = column_tap[iw];
      const bool named = (tc >= 0) & (a[ow * as[3]] == encode_argmax<idx_t>(r, tc, p.kw, ih, iw, W));
      gi[iw] = masked(go[ow * gos[3]], named);
    }
  }
};

template <typename scalar_t, typename idx_t>
void backward_disjoint_windows(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& grad_in,
                               const PoolWindow<int64_t>& p, bool channels) {
  const int64_t N = grad_in.size(0), C = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  const int64_t OW = grad_out.size(3);
  std::vector<int64_t> row_window(static_cast<size_t>(H)), row_tap(static_cast<size_t>(H));
  for (int64_t ih = 0; ih < H; ++ih) {
    window_holding(ih, p.kh, p.sh, p.ph, p.dh, grad_out.size(2), row_window[ih], row_tap[ih]);
  }
  std::vector<int64_t> column_window(static_cast<size_t>(W)), column_tap(static_cast<size_t>(W));
  for (int64_t iw = 0; iw < W; ++iw) {
    window_holding(iw, p.kw, p.sw, p.pw, p.dw, OW, column_window[iw], column_tap[iw]);
    if (column_tap[iw] < 0) {
      column_window[iw] = 0;  // a window that exists (its tap -1 marks the column as in none)
    }
  }
  DisjointBackward<scalar_t, idx_t> k{grad_out.const_data_ptr<scalar_t>(),
                                      argmax.const_data_ptr<idx_t>(),
                                      grad_in.mutable_data_ptr<scalar_t>(),
                                      C,
                                      H,
                                      W,
                                      grad_out.size(2),
                                      {},
                                      {},
                                      {},
                                      p,
                                      row_window.data(),
                                      row_tap.data(),
                                      column_window.data(),
                                      column_tap.data(),
                                      channels,
                                      0,
                                      0};
  if (!channels && p.kw == 2 && p.sw == 2 && p.dw == 1 && grad_out.stride(3) == 1 && argmax.stride(3) == 1) {
    k.pair_windows_begin = (p.pw + 1) / 2;                         // the first whose left column is >= 0
    k.pair_windows_end = std::min<int64_t>(OW, (W + p.pw) / 2);  // past the last whose right column is < W
  }
  for (int d = 0; d < 4; ++d) {
    k.gos[d] = grad_out.stride(d);
    k.as[d] = argmax.stride(d);
    k.gis[d] = grad_in.stride(d);
  }
  const int64_t rows = channels ? N * H : N * C * H, row_size = channels ? W * C : W;
  parallel_rows(k, rows, std::max<int64_t>(1, kTapsPerChunk / std::max<int64_t>(1, row_size)));
}

// The input positions that argmax codes name, for the backward scatter: window offsets through a table of each
// tap's displacement from its window's origin (no division per element), plane indices by a division. A view
// (trivially copyable: the scatter keeps a copy in registers) of tables that `storage` owns.
template <typename idx_t>
class ArgmaxDecoder {
 public:
  ArgmaxDecoder(const PoolWindow<int64_t>& p, int64_t H, int64_t W, std::vector<int64_t>& storage)
      : p_(p), H_(H), W_(W) {
    if constexpr (!kPlaneIndices<idx_t>) {
      taps_ = p.kh * p.kw;
      storage.resize(static_cast<size_t>(2 * taps_));
      for (int64_t r = 0; r < p.kh; ++r) {
        for (int64_t c = 0; c < p.kw; ++c) {
          storage[r * p.kw + c] = r * p.dh;
          storage[taps_ + r * p.kw + c] = c * p.dw;
        }
      }
      tap_row_ = storage.data();
      tap_col_ = storage.data() + taps_;
    }
  }

  // The input position (ih, iw) that the argmax code of output (oh, ow), whose window's origin is (row0, col0) =
  // (oh sh - ph, ow sw - pw), names; false when it names no in-bounds tap of that window (only a malformed argmax
  // does; the gather of max_pool2d_backward_element ignores it too).
  FASTSEG_ALWAYS_INLINE bool position(idx_t code, int64_t oh, int64_t ow, int64_t row0, int64_t col0, int64_t& ih,
                                      int64_t& iw) const {
    if constexpr (kPlaneIndices<idx_t>) {
      if (code < 0 || code >= H_ * W_) {
        return false;
      }
      ih = code / W_;
      iw = code - ih * W_;
      const int64_t r = tap_in_window(ih, oh, p_.sh, p_.ph, p_.dh), c = tap_in_window(iw, ow, p_.sw, p_.pw, p_.dw);
      return r >= 0 && r < p_.kh && c >= 0 && c < p_.kw;
    } else {
      // unsigned compares: a negative value wraps past the bound
      const int64_t tap = static_cast<int64_t>(code);
      if (static_cast<uint64_t>(tap) >= static_cast<uint64_t>(taps_)) {
        return false;
      }
      ih = row0 + tap_row_[tap];
      iw = col0 + tap_col_[tap];
      return static_cast<uint64_t>(ih) < static_cast<uint64_t>(H_) &&
             static_cast<uint64_t>(iw) < static_cast<uint64_t>(W_);
    }
  }

  // Window offsets only. interior: whether every tap of the window whose origin is (row0, col0) lies in the input
  // (then its codes need no bounds checks); tap_displacements: each tap's displacement from the origin in an array
  // of row_step per row and step per column (into `out`, an entry a tap).
  FASTSEG_ALWAYS_INLINE bool interior(int64_t row0, int64_t col0) const {
    return row0 >= 0 && row0 + (p_.kh - 1) * p_.dh < H_ && col0 >= 0 && col0 + (p_.kw - 1) * p_.dw < W_;
  }
  int64_t taps() const { return taps_; }
  void tap_displacements(int64_t row_step, int64_t step, int64_t* out) const {
    for (int64_t t = 0; t < taps_; ++t) {
      out[t] = tap_row_[t] * row_step + tap_col_[t] * step;
    }
  }

 private:
  PoolWindow<int64_t> p_;
  int64_t H_, W_;
  int64_t taps_ = 0;
  const int64_t* tap_row_ = nullptr;
  const int64_t* tap_col_ = nullptr;
};

// Backward by scatter, for a grad_in with contiguous rows (NCHW) or channels (channels_last): each input
// gradient starts at 0 and every output's gradient is added at the input its argmax names, the outputs in
// ascending (oh, ow): for each input, the sum of max_pool2d_backward_element in the same order (PyTorch's), in
// acc_t (half types sum in a float buffer, rounded once), without its search of the windows that may hold each
// input. NCHW goes a plane (n, c) at a time, channels_last a block of channels of one image at a time.
template <typename scalar_t, typename idx_t>
void backward_scatter(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& grad_in,
                      const PoolWindow<int64_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool in_place = std::is_same_v<scalar_t, acc_t>;  // else a float buffer
  const scalar_t* go_data = grad_out.const_data_ptr<scalar_t>();
  const idx_t* argmax_data = argmax.const_data_ptr<idx_t>();
  scalar_t* gi_data = grad_in.mutable_data_ptr<scalar_t>();
  const int64_t N = grad_in.size(0), C = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  const int64_t OH = grad_out.size(2), OW = grad_out.size(3);
  const auto gos = grad_out.strides(), as = argmax.strides(), gis = grad_in.strides();
  const bool channels = channels_contiguous(grad_in);
  std::vector<int64_t> decoder_tables;
  const ArgmaxDecoder<idx_t> decoder(p, H, W, decoder_tables);
  // Work items: planes (n, c), or (n, block of channels).
  const int64_t lanes = channels ? kChannelBlock : 1;
  const int64_t blocks = (C + lanes - 1) / lanes;
  const int64_t grain = std::max<int64_t>(1, kTapsPerChunk / std::max<int64_t>(1, lanes * (H * W + OH * OW)));
  at::parallel_for(0, N * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(in_place ? 0 : static_cast<size_t>(H * W * lanes));
    std::vector<int64_t> displacement(static_cast<size_t>(decoder.taps()));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * lanes, cn = std::min(lanes, C - c0);
      scalar_t* gi = gi_data + n * gis[0] + c0 * gis[1];
      // sums[ih * row_step + iw * step + j]: the gradient of channel c0 + j at (ih, iw): grad_in itself
      // (its channels, if several, are contiguous), or the buffer
      acc_t* sums = buffer.data();
      if constexpr (in_place) {
        sums = gi;
      }
      const int64_t row_step = in_place ? gis[2] : W * cn, step = in_place ? gis[3] : cn;
      for (int64_t ih = 0; ih < H; ++ih) {
        if (step == cn) {  // the row's pixels adjacent: one fill (a fill per pixel costs a memset call each)
          std::fill(sums + ih * row_step, sums + ih * row_step + W * cn, acc_t(0));
          continue;
        }
        for (int64_t iw = 0; iw < W; ++iw) {
          std::fill(sums + ih * row_step + iw * step, sums + ih * row_step + iw * step + cn, acc_t(0));
        }
      }
      // Locals, not the decoder and stride arrays themselves: the stores into sums could alias them as far as
      // the compiler knows (an int8 argmax is a char type), which would reload them for every element.
      const ArgmaxDecoder<idx_t> dec = decoder;
      const int64_t go_sc = gos[1], go_sh = gos[2], go_sw = gos[3];
      const int64_t a_sc = as[1], a_sh = as[2], a_sw = as[3];
      const int64_t sh = p.sh, sw = p.sw, ph = p.ph, pw = p.pw;
      const scalar_t* go_item = go_data + n * gos[0] + c0 * go_sc;
      const idx_t* a_item = argmax_data + n * as[0] + c0 * a_sc;
      if (cn == 1) {  // NCHW: a plane, no channel loop
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t row0 = oh * sh - ph;
          for (int64_t ow = 0; ow < OW; ++ow) {
            int64_t ih, iw;
            if (dec.position(a_item[oh * a_sh + ow * a_sw], oh, ow, row0, ow * sw - pw, ih, iw)) {
              sums[ih * row_step + iw * step] += static_cast<acc_t>(go_item[oh * go_sh + ow * go_sw]);
            }
          }
        }
      } else {
        dec.tap_displacements(row_step, step, displacement.data());
        const int64_t* __restrict tap_displacement = displacement.data();
        const uint64_t taps = static_cast<uint64_t>(dec.taps());
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t row0 = oh * sh - ph;
          for (int64_t ow = 0; ow < OW; ++ow) {
            const scalar_t* go = go_item + oh * go_sh + ow * go_sw;
            const idx_t* a = a_item + oh * a_sh + ow * a_sw;
            const int64_t col0 = ow * sw - pw;
            if constexpr (!kPlaneIndices<idx_t>) {
              // In a window wholly inside the input a window offset is its tap's displacement from the origin,
              // and the channel loop needs no bounds checks (1.5x faster).
              if (dec.interior(row0, col0)) {
                acc_t* origin = sums + row0 * row_step + col0 * step;
                for (int64_t j = 0; j < cn; ++j) {
                  const int64_t code = static_cast<int64_t>(a[j * a_sc]);
                  if (static_cast<uint64_t>(code) < taps) {  // a negative code wraps past the bound
                    origin[tap_displacement[code] + j] += static_cast<acc_t>(go[j * go_sc]);
                  }
                }
                continue;
              }
            }
            for (int64_t j = 0; j < cn; ++j) {
              int64_t ih, iw;
              if (dec.position(a[j * a_sc], oh, ow, row0, col0, ih, iw)) {
                sums[ih * row_step + iw * step + j] += static_cast<acc_t>(go[j * go_sc]);
              }
            }
          }
        }
      }
      if constexpr (!in_place) {
        for (int64_t ih = 0; ih < H; ++ih) {
          for (int64_t iw = 0; iw < W; ++iw) {
            scalar_t* g = gi + ih * gis[2] + iw * gis[3];
            const acc_t* sum = buffer.data() + (ih * W + iw) * cn;
            for (int64_t j = 0; j < cn; ++j) {
              g[j * gis[1]] = static_cast<scalar_t>(sum[j]);
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename idx_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& grad_in,
                   const PoolWindow<int64_t>& p) {
  const bool disjoint = (p.kh - 1) * p.dh < p.sh && (p.kw - 1) * p.dw < p.sw;
  const bool channels = channels_contiguous(grad_out) && channels_contiguous(argmax) && channels_contiguous(grad_in);
  if (disjoint && (channels || grad_in.stride(3) == 1)) {
    backward_disjoint_windows<scalar_t, idx_t>(grad_out, argmax, grad_in, p, channels);
    return;
  }
  if (channels_contiguous(grad_in) || grad_in.stride(3) == 1) {
    backward_scatter<scalar_t, idx_t>(grad_out, argmax, grad_in, p);
    return;
  }
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
