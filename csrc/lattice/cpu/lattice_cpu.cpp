// CPU kernels of fastseg::ext_lattice_build and fastseg::ext_lattice_filter (table format: csrc/fastseg.cpp).
//
// Build, per image: (1) in parallel over points, elevation, enclosing simplex and barycentric weights (the
// shared math in lattice/lattice_math.h, unrolled for the common feature dimensions); (2) the d + 1 vertex
// keys of every point go through an open-addressing hash table (linear probing, flat int32 key storage, no
// allocation per point), which numbers the vertices in order of first appearance (a point in the same simplex
// as the previous point reuses its ids without hashing; contiguous chunks of points hash in parallel into
// their own tables, merged in chunk order); (3) in parallel over vertices, the 2 (d + 1) blur neighbours are
// looked up in the now read-only table; (4) the splat CSR (entries of each vertex in point order) by a
// counting sort over chunks of points in parallel. Images are built in parallel when there are several.
//
// Filter, per image: splat as a scatter of each point's row into its d + 1 vertices (points in order, one
// private [M, C] buffer per contiguous chunk of points, the chunks fixed by N and summed in chunk order: the
// values are read sequentially; the CSR tables serve the CUDA kernel's gather), d + 1 blur passes
// ping-ponging between two [M, C] buffers, slice as a gather over each point's d + 1 vertices. The blur and
// slice are parallel over vertices or points and write only their own rows; the result is deterministic
// (the same bits for any thread count) and needs no atomics.
// Buffers are channel-innermost, so the per-vertex loops over C vectorise; values and results in [C, N]
// layouts move through L1-sized tiles of points.
//
// at::parallel_for runs in parallel only because setup.py compiles with -fopenmp (it is a header template).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lattice/cpu/lattice_cpu.h"
#include "lattice/lattice_args.h"
#include "lattice/lattice_math.h"

namespace fastseg {
namespace lattice {
namespace {

// The vertex count a key table is first sized for. Lattices hold far fewer vertices than points (a CRF's
// kernels about N / 8 to N / 12), and a table sized for N would be sparse: every probe a cache miss.
// Tables grow by doubling, which costs little next to the inserts.
int64_t initial_vertices(int64_t N) {
  return std::min<int64_t>(N, 1 << 13);
}

// Open-addressing hash set of d-coordinate int32 keys -> dense ids 0..size-1 (ids in insertion order). A slot
// holds the id and the key's hash, so a probe reads the key itself only when the hashes match.
class KeyTable {
 public:
  KeyTable(int d, int64_t expected) : d_(d) {
    int64_t cap = 64;
    while (cap < 2 * expected) {
      cap *= 2;
    }
    slots_.assign(cap, Slot{-1, 0});
    mask_ = static_cast<uint64_t>(cap - 1);
    keys_.reserve(static_cast<size_t>(expected) * d);
  }

  int32_t insert(const int32_t* key) {
    const uint32_t h = hash_key(key, d_);
    uint64_t s = h & mask_;
    while (true) {
      const Slot slot = slots_[s];
      if (slot.id < 0) {
        break;
      }
      if (slot.hash == h && keys_equal(&keys_[static_cast<size_t>(slot.id) * d_], key, d_)) {
        return slot.id;
      }
      s = (s + 1) & mask_;
    }
    TORCH_CHECK(size_ < std::numeric_limits<int32_t>::max(),
                "lattice_build: more than 2^31 - 1 lattice vertices in one image");
    const int32_t id = static_cast<int32_t>(size_++);
    slots_[s] = Slot{id, h};
    keys_.insert(keys_.end(), key, key + d_);
    if (2 * size_ > static_cast<int64_t>(slots_.size())) {
      grow();
    }
    return id;
  }

  // Read-only lookup (safe from several threads once the inserts are done): the id, or -1.
  int32_t find(const int32_t* key) const {
    const uint32_t h = hash_key(key, d_);
    uint64_t s = h & mask_;
    while (true) {
      const Slot slot = slots_[s];
      if (slot.id < 0) {
        return -1;
      }
      if (slot.hash == h && keys_equal(&keys_[static_cast<size_t>(slot.id) * d_], key, d_)) {
        return slot.id;
      }
      s = (s + 1) & mask_;
    }
  }

