// Host-side checks of fastseg::ext_crf_mean_field's arguments, shared by the CPU and CUDA kernels.
//
// The schema is documented in csrc/fastseg.cpp. fastseg/ops/crf.py only ever passes tables that lattice_build
// made, but the op is reachable directly through torch.ops.fastseg, where a wrong shape, dtype or device would
// read out of bounds. What needs the tables' contents (the CPU kernel's id checks) stays with the kernel.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "crf/crf_math.h"
#include "lattice/lattice_args.h"

namespace fastseg {
namespace crf {

inline Normalization parse_normalization(const std::string& name, size_t k) {
  if (name == "symmetric") {
    return Normalization::kSymmetric;
  }
  if (name == "before") {
    return Normalization::kBefore;
  }
  if (name == "after") {
    return Normalization::kAfter;
  }
  TORCH_CHECK(name == "none", "crf_mean_field: normalization[", k,
              "] must be \"symmetric\", \"before\", \"after\" or \"none\", got \"", name, "\"");
  return Normalization::kNone;
}

// One pairwise term, checked.
struct TermArgs {
  lattice::TableShape shape;  // shape.B is the logits' B or 1 (one lattice serving the whole batch)
  Normalization mode;
  double weight;
  at::Tensor compat;  // [L, L] of the logits' dtype on their device, or undefined: Potts
};

struct MeanFieldArgs {
  int64_t B, L, N;
  std::vector<TermArgs> terms;
};

// Every check that does not read the tables' contents; `device_type` is the kernel's (the logits, the tables
// and the matrices must all be on the logits' device, num_vertices on it or on the CPU).
inline MeanFieldArgs check_mean_field_args(
    const at::Tensor& logits, at::TensorList splat_vertex, at::TensorList splat_weight,
    at::TensorList blur_neighbors, at::TensorList num_vertices, at::TensorList splat_offsets,
    at::TensorList splat_points, at::TensorList splat_points_weight, const std::vector<std::string>& normalization,
    at::ArrayRef<double> weight, const c10::List<std::optional<at::Tensor>>& compat, int64_t iterations,
    c10::DeviceType device_type) {
  const std::string device_name = c10::DeviceTypeName(device_type);
  TORCH_CHECK(logits.dim() == 3, "crf_mean_field: logits must be [B, L, N], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "crf_mean_field: logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(logits.device().type() == device_type, "crf_mean_field: logits must be on the ", device_name,
              ", got ", logits.device());
  TORCH_CHECK(iterations >= 0, "crf_mean_field: iterations must be >= 0, got ", iterations);
  const size_t K = splat_vertex.size();
  TORCH_CHECK(splat_weight.size() == K && blur_neighbors.size() == K && num_vertices.size() == K &&
                  splat_offsets.size() == K && splat_points.size() == K && splat_points_weight.size() == K &&
                  normalization.size() == K && weight.size() == K && compat.size() == K,
              "crf_mean_field: every per-term list must have one entry per term (", K, ")");
  MeanFieldArgs a;
  a.B = logits.size(0);
  a.L = logits.size(1);
  a.N = logits.size(2);
  TORCH_CHECK(a.L >= 1, "crf_mean_field: need at least one label");
  for (size_t k = 0; k < K; ++k) {
    const std::string op = "crf_mean_field: term " + std::to_string(k);
    TermArgs t;
    t.shape = lattice::check_point_tables(op.c_str(), splat_vertex[k], splat_weight[k], blur_neighbors[k], num_vertices[k],
                                          logits.scalar_type());
    const lattice::TableShape& s = t.shape;
    TORCH_CHECK(s.N == a.N && (s.B == a.B || s.B == 1), "crf_mean_field: term ", k, "'s lattice holds ", s.B,
                " images of ", s.N, " points; the logits ", a.B, " of ", a.N, " (a lattice of one image serves the "
                "whole batch)");
    // Points need vertices: a lattice with none could only come from malformed tables.
    TORCH_CHECK(s.Mmax >= 1 || s.N == 0, "crf_mean_field: term ", k, "'s lattice has no vertices");
    TORCH_CHECK(splat_vertex[k].device() == logits.device(), "crf_mean_field: term ", k,
                "'s tables must be on the logits' device ", logits.device(), ", got ", splat_vertex[k].device());
    // The splat as a CSR over vertices (the CUDA kernel's gather; the CPU kernel scatters through splat_vertex).
    lattice::check_csr_tables(op.c_str(), s, splat_offsets[k], splat_points[k], splat_points_weight[k],
                              logits.scalar_type());
    TORCH_CHECK(splat_offsets[k].device() == logits.device(), "crf_mean_field: term ", k,
                "'s splat CSR must be on the logits' device ", logits.device());
    t.mode = parse_normalization(normalization[k], k);
    t.weight = weight[k];
    const std::optional<at::Tensor> c = compat.get(k);
    if (c.has_value() && c->defined()) {
      TORCH_CHECK(c->dim() == 2 && c->size(0) == a.L && c->size(1) == a.L, "crf_mean_field: compat[", k,
                  "] must be [L, L] = [", a.L, ", ", a.L, "], got ", c->sizes());
      TORCH_CHECK(c->scalar_type() == logits.scalar_type() && c->device() == logits.device(),
                  "crf_mean_field: compat[", k, "] must be a ", device_name, " tensor of the logits' dtype");
      t.compat = *c;
    }
    a.terms.push_back(t);
  }
  return a;
}

}  // namespace crf
}  // namespace fastseg
