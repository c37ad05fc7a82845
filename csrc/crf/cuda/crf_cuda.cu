// CUDA kernel of fastseg::ext_crf_mean_field: dense-CRF mean-field inference (pydensecrf's update) over
// permutohedral lattices, every iteration in one call; the twin of the CPU kernel (csrc/crf/cpu/crf_cpu.cpp),
// with the schema's semantics (csrc/fastseg.cpp):
//   Q0 = softmax(logits);  then `iterations` times
//   m_k = w_k post_k filter_k(pre_k Q)     (filter_k: splat, blur, slice of lattice k)
//   Q   = softmax over labels of (logits + sum_{Potts k} m_k - sum_{matrix k} M_k m_k)
//
// Q stays on the device as points-major rows [B, N, L] in the accumulation type; each iteration is a fixed
// sequence of launches on the current stream, with no host synchronisation:
// - per term, a splat that gathers pre_k Q through the CSR of the lattice tables, its rows cut into chunks so
//   that a photograph's long rows do not serialise it (lattice/cuda/passes.cuh: two launches; consecutive
//   threads take consecutive channels, so the [*, C] rows coalesce; no atomics: deterministic), then d + 1
//   blur passes along directions 0..d, ping-ponging between the term's lattice and
//   a scratch buffer that the terms share (the splat starts in whichever buffer makes the last pass land in
//   the term's own). A lattice of one image serving a batch of B folds the batch into the channels
//   (C = B L): one pass serves every image;
// - matrix terms, and Potts terms beyond the first kMaxFusedTerms, are sliced into a message buffer before the
//   update (a matrix term through a buffer of its own, since M_k m_k needs all of a point's labels of m_k);
//   the first term to write it stores, the later ones add (deterministic);
// - one update kernel: a group of G lanes per point (G: the power of two >= L, at most 32, so a group never
//   straddles a warp) slices the fused Potts terms straight from their lattices, adds the logits and the
//   message buffer, and takes the softmax over the labels (max-subtracted, as the CPU) with shuffles,
//   writing Q in place (the splats, earlier on the stream, have read it).
// The normalisations n_k = filter_k(1) are computed once per call by the same splat and blur kernels.
// Launches per iteration: per term 2 + (d + 1), 2 more per matrix term and 1 per Potts term beyond
// kMaxFusedTerms, and the update (dense_crf's two Potts terms, d = 2 and 5: 14).
// Device memory per call: Q and the logits as rows ([B, N, L] each; the logits' rows
// are a view when they already are points-major), per term a lattice [B_k, M_k, (B / B_k) L] and its scale
// [B_k, N], one scratch lattice of the largest size, and, with matrix terms or more Potts terms than fused, two
// message buffers [B, N, L].
//
// Padding vertices (>= num_vertices) have empty CSR rows and no neighbours, so they stay 0 and no valid table
// refers to them: the kernels never read num_vertices (no host synchronisation). Ids are not validated on the
// device; every id is clamped into its padded table (as lattice_cuda.cu does), so malformed tables give wrong
// numbers, never out-of-bounds accesses. The host checks (crf_args.h) are the CPU kernel's.
//
// NOT RUN YET ON A GPU: written and compiled without one. tests/test_cuda_emulation.py runs this file on the
// CPU (tests/cuda_emulation: each thread a fiber, the shuffles between a warp's fibers) against the CPU kernel,
// also under AddressSanitizer; races, the memory model and speed are the GPU tests' (tests/test_crf_fused.py,
// -m gpu: this kernel against the CPU kernel and the torch loop).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "crf/crf_args.h"
#include "crf/crf_math.h"
#include "lattice/cuda/passes.cuh"
#include "lattice/lattice_math.h"