  int64_t size() const { return size_; }
  const int32_t* key(int64_t id) const { return &keys_[static_cast<size_t>(id) * d_]; }

 private:
  struct Slot {
    int32_t id;  // -1: empty
    uint32_t hash;
  };

  void grow() {
    std::vector<Slot> old(2 * slots_.size(), Slot{-1, 0});
    old.swap(slots_);
    mask_ = slots_.size() - 1;
    for (const Slot& slot : old) {
      if (slot.id < 0) {
        continue;
      }
      uint64_t s = slot.hash & mask_;
      while (slots_[s].id >= 0) {
        s = (s + 1) & mask_;
      }
      slots_[s] = slot;
    }
  }

  int d_;
  uint64_t mask_;
  int64_t size_ = 0;
  std::vector<Slot> slots_;
  std::vector<int32_t> keys_;
};

// Vertex ids of points [p0, p1) in `table` (which numbers new keys in order of first appearance).
void hash_points(const int32_t* simplex, int64_t p0, int64_t p1, int d, KeyTable& table, int32_t* vertex_out) {
  const int d1 = d + 1;
  int32_t key[kMaxDim];
  for (int64_t p = p0; p < p1; ++p) {
    const int32_t* rem0 = simplex + static_cast<size_t>(p) * 2 * d1;
    const int32_t* rank = rem0 + d1;
    // Neighbouring pixels often share their simplex (smooth features, large sigmas): then the ids are the
    // previous point's, without hashing.
    if (p > p0 && std::equal(rem0, rem0 + 2 * d1, rem0 - 2 * d1)) {
      std::copy(vertex_out + (p - 1) * d1, vertex_out + p * d1, vertex_out + p * d1);
      continue;
    }
    for (int k = 0; k <= d; ++k) {
      vertex_key(rem0, rank, d, k, key);
      vertex_out[p * d1 + k] = table.insert(key);
    }
  }
}

// Phase 1 of one image, points [begin, end): the simplex (rem0 and rank) and barycentric weights of every
// point; returns the first point whose coordinates fail (too large or not finite), or `end`. kD > 0: d is
// that constant (the per-point loops unroll); 0: d is `d_runtime`.
template <typename F, int kD>
int64_t simplex_points(const F* f, int64_t fs_d, int64_t fs_n, int d_runtime, const double* scale, int64_t begin,
                       int64_t end, int32_t* simplex, F* weight_out) {
  const int d = kD > 0 ? kD : d_runtime, d1 = d + 1;
  double elevated[kMaxDim + 1];
  double bary[kMaxDim + 2];
  int64_t bad = end;
  for (int64_t p = begin; p < end; ++p) {
    elevate<double, F>(f + p * fs_n, fs_d, d, scale, elevated);
    int32_t* rem0 = simplex + p * 2 * d1;
    int32_t* rank = rem0 + d1;
    if (!simplex_of<double>(elevated, d, rem0, rank)) {
      bad = std::min(bad, p);
      for (int k = 0; k <= d; ++k) {  // keep the hashing pass well-defined; the build fails anyway
        rem0[k] = 0;
        rank[k] = k;
      }
      continue;
    }
    barycentric<double>(elevated, rem0, rank, d, bary);
    for (int k = 0; k <= d; ++k) {
      weight_out[p * d1 + k] = static_cast<F>(bary[k]);
    }
  }
  return bad;
}

// The feature dimensions with their own unrolled phase 1 (2-D and 3-D positions, with up to 3 channels).
template <typename F, int kD = 1>
auto simplex_points_for(int d) {
  if constexpr (kD > 6) {
    return &simplex_points<F, 0>;
  } else {
    return d == kD ? &simplex_points<F, kD> : simplex_points_for<F, kD + 1>(d);
  }
}

// Phase 1 and 2 of one image: weights and vertex ids of every point; returns the first bad point or N.
template <typename F>
int64_t build_points(const at::Tensor& features, int64_t b, int d, KeyTable& table, F* weight_out,
                     int32_t* vertex_out) {
  const int64_t N = features.size(2);
  const int d1 = d + 1;
  const F* f = features.const_data_ptr<F>() + b * features.stride(0);
  const int64_t fs_d = features.stride(1), fs_n = features.stride(2);
  double scale[kMaxDim];
  for (int i = 0; i < d; ++i) {
    scale[i] = elevation_scale<double>(i, d);
  }
  // rem0 and rank of every point, for the sequential hashing pass.
  std::unique_ptr<int32_t[]> simplex(new int32_t[static_cast<size_t>(N) * 2 * d1]);  // no zero-fill
  const auto phase1 = simplex_points_for<F>(d);
  std::atomic<int64_t> bad{N};
  const int64_t block = grain_for(d1 * d1);
  parallel_tasks((N + block - 1) / block, [&](int64_t task) {
    const int64_t begin = task * block, end = std::min(N, begin + block);
    const int64_t first_bad = phase1(f, fs_d, fs_n, d, scale, begin, end, simplex.get(), weight_out);
    int64_t cur = bad.load();
    while (first_bad < end && first_bad < cur && !bad.compare_exchange_weak(cur, first_bad)) {
    }
  });
  if (bad.load() < N) {
    return bad.load();
  }
  // Phase 2. Sequentially the ids are the order of first appearance. With T threads free, each hashes a
  // contiguous chunk of points into its own table, and the chunk tables are then merged in chunk order:
  // that numbers the vertices exactly as the sequential pass does, whatever T is.
  const int64_t T = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), N / 4096);
  if (T <= 1) {
    hash_points(simplex.get(), 0, N, d, table, vertex_out);
    return N;
  }
  std::vector<KeyTable> local;
  local.reserve(T);
  for (int64_t t = 0; t < T; ++t) {
    local.emplace_back(d, initial_vertices(N / T));
  }
  auto chunk_begin = [&](int64_t t) { return N * t / T; };
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      hash_points(simplex.get(), chunk_begin(t), chunk_begin(t + 1), d, local[t], vertex_out);
    }
  });
  std::vector<std::vector<int32_t>> global_id(T);
  for (int64_t t = 0; t < T; ++t) {
    global_id[t].resize(local[t].size());
    for (int64_t id = 0; id < local[t].size(); ++id) {
      global_id[t][id] = table.insert(local[t].key(id));
    }
  }
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int32_t* map = global_id[t].data();
      for (int64_t e = chunk_begin(t) * d1; e < chunk_begin(t + 1) * d1; ++e) {
        vertex_out[e] = map[vertex_out[e]];
      }
    }
  });
  return N;
}

