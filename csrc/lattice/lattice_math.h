// Permutohedral lattice arithmetic (Adams, Baek & Davis 2010, as in Kraehenbuehl's densecrf), shared by the
// CPU build/filter (csrc/lattice/cpu) and the CUDA kernels (csrc/lattice/cuda).
//
// A point with d features is elevated to d + 1 coordinates that sum to 0 (the hyperplane H_d), scaled so that
// the lattice blur approximates a Gaussian of unit standard deviation in feature space. Its enclosing simplex
// is found from the nearest remainder-0 lattice point (coordinates multiples of d + 1) and the rank of each
// coordinate's remainder; the d + 1 vertices of that simplex get barycentric weights that sum to 1.
//
// Lattice keys are the first d coordinates of a lattice point (the last one is minus their sum) as int32.
// Every coordinate that the build and blur touch stays within |elevated| + 2 (d + 1), so the build checks
// |elevated| <= kMaxElevated (2^30) and int32 never overflows.
//
// Torch-free on purpose: T is float or double, keys are int32_t.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace fastseg {
namespace lattice {

// The feature dimensions the kernels support (stack arrays are sized by it).
constexpr int kMaxDim = 32;
// Largest |elevated coordinate| the int32 keys can hold with room for the simplex and neighbour offsets.
constexpr double kMaxElevated = 1073741824.0;  // 2^30

// Scale of feature i (0-based) in a d-dimensional lattice: sqrt(2/3) (d + 1) / sqrt((i + 1)(i + 2)).
template <typename T>
FASTSEG_HOST_DEVICE inline T elevation_scale(int i, int d) {
  return T(0.816496580927726032732428024901963797) * T(d + 1) / sqrt(T(i + 1) * T(i + 2));
}

// Slice normalisation alpha = 1 / (1 + 2^-d), as densecrf.
template <typename T>
FASTSEG_HOST_DEVICE inline T slice_alpha(int d) {
  return T(1) / (T(1) + ldexp(T(1), -d));
}

// Elevates d features f[i * f_stride] (already divided by their standard deviations) to d + 1 coordinates
// summing to 0. `scale` holds elevation_scale(i, d) for i < d. Products by mul_rn: the CPU and CUDA builds
// then compute the same coordinates to the last bit, so they put every point in the same simplex.
template <typename T, typename F>
FASTSEG_HOST_DEVICE inline void elevate(const F* f, int64_t f_stride, int d, const T* scale, T* elevated) {
  T sum = T(0);
  for (int i = d; i > 0; --i) {
    const T cf = mul_rn(T(f[(i - 1) * f_stride]), scale[i - 1]);
    elevated[i] = sum - mul_rn(T(i), cf);
    sum += cf;
  }
  elevated[0] = sum;
}

// The nearest remainder-0 point rem0 (d + 1 coordinates, multiples of d + 1, summing to 0) and the rank of
// each coordinate's remainder elevated - rem0 (0 = largest; ties: the lower index ranks as larger), which
// together name the enclosing simplex. Returns false when a coordinate is not finite or exceeds
// kMaxElevated (the int32 keys would overflow); the outputs are then unspecified.
template <typename T>
FASTSEG_HOST_DEVICE inline bool simplex_of(const T* elevated, int d, int32_t* rem0, int32_t* rank) {
  const int d1 = d + 1;
  const T down_factor = T(1) / T(d1);
  int32_t sum = 0;
  for (int i = 0; i <= d; ++i) {
    const T e = elevated[i];
    if (!(fabs(double(e)) <= kMaxElevated)) {  // also false for NaN
      return false;
    }
    // floor and ceil of e / (d + 1) through an integer cast (exact: |v| <= 2^30), which, unlike std::floor
    // without SSE4.1, is not a library call; then the nearer of the two multiples of d + 1 (ties: the lower).
    const T v = e * down_factor;
    int32_t lo = static_cast<int32_t>(v);  // truncates towards 0
    if (T(lo) > v) {
      --lo;
    }
    const int32_t hi = T(lo) == v ? lo : lo + 1;
    const T up = T(hi) * T(d1);
    const T down = T(lo) * T(d1);
    const int32_t q = (up - e < e - down) ? hi : lo;
    rem0[i] = q * d1;
    sum += q;
    rank[i] = 0;
  }
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      // branch-free: the comparisons of random points are unpredictable
      const int32_t lt = elevated[i] - T(rem0[i]) < elevated[j] - T(rem0[j]);
      rank[i] += lt;
      rank[j] += 1 - lt;
    }
  }
  // rem0 need not sum to 0: move the coordinates with the largest (sum > 0: smallest) remainders to the
  // neighbouring remainder-0 value, which brings the sum to 0 and shifts the ranks.
  if (sum > 0) {
    for (int i = 0; i <= d; ++i) {
      if (rank[i] >= d1 - sum) {
        rem0[i] -= d1;
        rank[i] += sum - d1;
      } else {
        rank[i] += sum;
      }
    }
  } else if (sum < 0) {
    for (int i = 0; i <= d; ++i) {
      if (rank[i] < -sum) {
        rem0[i] += d1;
        rank[i] += d1 + sum;
      } else {
        rank[i] += sum;
      }
    }
  }
  return true;
}

