// FASTSEG_HOST_DEVICE: marks the inline math shared by the CPU kernels and the CUDA kernels.
#pragma once

#include <type_traits>

#if defined(__CUDACC__)
#define FASTSEG_HOST_DEVICE __host__ __device__
#else
#define FASTSEG_HOST_DEVICE
#endif

namespace fastseg {

// a * b rounded on its own (T float or double). nvcc (ptxas) fuses a product into the addition that follows it
// (one FMA, one rounding) unless the product comes from __dmul_rn / __fmul_rn; the CPU build never fuses
// (baseline x86-64 has no FMA). Shared math whose result feeds a discrete choice (the lattice's simplex of a
// point) multiplies with this, so that both builds round alike and choose alike.
template <typename T>
FASTSEG_HOST_DEVICE inline T mul_rn(T a, T b) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "mul_rn: float or double");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

}  // namespace fastseg