namespace fastseg {
namespace crf {
namespace {

constexpr int kThreads = lattice::kPassThreads;  // a multiple of the warp size: the update's groups tile whole warps
constexpr int kWarp = 32;
// Potts terms whose slice the update kernel does itself (the common CRF has two terms); their views travel
// in the kernel's parameters.
constexpr int kMaxFusedTerms = 4;

__device__ __forceinline__ int64_t clamp_id(int64_t id, int64_t size) {
  return min(max(id, int64_t(0)), size - 1);
}

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

// filter(1) at every point (the blurred splat of ones, ones [Bk, M], sliced) -> the normalisation's per-point
// scale [Bk, N].
template <typename scalar_t, typename acc_t>
__global__ void normalization_kernel(const acc_t* __restrict__ ones, const int32_t* __restrict__ vertex,
                                     const scalar_t* __restrict__ weight, int d1, int64_t Bk, int64_t M, int64_t N,
                                     acc_t alpha, Normalization mode, acc_t* __restrict__ scale) {
  const int64_t total = Bk * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t lb = i / N;
    const int32_t* vtx = vertex + i * d1;
    const scalar_t* w = weight + i * d1;
    acc_t sum = acc_t(0);
    for (int j = 0; j < d1; ++j) {
      sum += static_cast<acc_t>(w[j]) * ones[lb * M + clamp_id(vtx[j], M)];
    }
    scale[i] = normalization_scale(mode, alpha * sum);
  }
}

// One term's blurred lattice as the slices read it.
template <typename scalar_t, typename acc_t>
struct TermView {
  const int32_t* vertex;    // [Bk, N, d1]
  const scalar_t* weight;   // [Bk, N, d1]
  const acc_t* lattice;     // [Bk, M, folded * L]
  const acc_t* post;        // [Bk, N], or nullptr: 1
  acc_t factor;             // the slice's alpha times the term's weight
  int d1;
  int64_t M, folded;
};

// m_k at label l of point p of image b: factor post[lb, p] sum_j weight[lb, p, j] lattice[lb, vertex[lb, p, j],
// (b - lb folded) L + l] with lb = b / folded.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t slice_at(const TermView<scalar_t, acc_t>& t, int64_t b, int64_t p, int64_t l,
                                          int64_t N, int64_t L) {
  const int64_t lb = b / t.folded;
  const int64_t point = lb * N + p;
  const int64_t C = t.folded * L;
  const int32_t* vtx = t.vertex + point * t.d1;
  const scalar_t* w = t.weight + point * t.d1;
  const acc_t* column = t.lattice + lb * t.M * C + (b - lb * t.folded) * L + l;
  acc_t sum = acc_t(0);
  for (int j = 0; j < t.d1; ++j) {
    sum += static_cast<acc_t>(w[j]) * column[clamp_id(vtx[j], t.M) * C];
  }
  return (t.post == nullptr ? t.factor : t.factor * t.post[point]) * sum;
}

// out[b, p, l] = m_k (+ out[b, p, l] when accumulate).
template <typename scalar_t, typename acc_t>
__global__ void slice_kernel(const TermView<scalar_t, acc_t> t, int64_t B, int64_t N, int64_t L, bool accumulate,
                             acc_t* __restrict__ out) {
  const int64_t total = B * N * L;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = i % L;
    const int64_t p = (i / L) % N;
    const int64_t b = i / (L * N);
    const acc_t m = slice_at(t, b, p, l, N, L);
    out[i] = accumulate ? out[i] + m : m;
  }
}

// msg[b, p, l] = (msg[b, p, l] when accumulate) - sum_j M[l, j] m[b, p, j], from compat_t = M transposed
// ([L, L]: consecutive threads read consecutive entries).
template <typename scalar_t, typename acc_t>
__global__ void compat_kernel(const scalar_t* __restrict__ compat_t, const acc_t* __restrict__ m, int64_t rows,
                              int64_t L, bool accumulate, acc_t* __restrict__ msg) {
  const int64_t total = rows * L;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = i % L;
    const acc_t* row = m + (i - l);
    acc_t product = acc_t(0);
    for (int64_t j = 0; j < L; ++j) {
      product += static_cast<acc_t>(compat_t[j * L + l]) * row[j];
    }
    msg[i] = accumulate ? msg[i] - product : -product;
  }
}

