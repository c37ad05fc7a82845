// CPU kernel of fastseg::ext_crf_update: one dense-CRF mean-field update in a single pass over [B, N, L].
//
// For every point (row of L labels, labels innermost):
//   tmp = logits + sum_{k Potts} m_k - sum_{k matrix} M_k m_k ;   Q = softmax(tmp)
// where m_k are the already normalised, weighted filtered messages of kernel k (fastseg/ops/crf.py folds the
// symmetric normalisation and the Potts weights into the lattice tables). This replaces the addcmul / matmul
// / softmax passes of the plain-PyTorch loop (which stays the differentiable path).
//
// float32 uses a branch-free Cephes-style exp (about 1 ulp) that the compiler vectorises; float64 uses std::exp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastseg {
namespace crf {
namespace {

// exp(x) for x <= 0 (callers subtract the row maximum), 4 lanes at a time in GCC/Clang vector types (16 bytes: SSE2 / NEON registers) (which
// the compiler maps onto whatever SIMD the target has): Cephes expf's range reduction and polynomial (about
// 1 ulp); arguments below -87.3 give exp(-87.3) (~1e-38), far below softmax's resolution; NaN stays NaN.
typedef float vfloat4 __attribute__((vector_size(16)));
typedef int32_t vint4 __attribute__((vector_size(16)));

__attribute__((always_inline)) inline vfloat4 exp_nonpositive(vfloat4 x) {
  x = x < -87.3f ? vfloat4{} - 87.3f : x;
  x = x > 0.0f ? vfloat4{} : x;
  // n = round(x / ln 2): for x <= 0, truncating x / ln 2 - 0.5 towards 0 rounds to nearest
  const vint4 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vint4);
  const vfloat4 fn = __builtin_convertvector(n, vfloat4);
  vfloat4 r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const vfloat4 r2 = r * r;
  vfloat4 y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const vint4 bits = (n + 127) << 23;
  return y * (vfloat4)bits;  // a vector cast reinterprets the bits
}

// v[i] = exp(v[i]) for n values, all <= 0.
inline void exp_inplace(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    vfloat4 x, y;
    std::memcpy(&x, v + i, sizeof(x));
    std::memcpy(&y, v + i + 4, sizeof(y));
    x = exp_nonpositive(x);
    y = exp_nonpositive(y);
    std::memcpy(v + i, &x, sizeof(x));
    std::memcpy(v + i + 4, &y, sizeof(y));
  }
  for (; i + 4 <= n; i += 4) {
    vfloat4 x;
    std::memcpy(&x, v + i, sizeof(x));
    x = exp_nonpositive(x);
    std::memcpy(v + i, &x, sizeof(x));
  }
  if (i < n) {
    vfloat4 x{};
    std::memcpy(&x, v + i, (n - i) * sizeof(float));
    x = exp_nonpositive(x);
    std::memcpy(v + i, &x, (n - i) * sizeof(float));
  }
}

inline void exp_inplace(double* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    v[i] = std::exp(v[i]);
  }
}

struct Message {
  const void* data;
  int64_t sb, sn;          // strides of batch and point (labels have stride 1)
  const void* compat;      // [L, L] contiguous, or nullptr for an already weighted Potts message
};

// Row maximum and sum with four independent chains (a single chain of dependent max/add instructions is
// latency-bound; the compiler may not reassociate floating-point reductions itself).
template <typename T>
inline T row_max(const T* v, int64_t L) {
  T m0 = v[0], m1 = v[0], m2 = v[0], m3 = v[0];
  int64_t l = 0;
  for (; l + 4 <= L; l += 4) {
    m0 = std::max(m0, v[l]);
    m1 = std::max(m1, v[l + 1]);
    m2 = std::max(m2, v[l + 2]);
    m3 = std::max(m3, v[l + 3]);
  }
  for (; l < L; ++l) {
    m0 = std::max(m0, v[l]);
  }
  return std::max(std::max(m0, m1), std::max(m2, m3));
}

template <typename T>
inline T row_sum(const T* v, int64_t L) {
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
  int64_t l = 0;
  for (; l + 4 <= L; l += 4) {
    s0 += v[l];
    s1 += v[l + 1];
    s2 += v[l + 2];
    s3 += v[l + 3];
  }
  for (; l < L; ++l) {
    s0 += v[l];
  }
  return (s0 + s1) + (s2 + s3);
}

// Rows per tile: the tile's [rows, L] block is exponentiated as one flat run.
constexpr int64_t kRowTile = 64;