// Phase 3 and 4 of one image, into the padded tables.
template <typename F>
void build_tables(const KeyTable& table, int64_t N, int d, int64_t Mmax, const int32_t* vertex, const F* weight,
                  int32_t* neighbors, int32_t* offsets, int32_t* points, F* points_weight) {
  const int64_t M = table.size();
  const int d1 = d + 1;
  at::parallel_for(0, M, grain_for(4 * d1 * d), [&](int64_t begin, int64_t end) {
    int32_t nkey[kMaxDim];
    for (int64_t v = begin; v < end; ++v) {
      const int32_t* key = table.key(v);
      for (int dir = 0; dir <= d; ++dir) {
        for (int side = 0; side < 2; ++side) {
          neighbour_key(key, d, dir, side, nkey);
          neighbors[(dir * Mmax + v) * 2 + side] = table.find(nkey);
        }
      }
    }
  });
  for (int dir = 0; dir <= d; ++dir) {  // padding vertices have no neighbours
    std::fill(neighbors + (dir * Mmax + M) * 2, neighbors + (dir * Mmax + Mmax) * 2, -1);
  }
  // Counting sort of the entries (point, weight) by vertex; within a vertex, in point order. T contiguous
  // chunks of points count their entries per vertex, then fill their own slots in parallel (chunk t's
  // entries of a vertex follow those of the chunks before it): the same tables for any T.
  const int64_t T = at::in_parallel_region() ? 1 : std::clamp<int64_t>(N / 16384, 1, at::get_num_threads());
  auto chunk_begin = [&](int64_t t) { return N * t / T; };
  std::vector<int32_t> cursor(static_cast<size_t>(T * M), 0);  // chunk t, vertex v: its count, then next slot
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int32_t* count = cursor.data() + t * M;
      for (int64_t e = chunk_begin(t) * d1; e < chunk_begin(t + 1) * d1; ++e) {
        ++count[vertex[e]];
      }
    }
  });
  offsets[0] = 0;
  for (int64_t v = 0; v < M; ++v) {
    int32_t next = offsets[v];
    for (int64_t t = 0; t < T; ++t) {
      const int32_t count = cursor[t * M + v];
      cursor[t * M + v] = next;
      next += count;
    }
    offsets[v + 1] = next;
  }
  std::fill(offsets + M + 1, offsets + Mmax + 1, offsets[M]);  // padding vertices: empty rows
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int32_t* next = cursor.data() + t * M;
      for (int64_t p = chunk_begin(t); p < chunk_begin(t + 1); ++p) {
        for (int k = 0; k < d1; ++k) {
          const int32_t i = next[vertex[p * d1 + k]]++;
          points[i] = static_cast<int32_t>(p);
          points_weight[i] = weight[p * d1 + k];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lattice_build_cpu(
    const at::Tensor& features) {
  const BuildShape shape = check_build_args(features);
  const int64_t B = shape.B, N = shape.N;
  const int d = shape.d, d1 = d + 1;
  const auto int_opts = features.options().dtype(at::kInt);
  at::Tensor splat_vertex = at::empty({B, N, d1}, int_opts);
  at::Tensor splat_weight = at::empty({B, N, d1}, features.options());
  std::vector<KeyTable> tables;
  tables.reserve(B);
  for (int64_t b = 0; b < B; ++b) {
    tables.emplace_back(d, initial_vertices(N));
  }
  std::vector<int64_t> bad(B, N);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "ext_lattice_build_cpu", [&] {
    auto one = [&](int64_t b) {
      bad[b] = build_points<scalar_t>(features, b, d, tables[b], splat_weight.mutable_data_ptr<scalar_t>() + b * N * d1,
                                      splat_vertex.mutable_data_ptr<int32_t>() + b * N * d1);
    };
    if (B == 1) {
      one(0);  // the per-point pass runs in parallel
    } else {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          one(b);
        }
      });
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    if (bad[b] < N) {
      throw_bad_point(features, b, bad[b]);
    }
  }
  int64_t Mmax = 0;
  at::Tensor num_vertices = at::empty({B}, features.options().dtype(at::kLong));
  for (int64_t b = 0; b < B; ++b) {
    num_vertices.mutable_data_ptr<int64_t>()[b] = tables[b].size();
    Mmax = std::max(Mmax, tables[b].size());
  }
  at::Tensor blur_neighbors = at::empty({B, d1, Mmax, 2}, int_opts);
  at::Tensor splat_offsets = at::empty({B, Mmax + 1}, int_opts);
  at::Tensor splat_points = at::empty({B, N * d1}, int_opts);
  at::Tensor splat_points_weight = at::empty({B, N * d1}, features.options());
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "ext_lattice_build_cpu", [&] {
    auto one = [&](int64_t b) {
      build_tables<scalar_t>(tables[b], N, d, Mmax, splat_vertex.const_data_ptr<int32_t>() + b * N * d1,
                             splat_weight.const_data_ptr<scalar_t>() + b * N * d1,
                             blur_neighbors.mutable_data_ptr<int32_t>() + b * d1 * Mmax * 2,
                             splat_offsets.mutable_data_ptr<int32_t>() + b * (Mmax + 1),
                             splat_points.mutable_data_ptr<int32_t>() + b * N * d1,
                             splat_points_weight.mutable_data_ptr<scalar_t>() + b * N * d1);
    };
    if (B == 1) {
      one(0);
    } else {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          one(b);
        }
      });
    }
  });
  return {splat_vertex, splat_weight, blur_neighbors, num_vertices, splat_offsets, splat_points, splat_points_weight};
}