template <typename scalar_t, typename acc_t>
struct UpdateArgs {
  const scalar_t* logits;  // [B, N, L]
  const acc_t* msg;        // [B, N, L], or nullptr: no message but the fused terms'
  TermView<scalar_t, acc_t> fused[kMaxFusedTerms];
  int num_fused;
  int group;  // G lanes per point
  int64_t B, N, L;
  acc_t* q;  // [B, N, L]
};

// logits + msg + the fused Potts terms' messages at label l of point p of image b (row = (b N + p) L).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t update_input(const UpdateArgs<scalar_t, acc_t>& a, int64_t b, int64_t p,
                                              int64_t row, int64_t l) {
  acc_t t = static_cast<acc_t>(a.logits[row + l]);
  if (a.msg != nullptr) {
    t += a.msg[row + l];
  }
#pragma unroll
  for (int k = 0; k < kMaxFusedTerms; ++k) {  // unrolled: the parameter array is indexed by constants
    if (k < a.num_fused) {
      t += slice_at(a.fused[k], b, p, l, a.N, a.L);
    }
  }
  return t;
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_max(acc_t v, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, v, offset, group);
    v = other > v ? other : v;
  }
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, group);
  }
  return v;
}

// Q = softmax over the labels of update_input, a group of G lanes per point, lane i taking labels i, i + G, ...
// kSlots > 0: those labels (at most kSlots) stay in registers; 0 (more labels): the point's row of q holds
// the inputs, then their exponentials, each lane reading back only its own writes.
template <typename scalar_t, typename acc_t, int kSlots>
__global__ void __launch_bounds__(kThreads) update_kernel(const UpdateArgs<scalar_t, acc_t> a) {
  const int group = a.group;
  const int lane = threadIdx.x % group;
  const int64_t groups_per_warp = kWarp / group;
  const int64_t group_in_warp = (threadIdx.x % kWarp) / group;
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int64_t warps = gridDim.x * int64_t(blockDim.x) / kWarp;
  const int64_t total = a.B * a.N;
  const acc_t lowest = acc_t(-INFINITY);
  // Warp-uniform loop (every lane of a warp takes part in the shuffles): groups past the end take part
  // with nothing and write nothing.
  for (int64_t first = warp * groups_per_warp; first < total; first += warps * groups_per_warp) {
    const int64_t g = first + group_in_warp;
    const bool active = g < total;
    const int64_t b = active ? g / a.N : 0, p = active ? g % a.N : 0;
    const int64_t row = (b * a.N + p) * a.L;
    acc_t mx = lowest;
    acc_t sum = acc_t(0);
    if constexpr (kSlots > 0) {
      acc_t t[kSlots];
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t l = lane + int64_t(s) * group;
        t[s] = active && l < a.L ? update_input(a, b, p, row, l) : lowest;
        mx = t[s] > mx ? t[s] : mx;
      }
      mx = group_max(mx, group);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t l = lane + int64_t(s) * group;
        t[s] = active && l < a.L ? exp_of(t[s] - mx) : acc_t(0);
        sum += t[s];
      }
      const acc_t inv = acc_t(1) / group_sum(sum, group);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t l = lane + int64_t(s) * group;
        if (active && l < a.L) {
          a.q[row + l] = t[s] * inv;
        }
      }
    } else {
      for (int64_t l = lane; active && l < a.L; l += group) {
        const acc_t t = update_input(a, b, p, row, l);
        a.q[row + l] = t;
        mx = t > mx ? t : mx;
      }
      mx = group_max(mx, group);
      for (int64_t l = lane; active && l < a.L; l += group) {
        const acc_t e = exp_of(a.q[row + l] - mx);
        a.q[row + l] = e;
        sum += e;
      }
      const acc_t inv = acc_t(1) / group_sum(sum, group);
      for (int64_t l = lane; active && l < a.L; l += group) {
        a.q[row + l] *= inv;
      }
    }
  }
}

