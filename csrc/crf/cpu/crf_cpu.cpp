// CPU kernel of fastseg::ext_crf_mean_field: dense-CRF mean-field inference (pydensecrf's update) over
// permutohedral lattices, every iteration in one call.
//
// With K pairwise terms, each a lattice (tables of ext_lattice_build), a normalisation, a weight and a
// compatibility:
//   Q0 = softmax(logits);  then `iterations` times
//   m_k = w_k post_k filter_k(pre_k Q)     (filter_k: splat, blur, slice of lattice k)
//   Q   = softmax over labels of (logits + sum_{Potts k} m_k - sum_{matrix k} M_k m_k)
// with pydensecrf's normalisations of n_k = filter_k(1): "symmetric" pre = post = 1 / sqrt(n + 1e-20),
// "before" pre = 1 / (n + 1e-20), "after" post = 1 / (n + 1e-20), "none" (each scale absent is 1).
//
// One pass over the points per iteration does, for each point, the slice of every term, the update, the
// softmax and the splat of the new Q into the next iteration's lattices, so Q never goes to memory between
// iterations (only the final one is written); then each lattice is reduced and blurred.
//
// Splat without atomics, deterministic for any thread count: the points are cut into contiguous chunks whose
// number depends on N alone; each chunk scatters into its own compact buffer, one row per vertex that the
// chunk touches (numbered in the chunk's order of first appearance), so a chunk's buffer stays small and in
// cache. The reduce then sums every vertex's chunk rows in chunk order. Neighbouring points share vertices, so
// the chunk rows add up to a small multiple of the lattice's M (512x512, 32 chunks: 1.3 M for the spatial
// kernel's lattice, 3.2 M for the bilateral one's).
//
// Rows are labels-innermost and padded to whole SIMD vectors (GCC vector extensions); padding lanes stay 0
// in every lattice buffer, and the padded logits hold -inf there, which the softmax masks out. The kernels
// exist twice: for the baseline target (16-byte vectors: SSE2 on x86-64, NEON on arm64) and, on x86-64
// CPUs that have them, AVX2 and FMA (32-byte vectors), chosen at run time by torch's CPU capability:
// setup.py compiles for the baseline, and the per-point work is bound by arithmetic that AVX2 halves.
//
// The argument checks (csrc/crf/crf_args.h) and the normalisation's arithmetic (csrc/crf/crf_math.h) are the
// CUDA kernel's too. The splat scatters through splat_vertex: the CSR tables, the CUDA kernel's gather, are
// checked but not read.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu_target.h"
#include "crf/crf_args.h"
#include "crf/crf_math.h"
#include "lattice/cpu/lattice_cpu.h"
#include "lattice/lattice_args.h"
#include "lattice/lattice_math.h"