// Every id in the tables must be in range, or the filter would read out of bounds.
void check_table_ids(const FilterShape& s, const at::Tensor& splat_vertex, const at::Tensor& blur_neighbors,
                     const at::Tensor& num_vertices, const at::Tensor& splat_offsets, const at::Tensor& splat_points) {
  check_vertex_ids("lattice_filter", TableShape{s.B, s.N, s.d, s.Mmax}, splat_vertex, blur_neighbors, num_vertices);
  const int64_t E = s.N * (s.d + 1);
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t M = num_vertices.const_data_ptr<int64_t>()[b];
    const int32_t N = static_cast<int32_t>(s.N);
    const int32_t* off = splat_offsets.const_data_ptr<int32_t>() + b * (s.Mmax + 1);
    const int32_t* pts = splat_points.const_data_ptr<int32_t>() + b * E;
    TORCH_CHECK(ids_in_range(pts, E, 0, N), "lattice_filter: image ", b, ": splat_points holds an id out of range");
    bool good = off[0] == 0 && off[M] == E;
    for (int64_t v = 0; v < M && good; ++v) {
      good = off[v] <= off[v + 1];
    }
    TORCH_CHECK(good, "lattice_filter: image ", b, ": splat_offsets is not a CSR row index over ", E, " entries");
  }
}

