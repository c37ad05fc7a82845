// Host-side checks of the lattice tables, shared by the CPU and CUDA filters and the CPU dense-CRF inference.
//
// The table format is documented with the schemas in csrc/fastseg.cpp. The Python wrapper
// (fastseg/ops/lattice.py) only ever passes tables that lattice_build made, but the ops are reachable
// directly through torch.ops.fastseg, where a wrong shape or dtype would read out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "lattice/lattice_math.h"

namespace fastseg {
namespace lattice {

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
  TORCH_CHECK(splat_offsets.dim() == 2 && splat_offsets.scalar_type() == at::kInt && splat_offsets.size(0) == s.B &&
                  splat_offsets.size(1) == s.Mmax + 1,
              "lattice_filter: splat_offsets must be int32 [B, M + 1], got ", splat_offsets.scalar_type(), " ",
              splat_offsets.sizes());
  TORCH_CHECK(splat_points.dim() == 2 && splat_points.scalar_type() == at::kInt && splat_points.size(0) == s.B &&
                  splat_points.size(1) == s.N * (s.d + 1),
              "lattice_filter: splat_points must be int32 [B, N * (d + 1)], got ", splat_points.scalar_type(), " ",
              splat_points.sizes());
  TORCH_CHECK(splat_points_weight.scalar_type() == values.scalar_type() &&
                  splat_points_weight.sizes() == splat_points.sizes(),
              "lattice_filter: splat_points_weight must be [B, N * (d + 1)] of the values' dtype ",
              values.scalar_type(), ", got ", splat_points_weight.scalar_type(), " ", splat_points_weight.sizes());
  const auto dev = values.device();
  for (const at::Tensor* t : {&splat_vertex, &splat_offsets, &splat_points, &splat_points_weight}) {
    TORCH_CHECK(t->device() == dev, "lattice_filter: every table must be on the values' device ", dev, ", got ",
                t->device());
  }
  return s;
}

}  // namespace lattice
}  // namespace fastseg