// The vector helpers below are internal and inlined: GCC's note that passing 32-byte vectors without AVX
// changes the ABI concerns calls across translation units, which never happen.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastseg {
namespace crf {
namespace {

using lattice::grain_for;

// The row helpers are FASTSEG_ALWAYS_INLINE: inlined into each target's kernels (a call would lose the
// caller's target).

// --- SIMD rows ------------------------------------------------------------------------------------------------

template <typename T, int kBytes>
struct Simd {
  typedef T V __attribute__((vector_size(kBytes)));
  typedef int32_t I __attribute__((vector_size(kBytes)));
  // V at any address of a T: loads and stores through it are T accesses to the compiler's alias analysis
  // (a memcpy would alias everything, and every store into a row would reload the terms' fields).
  typedef T Unaligned __attribute__((vector_size(kBytes), aligned(alignof(T))));
  static constexpr int kLanes = kBytes / static_cast<int>(sizeof(T));
};

template <typename T, int kBytes>
FASTSEG_ALWAYS_INLINE typename Simd<T, kBytes>::V load(const T* p) {
  return *reinterpret_cast<const typename Simd<T, kBytes>::Unaligned*>(p);
}

template <typename T, int kBytes>
FASTSEG_ALWAYS_INLINE void store(T* p, const typename Simd<T, kBytes>::V& v) {
  *reinterpret_cast<typename Simd<T, kBytes>::Unaligned*>(p) = v;
}

// exp(x) for x <= 0 (callers subtract the row maximum). float: Cephes expf's range reduction and polynomial
// (about 1 ulp) on every lane; arguments below -87.3 give exp(-87.3) (~1e-38), far below softmax's
// resolution; NaN stays NaN. double: std::exp per lane.
template <typename T, int kBytes>
FASTSEG_ALWAYS_INLINE typename Simd<T, kBytes>::V exp_nonpositive(const typename Simd<T, kBytes>::V& in) {
  using V = typename Simd<T, kBytes>::V;
  V x = in;
  if constexpr (std::is_same_v<T, float>) {
    using I = typename Simd<T, kBytes>::I;
    x = x < -87.3f ? V{} - 87.3f : x;
    // n = round(x / ln 2): for x <= 0, truncating x / ln 2 - 0.5 towards 0 rounds to nearest
    const I n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, I);
    const V fn = __builtin_convertvector(n, V);
    V r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    const V r2 = r * r;
    V y = r * 1.9875691500e-4f + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r2 + r + 1.0f;
    const I bits = (n + 127) << 23;
    return y * (V)bits;  // a vector cast reinterprets the bits
  } else {
    for (int i = 0; i < Simd<T, kBytes>::kLanes; ++i) {
      x[i] = std::exp(x[i]);
    }
    return x;
  }
}

// --- the chunks -------------------------------------------------------------------------------------------

// Points per chunk (at least; their count is N / kChunkPoints): small enough that a chunk's buffers stay in a
// core's cache, and that there are chunks for every thread of a large machine.
constexpr int64_t kChunkPoints = 8192;

int64_t num_chunks(int64_t N) {
  return std::max<int64_t>(1, N / kChunkPoints);
}

int64_t chunk_begin(int64_t N, int64_t chunks, int64_t t) {
  return N * t / chunks;
}

// The chunk rows of one lattice image.
struct ChunkRows {
  std::vector<int32_t> splat_row;      // [N * (d + 1)]: the row of its chunk each splat entry adds into
  std::vector<int64_t> first_row;      // [chunks + 1]: chunk t owns rows first_row[t] .. first_row[t + 1] - 1
  std::vector<int32_t> reduce_offsets; // [M + 1]: vertex v sums rows reduce_rows[reduce_offsets[v] ..
  std::vector<int32_t> reduce_rows;    //           reduce_offsets[v + 1] - 1], in chunk order
};

ChunkRows make_chunk_rows(const int32_t* vertex, int64_t N, int d1, int64_t M, int64_t chunks) {
  ChunkRows cr;
  cr.splat_row.resize(static_cast<size_t>(N) * d1);
  // Per chunk, in parallel: chunk-local ids in order of first appearance and the vertex of each local id.
  std::vector<std::vector<int32_t>> vertex_of(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> local(static_cast<size_t>(M), -1);
    for (int64_t t = begin; t < end; ++t) {
      std::vector<int32_t>& seen = vertex_of[t];
      for (int64_t e = chunk_begin(N, chunks, t) * d1; e < chunk_begin(N, chunks, t + 1) * d1; ++e) {
        const int32_t v = vertex[e];
        if (local[v] < 0) {
          local[v] = static_cast<int32_t>(seen.size());
          seen.push_back(v);
        }
        cr.splat_row[e] = local[v];
      }
      for (const int32_t v : seen) {
        local[v] = -1;
      }
    }
  });
  cr.first_row.resize(chunks + 1);
  cr.first_row[0] = 0;
  for (int64_t t = 0; t < chunks; ++t) {
    cr.first_row[t + 1] = cr.first_row[t] + static_cast<int64_t>(vertex_of[t].size());
  }
  TORCH_CHECK(cr.first_row[chunks] < std::numeric_limits<int32_t>::max(), "crf_mean_field: too many chunk rows");
  // The reduce's CSR over vertices, by counting sort in chunk order.
  cr.reduce_offsets.assign(static_cast<size_t>(M) + 1, 0);
  for (int64_t t = 0; t < chunks; ++t) {
    for (const int32_t v : vertex_of[t]) {
      ++cr.reduce_offsets[v + 1];
    }
  }
  for (int64_t v = 0; v < M; ++v) {
    cr.reduce_offsets[v + 1] += cr.reduce_offsets[v];
  }
  cr.reduce_rows.resize(static_cast<size_t>(cr.first_row[chunks]));
  std::vector<int32_t> next(cr.reduce_offsets.begin(), cr.reduce_offsets.end() - 1);
  for (int64_t t = 0; t < chunks; ++t) {
    int32_t row = static_cast<int32_t>(cr.first_row[t]);
    for (const int32_t v : vertex_of[t]) {
      cr.reduce_rows[next[v]++] = row++;
    }
  }
  return cr;
}

