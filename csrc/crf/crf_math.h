// Dense-CRF mean-field arithmetic shared by the CPU kernel (csrc/crf/cpu) and the CUDA kernel (csrc/crf/cuda)
// of fastseg::ext_crf_mean_field: pydensecrf's normalisations. The per-label loops (softmax, compatibility
// products, splat, blur, slice) are not shared: the CPU runs them on SIMD rows, the GPU across threads.
//
// Torch-free on purpose: T is float or double.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace fastseg {
namespace crf {

// pydensecrf's normalisations of a term with n = lattice_filter(1): "symmetric" pre = post = 1 / sqrt(n +
// 1e-20), "before" pre = 1 / (n + 1e-20), "after" post = 1 / (n + 1e-20), "none" (absent scales are 1).
enum class Normalization { kSymmetric, kBefore, kAfter, kNone };

FASTSEG_HOST_DEVICE inline bool scales_before(Normalization mode) {
  return mode == Normalization::kSymmetric || mode == Normalization::kBefore;
}

FASTSEG_HOST_DEVICE inline bool scales_after(Normalization mode) {
  return mode == Normalization::kSymmetric || mode == Normalization::kAfter;
}

// Single-precision and double-precision square roots by name, so that float stays float on the host (an
// unqualified sqrt(float) would find ::sqrt(double) there) and the device calls its own.
FASTSEG_HOST_DEVICE inline float sqrt_of(float x) { return sqrtf(x); }
FASTSEG_HOST_DEVICE inline double sqrt_of(double x) { return sqrt(x); }

// The per-point scale of a normalisation (not kNone) from the filtered ones n at that point.
template <typename T>
FASTSEG_HOST_DEVICE inline T normalization_scale(Normalization mode, T filtered_one) {
  const T norm = filtered_one + T(1e-20);
  return mode == Normalization::kSymmetric ? T(1) / sqrt_of(norm) : T(1) / norm;
}

}  // namespace crf
}  // namespace fastseg
