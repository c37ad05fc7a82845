// CPU pieces shared by the lattice build and filter (lattice_cpu.cpp) and the dense-CRF inference
// (csrc/crf/cpu): the parallel grain, dynamically shared parallel loops and the id checks of the tables.
//
// at::parallel_for runs in parallel only because setup.py compiles with -fopenmp (it is a header template).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "lattice/lattice_args.h"

namespace fastseg {
namespace lattice {

// Work per parallel_for chunk, in multiply-adds (about at::internal::GRAIN_SIZE).
constexpr int64_t kWorkPerChunk = 32768;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kWorkPerChunk / std::max<int64_t>(1, work_per_item));
}

// fn(task) for every task in 0..tasks-1, on the threads of one parallel region, each thread claiming the
// next task when it is done with one. Unlike at::parallel_for's equal static shares, a thread that gets less
// of its core (a machine shared with other processes) then takes fewer tasks instead of holding up the
// region. Results must not depend on which thread runs a task.
template <typename Fn>
void parallel_tasks(int64_t tasks, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t task = next++; task < tasks; task = next++) {
      fn(task);
    }
  });
}

// Whether every one of `count` ids lies in lo..hi-1 (in parallel: the tables hold N (d + 1) ids per image).
inline bool ids_in_range(const int32_t* ids, int64_t count, int32_t lo, int32_t hi) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, count, kWorkPerChunk, [&](int64_t begin, int64_t end) {
    bool good = true;
    for (int64_t i = begin; i < end; ++i) {
      good &= (ids[i] >= lo) & (ids[i] < hi);
    }
    if (!good) {
      ok = false;
    }
  });
  return ok.load();
}

// Every vertex id of splat_vertex and blur_neighbors (contiguous, on the CPU) must be in range for its image's
// num_vertices, or a filter would read out of bounds.
inline void check_vertex_ids(const char* op, const TableShape& s, const at::Tensor& splat_vertex,
                             const at::Tensor& blur_neighbors, const at::Tensor& num_vertices) {
  const int64_t d1 = s.d + 1, E = s.N * d1;
  const int64_t* nv = num_vertices.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < s.B; ++b) {
    TORCH_CHECK(nv[b] >= 0 && nv[b] <= s.Mmax, op, ": num_vertices[", b, "] = ", nv[b], " is outside 0..", s.Mmax);
    const int32_t M = static_cast<int32_t>(nv[b]);
    const int32_t* vtx = splat_vertex.const_data_ptr<int32_t>() + b * E;
    const int32_t* nbr = blur_neighbors.const_data_ptr<int32_t>() + b * d1 * s.Mmax * 2;
    TORCH_CHECK(ids_in_range(vtx, E, 0, M), op, ": image ", b, ": splat_vertex holds an id out of range");
    for (int64_t dir = 0; dir < d1; ++dir) {
      TORCH_CHECK(ids_in_range(nbr + dir * s.Mmax * 2, 2 * int64_t(M), -1, M), op, ": image ", b,
                  ": blur_neighbors holds an id out of range");
    }
  }
}

}  // namespace lattice
}  // namespace fastseg