// --- the terms --------------------------------------------------------------------------------------------

// One pairwise term as seen by one image.
template <typename T>
struct Term {
  int d1;
  int64_t M;
  const int32_t* vertex;     // [N, d1]
  const T* weight;           // [N, d1]
  const int32_t* neighbors;  // [d1, Mmax, 2]
  int64_t Mmax;
  const ChunkRows* rows;
  const T* splat_scale;  // pre [N], or nullptr (1)
  const T* slice_scale;  // post [N], or nullptr (1)
  const T* compat_t;     // M_k transposed, [L, Lp], or nullptr: Potts (the message is added)
  T slice_factor;        // the slice's alpha times the weight
  T* lattice;    // [M, Lp]: the reduced and then blurred lattice values
  T* blur_tmp;   // [M, Lp]
  T* chunk_buf;  // [chunk rows, Lp]
};

// Mean-field state of the whole batch.
template <typename T>
struct Problem {
  int64_t B, N, L, Lp, nb, chunks;
  const T* logits;  // [B, N, Lp]: points as rows, -inf in the padding lanes
  std::vector<std::vector<Term<T>>> terms;  // [B][K]
};

// --- the kernels, for one vector width --------------------------------------------------------------------

// Alignment of heap-allocated vectors (every target's widest).
constexpr size_t kVectorAlignment = 64;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// dst += scale * (the slice of term k at point p): the lattice rows of p's simplex vertices, weighted.
template <typename T, int kBytes>
FASTSEG_ALWAYS_INLINE void slice_point(typename Simd<T, kBytes>::V* dst, int nb, const Term<T>& k, int64_t p,
                                       T scale, int64_t Lp) {
  constexpr int W = Simd<T, kBytes>::kLanes;
  const int32_t* vertex = k.vertex + p * k.d1;
  const T* weight = k.weight + p * k.d1;
  for (int j = 0; j < k.d1; ++j) {
    const T* row = k.lattice + int64_t(vertex[j]) * Lp;
    const T w = scale * weight[j];
    for (int i = 0; i < nb; ++i) {
      dst[i] += w * load<T, kBytes>(row + i * W);
    }
  }
}

