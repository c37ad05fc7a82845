// Host-side checks of the lattice build's features and of the lattice tables, and the build's error for a bad
// point, shared by the CPU and CUDA builds and filters and the dense-CRF inference.
//
// The table format is documented with the schemas in csrc/fastseg.cpp. The Python wrapper
// (fastseg/ops/lattice.py) only ever passes tables that lattice_build made, but the ops are reachable
// directly through torch.ops.fastseg, where a wrong shape or dtype would read out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <sstream>

#include "lattice/lattice_math.h"

namespace fastseg {
namespace lattice {

struct BuildShape {
  int64_t B, N;
  int d;
};

// features [B, d, N], float32/float64, 1 <= d <= kMaxDim, and N (d + 1) splat entries per image within int32.
inline BuildShape check_build_args(const at::Tensor& features) {
  TORCH_CHECK(features.dim() == 3, "lattice_build: features must be [B, d, N], got ", features.sizes());
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "lattice_build: features must be float32 or float64, got ", features.scalar_type());
  const int64_t B = features.size(0), d = features.size(1), N = features.size(2);
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxDim, "lattice_build: the feature dimension d must be in 1..", kMaxDim,
                    ", got ", d);
  TORCH_CHECK_VALUE(N * (d + 1) < std::numeric_limits<int32_t>::max(), "lattice_build: N * (d + 1) = ", N * (d + 1),
                    " splat entries per image exceed the int32 tables");
  return BuildShape{B, N, static_cast<int>(d)};
}

// The tables every filter reads, one lattice per image: B images of N points, d features, M padded vertices.
struct TableShape {
  int64_t B, N, d, Mmax;
};

// splat_vertex int32 [B, N, d + 1], splat_weight [B, N, d + 1] of `dtype`, blur_neighbors int32
// [B, d + 1, M, 2] and num_vertices int64 [B]; `op` names the caller in the messages.
inline TableShape check_point_tables(const char* op, const at::Tensor& splat_vertex, const at::Tensor& splat_weight,
                                     const at::Tensor& blur_neighbors, const at::Tensor& num_vertices,
                                     at::ScalarType dtype) {
  TORCH_CHECK(splat_vertex.dim() == 3 && splat_vertex.scalar_type() == at::kInt, op,
              ": splat_vertex must be int32 [B, N, d + 1], got ", splat_vertex.scalar_type(), " ",
              splat_vertex.sizes());
  TableShape s;
  s.B = splat_vertex.size(0);
  s.N = splat_vertex.size(1);
  s.d = splat_vertex.size(2) - 1;
  TORCH_CHECK(s.d >= 1 && s.d <= kMaxDim, op, ": splat_vertex's last dimension must be d + 1 with 1 <= d <= ",
              kMaxDim, ", got ", splat_vertex.size(2));
  TORCH_CHECK(splat_weight.scalar_type() == dtype, op, ": splat_weight's dtype ", splat_weight.scalar_type(),
              " must be the values' dtype ", dtype);
  TORCH_CHECK(splat_weight.sizes() == splat_vertex.sizes(), op, ": splat_weight ", splat_weight.sizes(),
              " must have splat_vertex's shape ", splat_vertex.sizes());
  TORCH_CHECK(blur_neighbors.dim() == 4 && blur_neighbors.scalar_type() == at::kInt &&
                  blur_neighbors.size(0) == s.B && blur_neighbors.size(1) == s.d + 1 && blur_neighbors.size(3) == 2,
              op, ": blur_neighbors must be int32 [B, d + 1, M, 2], got ", blur_neighbors.scalar_type(), " ",
              blur_neighbors.sizes());
  s.Mmax = blur_neighbors.size(2);
  TORCH_CHECK(num_vertices.dim() == 1 && num_vertices.scalar_type() == at::kLong && num_vertices.size(0) == s.B,
              op, ": num_vertices must be int64 [B], got ", num_vertices.scalar_type(), " ", num_vertices.sizes());
  const auto dev = splat_vertex.device();
  TORCH_CHECK(splat_weight.device() == dev && blur_neighbors.device() == dev, op,
              ": the lattice tables must be on one device");
  TORCH_CHECK(num_vertices.device().is_cpu() || num_vertices.device() == dev, op,
              ": num_vertices must be on the CPU or the tables' device");
  return s;
}