// Grid sizes for the grid-stride loops, and the stream.
struct Launch {
  int64_t max_blocks;
  cudaStream_t stream;

  unsigned int grid(int64_t items) const { return lattice::pass_grid(items, max_blocks); }
};

// One term on the device: its tables, its lattice buffer and its normalisation.
template <typename scalar_t, typename acc_t>
struct Term {
  at::Tensor splat_vertex, splat_weight, blur_neighbors, splat_offsets, splat_points, splat_points_weight;
  at::Tensor compat_t;  // M_k transposed, or undefined: Potts
  at::Tensor lattice;   // [Bk, Mmax, C]
  at::Tensor scale;     // the normalisation's [Bk, N], or undefined
  lattice::SplatChunks chunks;  // the splat's rows in chunks (lattice/cuda/passes.cuh)
  int64_t Bk, Mmax, folded, C;
  int d;
  const acc_t* pre;
  TermView<scalar_t, acc_t> view;
};

// splat, then blur along 0..d: `values` ([B, N, L] rows, or nullptr: ones with one channel) times pre through
// term t's lattice, into t.lattice; `scratch` holds at least as many values, `partial` the splat's chunk sums.
template <typename scalar_t, typename acc_t>
void lattice_pass(const Launch& launch, const Term<scalar_t, acc_t>& t, const acc_t* values, const acc_t* pre,
                  int64_t N, int64_t L, acc_t* scratch, acc_t* partial) {
  const int d1 = t.d + 1;
  const int64_t C = values == nullptr ? 1 : t.C;
  const int64_t items = t.Bk * t.Mmax * C;
  acc_t* buffers[2] = {t.lattice.template mutable_data_ptr<acc_t>(), scratch};
  int in = d1 % 2;  // each blur pass moves to the other buffer: the last one lands in the term's lattice
  const lattice::SplatSource<acc_t, scalar_t, acc_t> source{values,
                                                            pre,
                                                            t.splat_offsets.template const_data_ptr<int32_t>(),
                                                            t.splat_points.template const_data_ptr<int32_t>(),
                                                            t.splat_points_weight.template const_data_ptr<scalar_t>(),
                                                            N,
                                                            N * d1,
                                                            values == nullptr ? 1 : L,
                                                            C,
                                                            t.folded};
  lattice::splat(source, t.chunks, t.Bk, t.Mmax, partial, buffers[in], launch.max_blocks, launch.stream);
  for (int dir = 0; dir < d1; ++dir) {
    lattice::blur_kernel<acc_t><<<launch.grid(items), kThreads, 0, launch.stream>>>(
        buffers[in], t.blur_neighbors.template const_data_ptr<int32_t>(), dir, d1, t.Bk, t.Mmax, C,
        buffers[1 - in]);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    in = 1 - in;
  }
}