// One blur direction over the M vertices of channel-innermost [M, C] buffers: out[v] = in[v] + 0.5 (in[n1] +
// in[n2]) with `neighbors` that direction's [M, 2] ids (-1: absent, contributes 0). Parallel over vertices.
template <typename A>
void blur_direction(const A* __restrict in, A* __restrict out, const int32_t* neighbors, int64_t M, int64_t C) {
  at::parallel_for(0, M, grain_for(3 * C), [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const int32_t n1 = neighbors[2 * v], n2 = neighbors[2 * v + 1];
      const A* __restrict a = in + v * C;
      A* __restrict o = out + v * C;
      if (n1 >= 0 && n2 >= 0) {
        const A* __restrict p1 = in + int64_t(n1) * C;
        const A* __restrict p2 = in + int64_t(n2) * C;
        for (int64_t c = 0; c < C; ++c) {
          o[c] = a[c] + A(0.5) * (p1[c] + p2[c]);
        }
      } else if (n1 >= 0 || n2 >= 0) {
        const A* __restrict p1 = in + int64_t(n1 >= 0 ? n1 : n2) * C;
        for (int64_t c = 0; c < C; ++c) {
          o[c] = a[c] + A(0.5) * p1[c];
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          o[c] = a[c];
        }
      }
    }
  });
}

// dst[j] = scale * sum_i w[i] * x[idx[i] * stride + j] for j < CB: CB accumulators stay in registers.
template <int CB, typename S, typename A, typename W>
inline void gather_block(A* __restrict dst, const S* __restrict x, int64_t stride, const int32_t* __restrict idx,
                         const W* __restrict w, int64_t count, A scale) {
  A acc[CB];
  for (int j = 0; j < CB; ++j) {
    acc[j] = A(0);
  }
  for (int64_t i = 0; i < count; ++i) {
    const S* __restrict xp = x + static_cast<int64_t>(idx[i]) * stride;
    const A wi = static_cast<A>(w[i]);
    for (int j = 0; j < CB; ++j) {
      acc[j] += wi * static_cast<A>(xp[j]);
    }
  }
  for (int j = 0; j < CB; ++j) {
    dst[j] = scale * acc[j];
  }
}

// A whole row of C channels: blocks of 8, then one block of the remaining 1..7 (each a compile-time size,
// so every pass over the index list keeps its accumulators in registers).
template <typename S, typename A, typename W>
inline void gather_row(A* __restrict dst, const S* __restrict x, int64_t C, const int32_t* idx, const W* w,
                       int64_t count, A scale) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    gather_block<8>(dst + c, x + c, C, idx, w, count, scale);
  }
  switch (C - c) {
    case 7: gather_block<7>(dst + c, x + c, C, idx, w, count, scale); break;
    case 6: gather_block<6>(dst + c, x + c, C, idx, w, count, scale); break;
    case 5: gather_block<5>(dst + c, x + c, C, idx, w, count, scale); break;
    case 4: gather_block<4>(dst + c, x + c, C, idx, w, count, scale); break;
    case 3: gather_block<3>(dst + c, x + c, C, idx, w, count, scale); break;
    case 2: gather_block<2>(dst + c, x + c, C, idx, w, count, scale); break;
    case 1: gather_block<1>(dst + c, x + c, C, idx, w, count, scale); break;
    default: break;
  }
}

// The splat scatters chunks of at least kSplatChunkPoints points, at most kMaxSplatChunks of them, each into
// its own [M, C] buffer (more chunks: more parallelism, more buffers to clear and sum).
constexpr int64_t kSplatChunkPoints = 65536;
constexpr int64_t kMaxSplatChunks = 4;