// One chunk of points of image b: for each point the slice of every term (when `slice`), the update and
// softmax, then the splat of Q into the chunk's rows (when `splat`) or Q written to `out` ([B, L, N], when
// `out`).
// kNB > 0: rows of exactly kNB vectors (the accumulators stay in registers); 0: pb.nb vectors.
template <typename T, int kBytes, int kNB>
FASTSEG_ALWAYS_INLINE void chunk_pass(const Problem<T>& pb, int64_t b, int64_t t, bool slice, bool splat, T* out) {
  using V = typename Simd<T, kBytes>::V;
  constexpr int W = Simd<T, kBytes>::kLanes;
  const int nb = kNB > 0 ? kNB : static_cast<int>(pb.nb);
  const int64_t L = pb.L, Lp = pb.Lp, N = pb.N;
  const int last = static_cast<int>(L - int64_t(nb - 1) * W);  // labels in the last vector
  constexpr int kSlots = kNB > 0 ? kNB : 1;
  V acc_fixed[kSlots], msg_fixed[kSlots];
  // Not a std::vector<V>: code built for the baseline target (the allocator) aligns a 32-byte vector type
  // to 16 bytes, code built for AVX2 assumes 32.
  std::unique_ptr<V[], FreeDeleter> dynamic(
      kNB > 0 ? nullptr
              : static_cast<V*>(std::aligned_alloc(
                    kVectorAlignment, (2 * nb * sizeof(V) + kVectorAlignment - 1) / kVectorAlignment * kVectorAlignment)));
  V* acc = kNB > 0 ? acc_fixed : dynamic.get();
  V* msg = kNB > 0 ? msg_fixed : dynamic.get() + nb;
  std::vector<T> scaled(static_cast<size_t>(Lp));  // a matrix term's message, for the matrix-vector product
  V last_mask;  // 1 on the last vector's label lanes, 0 on its padding
  for (int i = 0; i < W; ++i) {
    last_mask[i] = i < last ? T(1) : T(0);
  }
  const std::vector<Term<T>>& terms = pb.terms[b];
  std::vector<T*> chunk_rows(terms.size());  // this chunk's rows of each term
  if (splat) {
    for (size_t k = 0; k < terms.size(); ++k) {
      chunk_rows[k] = terms[k].chunk_buf + terms[k].rows->first_row[t] * Lp;
      std::fill(chunk_rows[k], terms[k].chunk_buf + terms[k].rows->first_row[t + 1] * Lp, T(0));
    }
  }
  const int64_t p0 = chunk_begin(N, pb.chunks, t), p1 = chunk_begin(N, pb.chunks, t + 1);
  for (int64_t p = p0; p < p1; ++p) {
    const T* u = pb.logits + (b * N + p) * Lp;
    for (int i = 0; i < nb; ++i) {
      acc[i] = load<T, kBytes>(u + i * W);
    }
    if (slice) {
      for (const Term<T>& k : terms) {
        const T s = k.slice_scale == nullptr ? k.slice_factor : k.slice_factor * k.slice_scale[p];
        if (k.compat_t == nullptr) {  // Potts: the message adds straight into the update
          slice_point<T, kBytes>(acc, nb, k, p, s, Lp);
          continue;
        }
        for (int i = 0; i < nb; ++i) {
          msg[i] = V{};
        }
        slice_point<T, kBytes>(msg, nb, k, p, s, Lp);
        for (int i = 0; i < nb; ++i) {
          store<T, kBytes>(scaled.data() + i * W, msg[i]);
        }
        for (int64_t l = 0; l < L; ++l) {  // acc -= M m = sum_l m_l M[:, l]
          const T* column = k.compat_t + l * Lp;
          const T ml = scaled[l];
          for (int i = 0; i < nb; ++i) {
            acc[i] -= ml * load<T, kBytes>(column + i * W);
          }
        }
      }
    }
    // softmax over the labels
    V mx = acc[0];
    for (int i = 1; i < nb; ++i) {
      mx = mx > acc[i] ? mx : acc[i];
    }
    T m = mx[0];
    for (int i = 1; i < W; ++i) {
      m = std::max(m, mx[i]);
    }
    for (int i = 0; i < nb; ++i) {
      acc[i] = exp_nonpositive<T, kBytes>(acc[i] - m);
    }
    acc[nb - 1] *= last_mask;
    V sum = acc[0];
    for (int i = 1; i < nb; ++i) {
      sum += acc[i];
    }
    T total = sum[0];
    for (int i = 1; i < W; ++i) {
      total += sum[i];
    }
    const T inv = T(1) / total;
    for (int i = 0; i < nb; ++i) {
      acc[i] *= inv;
    }
    if (out != nullptr) {
      T* o = out + b * L * N + p;
      for (int i = 0; i < nb; ++i) {
        for (int j = 0; j < (i < nb - 1 ? W : last); ++j) {
          o[(i * W + j) * N] = acc[i][j];
        }
      }
    }
    if (splat) {
      for (size_t ki = 0; ki < terms.size(); ++ki) {
        const Term<T>& k = terms[ki];
        const int32_t* rows = k.rows->splat_row.data() + p * k.d1;
        const T* w = k.weight + p * k.d1;
        const T s = k.splat_scale == nullptr ? T(1) : k.splat_scale[p];
        for (int j = 0; j < k.d1; ++j) {
          T* row = chunk_rows[ki] + int64_t(rows[j]) * Lp;
          const T wj = s * w[j];
          for (int i = 0; i < nb; ++i) {
            store<T, kBytes>(row + i * W, load<T, kBytes>(row + i * W) + wj * acc[i]);
          }
        }
      }
    }
  }
}

// Vertices [v0, v1) of term k's lattice = the sum of each vertex's chunk rows, in chunk order.
template <typename T, int kBytes>
FASTSEG_ALWAYS_INLINE void reduce_rows(const Term<T>& k, int64_t nb, int64_t v0, int64_t v1) {
  using V = typename Simd<T, kBytes>::V;
  constexpr int W = Simd<T, kBytes>::kLanes;
  const int64_t Lp = nb * W;
  const ChunkRows& cr = *k.rows;
  for (int64_t v = v0; v < v1; ++v) {
    T* dst = k.lattice + v * Lp;
    const int32_t r0 = cr.reduce_offsets[v], r1 = cr.reduce_offsets[v + 1];
    for (int64_t i = 0; i < nb; ++i) {
      V sum{};
      for (int32_t r = r0; r < r1; ++r) {
        sum += load<T, kBytes>(k.chunk_buf + int64_t(cr.reduce_rows[r]) * Lp + i * W);
      }
      store<T, kBytes>(dst + i * W, sum);
    }
  }
}