// The update's instantiation for L labels: groups of G lanes, kSlots labels per lane in registers (0: more).
template <typename scalar_t, typename acc_t>
void launch_update(const Launch& launch, const UpdateArgs<scalar_t, acc_t>& a) {
  const int64_t items = a.B * a.N * a.group;
  const int64_t slots = (a.L + a.group - 1) / a.group;
  const unsigned int grid = launch.grid(items);
  if (slots <= 1) {
    update_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, launch.stream>>>(a);
  } else if (slots <= 2) {
    update_kernel<scalar_t, acc_t, 2><<<grid, kThreads, 0, launch.stream>>>(a);
  } else if (slots <= 4) {
    update_kernel<scalar_t, acc_t, 4><<<grid, kThreads, 0, launch.stream>>>(a);
  } else {
    update_kernel<scalar_t, acc_t, 0><<<grid, kThreads, 0, launch.stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void mean_field(const MeanFieldArgs& args, const at::Tensor& logits, at::TensorList splat_vertex,
                at::TensorList splat_weight, at::TensorList blur_neighbors, at::TensorList splat_offsets,
                at::TensorList splat_points, at::TensorList splat_points_weight, int64_t iterations,
                const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = args.B, L = args.L, N = args.N;
  const auto acc_options = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const Launch launch{lattice::pass_max_blocks(), c10::cuda::getCurrentCUDAStream().stream()};

  const at::Tensor rows = logits.transpose(1, 2).contiguous();  // [B, N, L]
  at::Tensor q = at::empty({B, N, L}, acc_options);
  UpdateArgs<scalar_t, acc_t> update{};
  update.logits = rows.const_data_ptr<scalar_t>();
  update.group = 1;  // the power of two >= L, at most a warp
  while (update.group < kWarp && update.group < L) {
    update.group *= 2;
  }
  update.B = B;
  update.N = N;
  update.L = L;
  update.q = q.mutable_data_ptr<acc_t>();
  launch_update(launch, update);  // Q0 = softmax(logits)

  if (iterations > 0 && !args.terms.empty()) {
    std::vector<Term<scalar_t, acc_t>> terms(args.terms.size());
    int64_t scratch_size = 0, partial_size = 0;
    for (size_t k = 0; k < terms.size(); ++k) {
      const TermArgs& ta = args.terms[k];
      Term<scalar_t, acc_t>& t = terms[k];
      t.splat_vertex = splat_vertex[k].contiguous();
      t.splat_weight = splat_weight[k].contiguous();
      t.blur_neighbors = blur_neighbors[k].contiguous();
      t.splat_offsets = splat_offsets[k].contiguous();
      t.splat_points = splat_points[k].contiguous();
      t.splat_points_weight = splat_points_weight[k].contiguous();
      t.Bk = ta.shape.B;
      t.Mmax = ta.shape.Mmax;
      t.d = static_cast<int>(ta.shape.d);
      t.folded = B / t.Bk;
      t.C = t.folded * L;
      t.lattice = at::empty({t.Bk, t.Mmax, t.C}, acc_options);
      scratch_size = std::max(scratch_size, t.lattice.numel());
      t.chunks = lattice::make_splat_chunks(t.splat_offsets, t.Bk, t.Mmax, N * (t.d + 1), launch.max_blocks,
                                            launch.stream);
      partial_size = std::max(partial_size, t.Bk * t.chunks.S * t.C);
      if (ta.compat.defined()) {
        t.compat_t = ta.compat.t().contiguous();
      }
    }
    at::Tensor scratch = at::empty({scratch_size}, acc_options);
    at::Tensor partial = at::empty({partial_size}, acc_options);
    // The normalisations: filter(1) through the term's lattice (one channel), sliced into the per-point scale.
    for (size_t k = 0; k < terms.size(); ++k) {
      Term<scalar_t, acc_t>& t = terms[k];
      const Normalization mode = args.terms[k].mode;
      t.pre = nullptr;
      const acc_t* post = nullptr;
      if (mode != Normalization::kNone) {
        lattice_pass<scalar_t, acc_t>(launch, t, nullptr, nullptr, N, L, scratch.mutable_data_ptr<acc_t>(),
                                      partial.mutable_data_ptr<acc_t>());
        t.scale = at::empty({t.Bk, N}, acc_options);
        normalization_kernel<scalar_t, acc_t><<<launch.grid(t.Bk * N), kThreads, 0, launch.stream>>>(
            t.lattice.template const_data_ptr<acc_t>(), t.splat_vertex.template const_data_ptr<int32_t>(),
            t.splat_weight.template const_data_ptr<scalar_t>(), t.d + 1, t.Bk, t.Mmax, N,
            lattice::slice_alpha<acc_t>(t.d), mode, t.scale.template mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        t.pre = scales_before(mode) ? t.scale.template const_data_ptr<acc_t>() : nullptr;
        post = scales_after(mode) ? t.scale.template const_data_ptr<acc_t>() : nullptr;
      }
      t.view = TermView<scalar_t, acc_t>{t.splat_vertex.template const_data_ptr<int32_t>(),
                                         t.splat_weight.template const_data_ptr<scalar_t>(),
                                         t.lattice.template const_data_ptr<acc_t>(),
                                         post,
                                         lattice::slice_alpha<acc_t>(t.d) * static_cast<acc_t>(args.terms[k].weight),
                                         t.d + 1,
                                         t.Mmax,
                                         t.folded};
    }
    // Which terms the update slices itself: the first kMaxFusedTerms Potts terms; the others go through msg.
    std::vector<bool> fused(terms.size(), false);
    for (size_t k = 0; k < terms.size() && update.num_fused < kMaxFusedTerms; ++k) {
      if (!terms[k].compat_t.defined()) {
        fused[k] = true;
        update.fused[update.num_fused++] = terms[k].view;
      }
    }
    // The message buffer of the terms not fused, and the message of one matrix term at a time.
    at::Tensor msg, matrix_msg;
    if (std::find(fused.begin(), fused.end(), false) != fused.end()) {
      msg = at::empty({B, N, L}, acc_options);
    }
    if (std::any_of(terms.begin(), terms.end(), [](const Term<scalar_t, acc_t>& t) { return t.compat_t.defined(); })) {
      matrix_msg = at::empty({B, N, L}, acc_options);
    }
    for (int64_t it = 0; it < iterations; ++it) {
      for (const Term<scalar_t, acc_t>& t : terms) {
        lattice_pass<scalar_t, acc_t>(launch, t, update.q, t.pre, N, L, scratch.mutable_data_ptr<acc_t>(),
                                      partial.mutable_data_ptr<acc_t>());
      }
      bool msg_written = false;
      for (size_t k = 0; k < terms.size(); ++k) {
        if (fused[k]) {
          continue;
        }
        const Term<scalar_t, acc_t>& t = terms[k];
        const unsigned int grid = launch.grid(B * N * L);
        if (!t.compat_t.defined()) {
          slice_kernel<scalar_t, acc_t><<<grid, kThreads, 0, launch.stream>>>(t.view, B, N, L, msg_written,
                                                                            msg.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          slice_kernel<scalar_t, acc_t><<<grid, kThreads, 0, launch.stream>>>(t.view, B, N, L, false,
                                                                            matrix_msg.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          compat_kernel<scalar_t, acc_t><<<grid, kThreads, 0, launch.stream>>>(
              t.compat_t.template const_data_ptr<scalar_t>(), matrix_msg.const_data_ptr<acc_t>(), B * N, L,
              msg_written, msg.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        msg_written = true;
      }
      update.msg = msg_written ? msg.const_data_ptr<acc_t>() : nullptr;
      launch_update(launch, update);
    }
  }
  out.copy_(q.transpose(1, 2));
}

at::Tensor crf_mean_field_cuda(const at::Tensor& logits, at::TensorList splat_vertex, at::TensorList splat_weight,
                               at::TensorList blur_neighbors, at::TensorList num_vertices,
                               at::TensorList splat_offsets, at::TensorList splat_points,
                               at::TensorList splat_points_weight, const std::vector<std::string>& normalization,
                               at::ArrayRef<double> weight, const c10::List<std::optional<at::Tensor>>& compat,
                               int64_t iterations) {
  const MeanFieldArgs args =
      check_mean_field_args(logits, splat_vertex, splat_weight, blur_neighbors, num_vertices, splat_offsets,
                            splat_points, splat_points_weight, normalization, weight, compat, iterations, at::kCUDA);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor out = at::empty({args.B, args.L, args.N}, logits.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "ext_crf_mean_field_cuda", [&] {
    mean_field<scalar_t>(args, logits, splat_vertex, splat_weight, blur_neighbors, splat_offsets, splat_points,
                         splat_points_weight, iterations, out);
  });
  return out;
}

}  // namespace
}  // namespace crf
}  // namespace fastseg

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("ext_crf_mean_field", &fastseg::crf::crf_mean_field_cuda);
}