// The filter's scratch buffer i of the calling thread.
template <typename A>
std::vector<A>& scratch(int i) {
  thread_local std::vector<A> buffers[3];
  return buffers[i];
}

// Points per tile when moving between [C, N] and [N, C] layouts: a tile of kTile x C stays in L1.
constexpr int64_t kTile = 64;

// rows[p, c] = x[c * sc + p * sn] for one image, in tiles of kTile points.
template <typename scalar_t>
void gather_rows(const scalar_t* x, int64_t sc, int64_t sn, int64_t C, int64_t N, scalar_t* rows) {
  at::parallel_for(0, (N + kTile - 1) / kTile, grain_for(kTile * C), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kTile, p1 = std::min(N, p0 + kTile);
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xc = x + c * sc;
        for (int64_t p = p0; p < p1; ++p) {
          rows[p * C + c] = xc[p * sn];
        }
      }
    }
  });
}

template <typename scalar_t>
void filter_impl(const FilterShape& s, const at::Tensor& values, const at::Tensor& splat_vertex,
                 const at::Tensor& splat_weight, const at::Tensor& blur_neighbors, const at::Tensor& num_vertices,
                 bool reverse, const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s.B, C = s.C, N = s.N, Mmax = s.Mmax;
  const int d = static_cast<int>(s.d), d1 = d + 1;
  const acc_t alpha = slice_alpha<acc_t>(d);
  // Points as rows of C channels: read in place when the values already are, else one tiled transpose.
  const bool rows_in = values.stride(1) == 1 && (values.stride(2) == C || N == 1);
  std::vector<scalar_t> x_rows(rows_in ? 0 : static_cast<size_t>(N) * C);
  // Scratch buffers kept by the calling thread between calls (they grow, never shrink): fresh multi-megabyte
  // allocations every call cost more in page faults than the blur itself. Every pass writes the rows it reads.
  std::vector<acc_t>& buf0 = scratch<acc_t>(0);
  std::vector<acc_t>& buf1 = scratch<acc_t>(1);
  std::vector<acc_t>& priv = scratch<acc_t>(2);  // the splat's buffers beyond the first chunk's
  for (std::vector<acc_t>* v : {&buf0, &buf1}) {
    if (v->size() < static_cast<size_t>(Mmax) * C) {
      v->resize(static_cast<size_t>(Mmax) * C);
    }
  }
  const scalar_t* values_data = values.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const int64_t out_sc = out.stride(1), out_sn = out.stride(2);
  const bool rows_out = out_sc == 1 && (out_sn == C || N == 1);

  for (int64_t b = 0; b < B; ++b) {
    const int64_t M = num_vertices.const_data_ptr<int64_t>()[b];
    const scalar_t* x = values_data + b * values.stride(0);
    if (!rows_in) {
      gather_rows(x, values.stride(1), values.stride(2), C, N, x_rows.data());
      x = x_rows.data();
    }
    const int32_t* vertex = splat_vertex.const_data_ptr<int32_t>() + b * N * d1;
    const scalar_t* weight = splat_weight.const_data_ptr<scalar_t>() + b * N * d1;
    const int32_t* nbr = blur_neighbors.const_data_ptr<int32_t>() + b * d1 * Mmax * 2;
    acc_t* src = buf0.data();
    acc_t* dst = buf1.data();

    // Splat: a scatter of each point's row into its d + 1 vertices, reading the values in point order (the
    // CSR gather reads them in vertex order: a cache miss per entry when a vertex's points lie far apart, as
    // with a bilateral kernel's colour features). T contiguous chunks of points scatter into T private
    // buffers, summed in chunk order, no atomics. The chunk count depends on N alone (not on the thread
    // count), so the sums are the same bits whatever the number of threads.
    const int64_t T = std::clamp<int64_t>(N / kSplatChunkPoints, 1, kMaxSplatChunks);
    if (static_cast<int64_t>(priv.size()) < (T - 1) * M * C) {
      priv.resize(static_cast<size_t>((T - 1) * M * C));
    }
    auto scatter = [&](acc_t* __restrict acc, int64_t p0, int64_t p1) {
      std::fill(acc, acc + M * C, acc_t(0));
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* __restrict xp = x + p * C;
        for (int k = 0; k < d1; ++k) {
          acc_t* __restrict o = acc + static_cast<int64_t>(vertex[p * d1 + k]) * C;
          const acc_t w = static_cast<acc_t>(weight[p * d1 + k]);
          for (int64_t c = 0; c < C; ++c) {
            o[c] += w * static_cast<acc_t>(xp[c]);
          }
        }
      }
    };
    if (T == 1) {
      scatter(src, 0, N);
    } else {
      at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          scatter(t == 0 ? src : priv.data() + (t - 1) * M * C, N * t / T, N * (t + 1) / T);
        }
      });
      at::parallel_for(0, M, grain_for(T * C), [&](int64_t begin, int64_t end) {
        for (int64_t t = 1; t < T; ++t) {
          const acc_t* __restrict part = priv.data() + (t - 1) * M * C;
          acc_t* __restrict total = src;
          for (int64_t i = begin * C; i < end * C; ++i) {
            total[i] += part[i];
          }
        }
      });
    }

    // Blur: v += 0.5 (v[n1] + v[n2]) along each direction in turn (reverse order for the adjoint).
    for (int step = 0; step <= d; ++step) {
      const int dir = reverse ? d - step : step;
      blur_direction(src, dst, nbr + static_cast<int64_t>(dir) * Mmax * 2, M, C);
      std::swap(src, dst);
    }

    // Slice: a gather over each point's simplex vertices, scaled by alpha, a tile of points at a time; the
    // tile goes out transposed unless the output is [N, C] rows too.
    scalar_t* ob = out_data + b * out.stride(0);
    at::parallel_for(0, (N + kTile - 1) / kTile, grain_for(kTile * C * d1), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> tile(static_cast<size_t>(kTile) * C);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p0 = t * kTile, p1 = std::min(N, p0 + kTile);
        if constexpr (std::is_same_v<acc_t, scalar_t>) {
          if (rows_out) {
            for (int64_t p = p0; p < p1; ++p) {
              gather_row(ob + p * C, src, C, vertex + p * d1, weight + p * d1, d1, alpha);
            }
            continue;
          }
        }
        for (int64_t p = p0; p < p1; ++p) {
          gather_row(tile.data() + (p - p0) * C, src, C, vertex + p * d1, weight + p * d1, d1, alpha);
        }
        for (int64_t c = 0; c < C; ++c) {
          scalar_t* oc = ob + c * out_sc;
          for (int64_t p = p0; p < p1; ++p) {
            oc[p * out_sn] = static_cast<scalar_t>(tile[(p - p0) * C + c]);
          }
        }
      }
    });
  }
}