// Vertices [v0, v1) of one blur direction: out[v] = in[v] + 0.5 (in[n1] + in[n2]) (-1: no neighbour).
template <typename T, int kBytes>
FASTSEG_ALWAYS_INLINE void blur_rows(const T* in, T* out, const int32_t* neighbors, int64_t nb, int64_t v0,
                                     int64_t v1) {
  constexpr int W = Simd<T, kBytes>::kLanes;
  const int64_t Lp = nb * W;
  for (int64_t v = v0; v < v1; ++v) {
    const int32_t n1 = neighbors[2 * v], n2 = neighbors[2 * v + 1];
    const T* a = in + v * Lp;
    T* o = out + v * Lp;
    if (n1 >= 0 && n2 >= 0) {
      const T* p1 = in + int64_t(n1) * Lp;
      const T* p2 = in + int64_t(n2) * Lp;
      for (int64_t i = 0; i < nb; ++i) {
        store<T, kBytes>(o + i * W, load<T, kBytes>(a + i * W) +
                                        T(0.5) * (load<T, kBytes>(p1 + i * W) + load<T, kBytes>(p2 + i * W)));
      }
    } else if (n1 >= 0 || n2 >= 0) {
      const T* p1 = in + int64_t(n1 >= 0 ? n1 : n2) * Lp;
      for (int64_t i = 0; i < nb; ++i) {
        store<T, kBytes>(o + i * W, load<T, kBytes>(a + i * W) + T(0.5) * load<T, kBytes>(p1 + i * W));
      }
    } else {
      std::copy(a, a + Lp, o);
    }
  }
}

// The kernels of one target, as plain functions (the parallel loops call them through pointers).
struct Baseline {
  static constexpr int kBytes = 16;
  template <typename T, int kNB>
  static void chunk(const Problem<T>& pb, int64_t b, int64_t t, bool slice, bool splat, T* out) {
    chunk_pass<T, kBytes, kNB>(pb, b, t, slice, splat, out);
  }
  template <typename T>
  static void reduce(const Term<T>& k, int64_t nb, int64_t v0, int64_t v1) {
    reduce_rows<T, kBytes>(k, nb, v0, v1);
  }
  template <typename T>
  static void blur(const T* in, T* out, const int32_t* neighbors, int64_t nb, int64_t v0, int64_t v1) {
    blur_rows<T, kBytes>(in, out, neighbors, nb, v0, v1);
  }
};

#ifdef FASTSEG_HAVE_AVX2_TARGET
struct Avx2 {
  static constexpr int kBytes = 32;
  template <typename T, int kNB>
  FASTSEG_TARGET_AVX2 static void chunk(const Problem<T>& pb, int64_t b, int64_t t, bool slice, bool splat,
                                        T* out) {
    chunk_pass<T, kBytes, kNB>(pb, b, t, slice, splat, out);
  }
  template <typename T>
  FASTSEG_TARGET_AVX2 static void reduce(const Term<T>& k, int64_t nb, int64_t v0, int64_t v1) {
    reduce_rows<T, kBytes>(k, nb, v0, v1);
  }
  template <typename T>
  FASTSEG_TARGET_AVX2 static void blur(const T* in, T* out, const int32_t* neighbors, int64_t nb, int64_t v0,
                                       int64_t v1) {
    blur_rows<T, kBytes>(in, out, neighbors, nb, v0, v1);
  }
};
#endif

template <typename T>
struct Kernels {
  int lanes;
  void (*chunk)(const Problem<T>&, int64_t, int64_t, bool, bool, T*);
  void (*reduce)(const Term<T>&, int64_t, int64_t, int64_t);
  void (*blur)(const T*, T*, const int32_t*, int64_t, int64_t, int64_t);
};

// Rows of up to kMaxFixedVectors vectors get a kernel with the accumulators in registers.
constexpr int kMaxFixedVectors = 8;

template <typename T, typename Target, int kNB = 1>
void pick_chunk(Kernels<T>& k, int64_t nb) {
  if constexpr (kNB > kMaxFixedVectors) {
    k.chunk = &Target::template chunk<T, 0>;
  } else if (nb == kNB) {
    k.chunk = &Target::template chunk<T, kNB>;
  } else {
    pick_chunk<T, Target, kNB + 1>(k, nb);
  }
}