// Barycentric weights bary[0..d] of the point in its simplex (bary needs d + 2 slots); they sum to 1.
// bary[k] is the weight of simplex vertex k (see vertex_coord).
template <typename T>
FASTSEG_HOST_DEVICE inline void barycentric(const T* elevated, const int32_t* rem0, const int32_t* rank, int d,
                                            T* bary) {
  const T down_factor = T(1) / T(d + 1);
  for (int i = 0; i <= d + 1; ++i) {
    bary[i] = T(0);
  }
  for (int i = 0; i <= d; ++i) {
    const T delta = mul_rn(elevated[i] - T(rem0[i]), down_factor);  // the same weights in both builds
    bary[d - rank[i]] += delta;
    bary[d + 1 - rank[i]] -= delta;
  }
  bary[0] += T(1) + bary[d + 1];
}

// Coordinate j of simplex vertex k: rem0 plus the canonical simplex's vertex k, whose coordinate of rank r
// is k when r <= d - k and k - (d + 1) otherwise.
FASTSEG_HOST_DEVICE inline int32_t vertex_coord(const int32_t* rem0, const int32_t* rank, int d, int k, int j) {
  return rem0[j] + (rank[j] <= d - k ? k : k - (d + 1));
}

// The key (first d coordinates) of simplex vertex k.
FASTSEG_HOST_DEVICE inline void vertex_key(const int32_t* rem0, const int32_t* rank, int d, int k, int32_t* key) {
  for (int j = 0; j < d; ++j) {
    key[j] = vertex_coord(rem0, rank, d, k, j);
  }
}

// The key of a vertex's neighbour along lattice direction `dir` (0..d): side 0 adds -1 to every coordinate
// but dir and +d to coordinate dir, side 1 the opposite (+1 everywhere, -d at dir). Only the first d
// coordinates are stored, so dir == d shifts them all by -1 (side 0) or +1 (side 1).
FASTSEG_HOST_DEVICE inline void neighbour_key(const int32_t* key, int d, int dir, int side, int32_t* out) {
  const int32_t step = side == 0 ? -1 : 1;
  for (int j = 0; j < d; ++j) {
    out[j] = key[j] + (j == dir ? -step * d : step);
  }
}

// A 32-bit hash of a d-coordinate key: a polynomial in 64-bit arithmetic (one multiply per coordinate, a short
// dependency chain), of which the well-mixed high half is kept.
FASTSEG_HOST_DEVICE inline uint32_t hash_key(const int32_t* key, int d) {
  uint64_t h = 0;
  for (int j = 0; j < d; ++j) {
    h = (h + static_cast<uint32_t>(key[j])) * 0x9E3779B97F4A7C15ull;
  }
  return static_cast<uint32_t>(h >> 32);
}

FASTSEG_HOST_DEVICE inline bool keys_equal(const int32_t* a, const int32_t* b, int d) {
  for (int j = 0; j < d; ++j) {
    if (a[j] != b[j]) {
      return false;
    }
  }
  return true;
}

}  // namespace lattice
}  // namespace fastseg