template <typename T>
void update_impl(const at::Tensor& logits, const std::vector<Message>& msgs, const at::Tensor& out) {
  const int64_t B = logits.size(0), N = logits.size(1), L = logits.size(2);
  const T* lg = logits.const_data_ptr<T>();
  const int64_t lsb = logits.stride(0), lsn = logits.stride(1);
  T* o = out.mutable_data_ptr<T>();  // contiguous [B, N, L]
  const int64_t rows = B * N;
  const int64_t tiles = (rows + kRowTile - 1) / kRowTile;
  const int64_t grain = std::max<int64_t>(1, 32768 / (kRowTile * L * (2 + int64_t(msgs.size()))));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> tmp(static_cast<size_t>(L));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * kRowTile, r1 = std::min(rows, r0 + kRowTile);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / N, n = r - b * N;
        const T* __restrict u = lg + b * lsb + n * lsn;
        T* __restrict acc = o + r * L;
        for (int64_t l = 0; l < L; ++l) {
          acc[l] = u[l];
        }
        for (const Message& m : msgs) {
          const T* __restrict x = static_cast<const T*>(m.data) + b * m.sb + n * m.sn;
          if (m.compat == nullptr) {
            for (int64_t l = 0; l < L; ++l) {
              acc[l] += x[l];
            }
          } else {
            const T* __restrict M = static_cast<const T*>(m.compat);
            for (int64_t l = 0; l < L; ++l) {
              T s = T(0);
              const T* __restrict row = M + l * L;
#pragma omp simd reduction(+ : s)
              for (int64_t j = 0; j < L; ++j) {
                s += row[j] * x[j];
              }
              tmp[l] = s;
            }
            for (int64_t l = 0; l < L; ++l) {
              acc[l] -= tmp[l];
            }
          }
        }
        const T mx = row_max(acc, L);
        for (int64_t l = 0; l < L; ++l) {
          acc[l] -= mx;
        }
      }
      exp_inplace(o + r0 * L, (r1 - r0) * L);
      for (int64_t r = r0; r < r1; ++r) {
        T* __restrict acc = o + r * L;
        const T inv = T(1) / row_sum(acc, L);
        for (int64_t l = 0; l < L; ++l) {
          acc[l] *= inv;
        }
      }
    }
  });
}

at::Tensor crf_update_cpu(const at::Tensor& logits, at::TensorList messages,
                          const c10::List<std::optional<at::Tensor>>& compat) {
  TORCH_CHECK(logits.dim() == 3, "crf_update: logits must be [B, N, L], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "crf_update: logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(logits.device().is_cpu(), "crf_update: logits must be on the CPU");
  TORCH_CHECK(compat.size() == messages.size(), "crf_update: ", messages.size(), " messages but ", compat.size(),
              " compatibilities");
  const int64_t L = logits.size(2);
  TORCH_CHECK(L >= 1, "crf_update: need at least one label");
  const at::Tensor lg = logits.stride(2) == 1 ? logits : logits.contiguous();
  std::vector<at::Tensor> keep;  // owns contiguous copies
  std::vector<Message> msgs;
  for (size_t k = 0; k < messages.size(); ++k) {
    const at::Tensor& m = messages[k];
    TORCH_CHECK(m.sizes() == logits.sizes(), "crf_update: message ", k, " has shape ", m.sizes(),
                ", the logits ", logits.sizes());
    TORCH_CHECK(m.scalar_type() == logits.scalar_type() && m.device() == logits.device(),
                "crf_update: message ", k, " must have the logits' dtype and device");
    at::Tensor mm = m.stride(2) == 1 ? m : m.contiguous();
    keep.push_back(mm);
    Message msg{mm.const_data_ptr(), mm.stride(0), mm.stride(1), nullptr};
    const std::optional<at::Tensor> c = compat.get(k);
    if (c.has_value() && c->defined()) {
      TORCH_CHECK(c->dim() == 2 && c->size(0) == L && c->size(1) == L, "crf_update: compat ", k,
                  " must be [L, L] = [", L, ", ", L, "], got ", c->sizes());
      TORCH_CHECK(c->scalar_type() == logits.scalar_type() && c->device() == logits.device(),
                  "crf_update: compat ", k, " must have the logits' dtype and device");
      at::Tensor cc = c->contiguous();
      keep.push_back(cc);
      msg.compat = cc.const_data_ptr();
    }
    msgs.push_back(msg);
  }
  at::Tensor out = at::empty({logits.size(0), logits.size(1), L}, logits.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "ext_crf_update_cpu",
                               [&] { update_impl<scalar_t>(lg, msgs, out); });
  }
  return out;
}

}  // namespace
}  // namespace crf
}  // namespace fastseg

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("ext_crf_update", &fastseg::crf::crf_update_cpu);
}