template <typename T, typename Target>
Kernels<T> kernels_of(int64_t L) {
  Kernels<T> k;
  k.lanes = Target::kBytes / static_cast<int>(sizeof(T));
  pick_chunk<T, Target>(k, (L + k.lanes - 1) / k.lanes);
  k.reduce = &Target::template reduce<T>;
  k.blur = &Target::template blur<T>;
  return k;
}

template <typename T>
Kernels<T> kernels_for(int64_t L) {
#ifdef FASTSEG_HAVE_AVX2_TARGET
  if (use_avx2()) {
    return kernels_of<T, Avx2>(L);
  }
#endif
  return kernels_of<T, Baseline>(L);
}

// --- the iterations -----------------------------------------------------------------------------------------

// fn(term, first, last) over the vertices of every lattice in `lattices`, in parallel, as one range: one
// parallel loop (one synchronisation) per step for all the terms and images.
template <typename T, typename Fn>
void for_vertices(const std::vector<Term<T>*>& lattices, int64_t work_per_vertex, const Fn& fn) {
  std::vector<int64_t> first(lattices.size() + 1, 0);
  for (size_t i = 0; i < lattices.size(); ++i) {
    first[i + 1] = first[i] + lattices[i]->M;
  }
  const int64_t block = grain_for(work_per_vertex);
  lattice::parallel_tasks((first.back() + block - 1) / block, [&](int64_t task) {
    const int64_t begin = task * block, end = std::min(first.back(), begin + block);
    for (size_t i = 0; i < lattices.size(); ++i) {
      const int64_t lo = std::max(begin, first[i]), hi = std::min(end, first[i + 1]);
      if (lo < hi) {
        fn(*lattices[i], lo - first[i], hi - first[i]);
      }
    }
  });
}

template <typename T>
void run(const Kernels<T>& kern, Problem<T>& pb, int64_t iterations, T* q) {
  std::vector<Term<T>*> lattices;
  int max_d1 = 0;
  for (std::vector<Term<T>>& image : pb.terms) {
    for (Term<T>& k : image) {
      lattices.push_back(&k);
      max_d1 = std::max(max_d1, k.d1);
    }
  }
  for (int64_t it = 0; it <= iterations; ++it) {
    const bool last = it == iterations;
    lattice::parallel_tasks(pb.B * pb.chunks, [&](int64_t task) {
      kern.chunk(pb, task / pb.chunks, task % pb.chunks, it > 0, !last, last ? q : nullptr);
    });
    if (last) {
      break;
    }
    for_vertices(lattices, 2 * pb.Lp, [&](const Term<T>& k, int64_t v0, int64_t v1) {
      kern.reduce(k, pb.nb, v0, v1);
    });
    for (int dir = 0; dir < max_d1; ++dir) {
      std::vector<Term<T>*> blurred;  // the lattices with a direction `dir`
      for (Term<T>* k : lattices) {
        if (dir < k->d1) {
          blurred.push_back(k);
        }
      }
      for_vertices(blurred, 3 * pb.Lp, [&](const Term<T>& k, int64_t v0, int64_t v1) {
        kern.blur(k.lattice, k.blur_tmp, k.neighbors + int64_t(dir) * k.Mmax * 2, pb.nb, v0, v1);
      });
      for (Term<T>* k : blurred) {
        std::swap(k->lattice, k->blur_tmp);
      }
    }
  }
}

// --- the normalisation ------------------------------------------------------------------------------------

// One image of one term's lattice, shared by every image of the batch that uses it: the chunk rows and the
// normalisation's per-point scales (empty: 1).
template <typename T>
struct LatticeImage {
  ChunkRows rows;
  std::vector<T> pre, post;
};