// The splat as a CSR over vertices (what the CUDA kernels gather through): splat_offsets int32 [B, M + 1],
// splat_points int32 [B, N (d + 1)] and splat_points_weight [B, N (d + 1)] of `dtype`, on splat_offsets'
// device. `op` names the caller in the messages.
inline void check_csr_tables(const char* op, const TableShape& s, const at::Tensor& splat_offsets,
                             const at::Tensor& splat_points, const at::Tensor& splat_points_weight,
                             at::ScalarType dtype) {
  TORCH_CHECK(splat_offsets.dim() == 2 && splat_offsets.scalar_type() == at::kInt && splat_offsets.size(0) == s.B &&
                  splat_offsets.size(1) == s.Mmax + 1,
              op, ": splat_offsets must be int32 [B, M + 1] = [", s.B, ", ", s.Mmax + 1, "], got ",
              splat_offsets.scalar_type(), " ", splat_offsets.sizes());
  TORCH_CHECK(splat_points.dim() == 2 && splat_points.scalar_type() == at::kInt && splat_points.size(0) == s.B &&
                  splat_points.size(1) == s.N * (s.d + 1),
              op, ": splat_points must be int32 [B, N * (d + 1)] = [", s.B, ", ", s.N * (s.d + 1), "], got ",
              splat_points.scalar_type(), " ", splat_points.sizes());
  TORCH_CHECK(splat_points_weight.scalar_type() == dtype && splat_points_weight.sizes() == splat_points.sizes(),
              op, ": splat_points_weight must be [B, N * (d + 1)] of dtype ", dtype, ", got ",
              splat_points_weight.scalar_type(), " ", splat_points_weight.sizes());
  TORCH_CHECK(splat_points.device() == splat_offsets.device() && splat_points_weight.device() == splat_offsets.device(),
              op, ": the splat CSR tables must be on one device");
}

struct FilterShape {
  int64_t B, C, N, d, Mmax;
};

inline FilterShape check_filter_args(const at::Tensor& values, const at::Tensor& splat_vertex,
                                     const at::Tensor& splat_weight, const at::Tensor& blur_neighbors,
                                     const at::Tensor& num_vertices, const at::Tensor& splat_offsets,
                                     const at::Tensor& splat_points, const at::Tensor& splat_points_weight) {
  TORCH_CHECK(values.dim() == 3, "lattice_filter: values must be [B, C, N], got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "lattice_filter: values must be float32 or float64, got ", values.scalar_type());
  const TableShape t = check_point_tables("lattice_filter", splat_vertex, splat_weight, blur_neighbors,
                                          num_vertices, values.scalar_type());
  FilterShape s{t.B, values.size(1), t.N, t.d, t.Mmax};
  TORCH_CHECK(values.size(0) == s.B && values.size(2) == s.N, "lattice_filter: values ", values.sizes(),
              " do not match the lattice's points: splat_vertex ", splat_vertex.sizes());
  check_csr_tables("lattice_filter", TableShape{s.B, s.N, s.d, s.Mmax}, splat_offsets, splat_points,
                   splat_points_weight, values.scalar_type());
  const auto dev = values.device();
  for (const at::Tensor* t : {&splat_vertex, &splat_offsets, &splat_points, &splat_points_weight}) {
    TORCH_CHECK(t->device() == dev, "lattice_filter: every table must be on the values' device ", dev, ", got ",
                t->device());
  }
  return s;
}

// Raises the ValueError of a build whose image b, point p has coordinates that are not finite or would
// overflow the int32 keys (shared by the CPU and CUDA builds; reads the point back from any device).
[[noreturn]] inline void throw_bad_point(const at::Tensor& features, int64_t b, int64_t p) {
  const int64_t d = features.size(1);
  const at::Tensor point = features.select(0, b).select(1, p).to(at::kCPU, at::kDouble).contiguous();
  const double* v = point.const_data_ptr<double>();
  std::ostringstream msg;
  msg.precision(6);
  bool finite = true;
  double max_abs = 0;
  msg << "(";
  for (int64_t i = 0; i < d; ++i) {
    msg << (i ? ", " : "") << v[i];
    finite = finite && std::isfinite(v[i]);
    max_abs = std::max(max_abs, std::fabs(v[i]));
  }
  msg << ")";
  if (!finite) {
    TORCH_CHECK_VALUE(false, "lattice_build: features must be finite, but image ", b, " point ", p, " has ",
                      msg.str());
  }
  // |elevated| <= max|f| sqrt(2/3) (d + 1) (H_d + 1) <= max|f| sqrt(2/3) (d + 1) (2 + ln d)
  const double safe = kMaxElevated / (0.816496580927726 * double(d + 1) * (2.0 + std::log(double(d))));
  TORCH_CHECK_VALUE(false, "lattice_build: feature values too large for the int32 lattice keys: image ", b,
                    " point ", p, " has features ", msg.str(), " (max |feature| ", max_abs,
                    "); with d = ", d, " features, keep |feature| below about ", safe,
                    ". Features are positions divided by the kernel's standard deviation (sigma): a tiny sigma "
                    "or huge raw values (e.g. unscaled intensities or coordinates) overflow; use a larger sigma "
                    "or rescale the features.");
}

}  // namespace lattice
}  // namespace fastseg