at::Tensor lattice_filter_cpu(const at::Tensor& values, const at::Tensor& splat_vertex,
                              const at::Tensor& splat_weight, const at::Tensor& blur_neighbors,
                              const at::Tensor& num_vertices, const at::Tensor& splat_offsets,
                              const at::Tensor& splat_points, const at::Tensor& splat_points_weight, bool reverse) {
  const FilterShape s = check_filter_args(values, splat_vertex, splat_weight, blur_neighbors, num_vertices,
                                          splat_offsets, splat_points, splat_points_weight);
  const bool channels_innermost = s.C > 1 && values.stride(1) == 1;
  at::Tensor out = channels_innermost ? at::empty({s.B, s.N, s.C}, values.options()).transpose(1, 2)
                                      : at::empty({s.B, s.C, s.N}, values.options());
  if (out.numel() > 0) {
    // The CPU filter scatters through (splat_vertex, splat_weight); the CSR tables serve the CUDA kernel's
    // gather and are only checked here.
    const at::Tensor sv = splat_vertex.contiguous(), sw = splat_weight.contiguous(),
                     bn = blur_neighbors.contiguous(), nv = num_vertices.cpu().contiguous();
    check_table_ids(s, sv, bn, nv, splat_offsets.contiguous(), splat_points.contiguous());
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ext_lattice_filter_cpu",
                               [&] { filter_impl<scalar_t>(s, values, sv, sw, bn, nv, reverse, out); });
  }
  return out;
}

}  // namespace
}  // namespace lattice
}  // namespace fastseg

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("ext_lattice_build", &fastseg::lattice::lattice_build_cpu);
  m.impl("ext_lattice_filter", &fastseg::lattice::lattice_filter_cpu);
}