// filter(1) at every point of one lattice image (scalar splat, blur and slice, through the chunk rows: the
// same order of sums for any thread count), then the normalisation's scales.
template <typename T>
void normalize(LatticeImage<T>& li, Normalization mode, const int32_t* vertex, const T* weight,
               const int32_t* neighbors, int64_t Mmax, int64_t N, int d1, int64_t M, int64_t chunks) {
  if (mode == Normalization::kNone) {
    return;
  }
  const ChunkRows& cr = li.rows;
  std::vector<T> chunk_sums(static_cast<size_t>(cr.first_row[chunks]), T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* sums = chunk_sums.data() + cr.first_row[t];
      for (int64_t e = chunk_begin(N, chunks, t) * d1; e < chunk_begin(N, chunks, t + 1) * d1; ++e) {
        sums[cr.splat_row[e]] += weight[e];
      }
    }
  });
  std::vector<T> mass(static_cast<size_t>(M)), tmp(static_cast<size_t>(M));
  at::parallel_for(0, M, grain_for(4), [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      T sum = T(0);
      for (int32_t r = cr.reduce_offsets[v]; r < cr.reduce_offsets[v + 1]; ++r) {
        sum += chunk_sums[cr.reduce_rows[r]];
      }
      mass[v] = sum;
    }
  });
  for (int dir = 0; dir < d1; ++dir) {
    const int32_t* n = neighbors + int64_t(dir) * Mmax * 2;
    at::parallel_for(0, M, grain_for(3), [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) {
        const T side = (n[2 * v] >= 0 ? mass[n[2 * v]] : T(0)) + (n[2 * v + 1] >= 0 ? mass[n[2 * v + 1]] : T(0));
        tmp[v] = mass[v] + T(0.5) * side;
      }
    });
    mass.swap(tmp);
  }
  const T alpha = lattice::slice_alpha<T>(d1 - 1);
  std::vector<T> scale(static_cast<size_t>(N));
  at::parallel_for(0, N, grain_for(2 * d1), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T sum = T(0);
      for (int j = 0; j < d1; ++j) {
        sum += weight[p * d1 + j] * mass[vertex[p * d1 + j]];
      }
      scale[p] = normalization_scale(mode, alpha * sum);
    }
  });
  if (scales_before(mode)) {
    li.pre = scale;
  }
  if (scales_after(mode)) {
    li.post = std::move(scale);
  }
}

// --- the op -----------------------------------------------------------------------------------------------

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// logits [B, L, N] (any strides) as [B, N, Lp] rows of labels, -inf in the padding lanes; a tile of points
// at a time, so that each label's values are read sequentially.
template <typename T>
at::Tensor point_rows(const at::Tensor& logits, int64_t Lp) {
  constexpr int64_t kTile = 64;
  const int64_t B = logits.size(0), L = logits.size(1), N = logits.size(2);
  at::Tensor rows = at::empty({B, N, Lp}, logits.options());
  const T* src = logits.const_data_ptr<T>();
  const int64_t sb = logits.stride(0), sl = logits.stride(1), sn = logits.stride(2);
  T* dst = rows.mutable_data_ptr<T>();
  const int64_t tiles = (N + kTile - 1) / kTile;
  at::parallel_for(0, B * tiles, grain_for(kTile * Lp), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, p0 = (task % tiles) * kTile, p1 = std::min(N, p0 + kTile);
      T* tile = dst + (b * N + p0) * Lp;
      for (int64_t l = 0; l < L; ++l) {
        const T* x = src + b * sb + l * sl;
        for (int64_t p = p0; p < p1; ++p) {
          tile[(p - p0) * Lp + l] = x[p * sn];
        }
      }
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(tile + (p - p0) * Lp + L, tile + (p - p0 + 1) * Lp, -std::numeric_limits<T>::infinity());
      }
    }
  });
  return rows;
}

at::Tensor crf_mean_field_cpu(const at::Tensor& logits, at::TensorList splat_vertex, at::TensorList splat_weight,
                              at::TensorList blur_neighbors, at::TensorList num_vertices,
                              at::TensorList splat_offsets, at::TensorList splat_points,
                              at::TensorList splat_points_weight, const std::vector<std::string>& normalization,
                              at::ArrayRef<double> weight, const c10::List<std::optional<at::Tensor>>& compat,
                              int64_t iterations) {
  // The splat scatters through splat_vertex: the CSR (the CUDA kernel's gather) is checked, not read.
  const MeanFieldArgs args =
      check_mean_field_args(logits, splat_vertex, splat_weight, blur_neighbors, num_vertices, splat_offsets,
                            splat_points, splat_points_weight, normalization, weight, compat, iterations, at::kCPU);
  const int64_t B = args.B, L = args.L, N = args.N;
  const size_t K = args.terms.size();
  at::Tensor out = at::empty({B, L, N}, logits.options());
  if (out.numel() == 0) {
    return out;
  }
  std::vector<at::Tensor> keep;  // owns what the raw pointers below point into
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "ext_crf_mean_field_cpu", [&] {
    using T = scalar_t;
    const Kernels<T> kern = kernels_for<T>(L);
    Problem<T> pb;
    pb.B = B;
    pb.N = N;
    pb.L = L;
    pb.nb = (L + kern.lanes - 1) / kern.lanes;
    pb.Lp = pb.nb * kern.lanes;
    pb.chunks = num_chunks(N);
    pb.terms.resize(B);
    std::vector<std::vector<LatticeImage<T>>> lattice_images(K);
    const bool more = iterations > 0;
    for (size_t k = 0; k < K; ++k) {
      const lattice::TableShape& s = args.terms[k].shape;
      const at::Tensor sv = splat_vertex[k].contiguous(), sw = splat_weight[k].contiguous(),
                       bn = blur_neighbors[k].contiguous(), nv = num_vertices[k].cpu().contiguous();
      lattice::check_vertex_ids("crf_mean_field", s, sv, bn, nv);
      const Normalization mode = args.terms[k].mode;
      at::Tensor compat_t;
      if (args.terms[k].compat.defined()) {
        compat_t = at::zeros({L, pb.Lp}, logits.options());  // padded columns of M, as rows
        compat_t.narrow(1, 0, L).copy_(args.terms[k].compat.t());
      }
      keep.insert(keep.end(), {sv, sw, bn, nv, compat_t});
      const int d1 = static_cast<int>(s.d + 1);
      const int64_t* M = nv.const_data_ptr<int64_t>();
      lattice_images[k].resize(more ? s.B : 0);
      for (int64_t lb = 0; lb < s.B && more; ++lb) {
        LatticeImage<T>& li = lattice_images[k][lb];
        const int32_t* vertex = sv.const_data_ptr<int32_t>() + lb * N * d1;
        li.rows = make_chunk_rows(vertex, N, d1, M[lb], pb.chunks);
        normalize(li, mode, vertex, sw.const_data_ptr<T>() + lb * N * d1,
                  bn.const_data_ptr<int32_t>() + lb * d1 * s.Mmax * 2, s.Mmax, N, d1, M[lb], pb.chunks);
      }
      for (int64_t b = 0; b < B; ++b) {
        const int64_t lb = s.B == 1 ? 0 : b;
        Term<T> term{};
        term.d1 = d1;
        term.M = M[lb];
        term.vertex = sv.const_data_ptr<int32_t>() + lb * N * d1;
        term.weight = sw.const_data_ptr<T>() + lb * N * d1;
        term.neighbors = bn.const_data_ptr<int32_t>() + lb * d1 * s.Mmax * 2;
        term.Mmax = s.Mmax;
        if (more) {
          const LatticeImage<T>& li = lattice_images[k][lb];
          term.rows = &li.rows;
          term.splat_scale = li.pre.empty() ? nullptr : li.pre.data();
          term.slice_scale = li.post.empty() ? nullptr : li.post.data();
        }
        term.compat_t = data_or_null<T>(compat_t);
        term.slice_factor = lattice::slice_alpha<T>(static_cast<int>(s.d)) * static_cast<T>(args.terms[k].weight);
        pb.terms[b].push_back(term);
      }
    }
    // The lattice buffers: per image and term, the lattice, the blur's second buffer and the chunk rows.
    if (more) {
      int64_t rows = 0;
      for (int64_t b = 0; b < B; ++b) {
        for (const Term<T>& k : pb.terms[b]) {
          rows += 2 * k.M + k.rows->first_row[pb.chunks];
        }
      }
      at::Tensor buffers = at::empty({rows * pb.Lp}, logits.options());
      keep.push_back(buffers);
      T* next = buffers.mutable_data_ptr<T>();
      for (int64_t b = 0; b < B; ++b) {
        for (Term<T>& k : pb.terms[b]) {
          k.lattice = next;
          k.blur_tmp = k.lattice + k.M * pb.Lp;
          k.chunk_buf = k.blur_tmp + k.M * pb.Lp;
          next = k.chunk_buf + k.rows->first_row[pb.chunks] * pb.Lp;
        }
      }
    }
    const at::Tensor rows = point_rows<T>(logits, pb.Lp);
    pb.logits = rows.const_data_ptr<T>();
    run(kern, pb, iterations, out.mutable_data_ptr<T>());
  });
  return out;
}

}  // namespace
}  // namespace crf
}  // namespace fastseg

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("ext_crf_mean_field", &fastseg::crf::crf_mean_field_cpu);
}
