// The schemas of every fastseg C++ op, and the Python module fastseg._C.
//
// The kernels live beside their math (csrc/pool/{cpu,cuda}, csrc/lattice/{cpu,cuda}, csrc/crf/{cpu,cuda}) and register
// against these schemas with TORCH_LIBRARY_IMPL; fake (meta) implementations are registered from Python.
// Importing fastseg._C loads this shared library, which runs all the registrations.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#ifdef FASTSEG_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

// setup.py bakes in the build configuration; a build without these would report wrong facts.
#if !defined(FASTSEG_VERSION) || !defined(FASTSEG_TORCH_VERSION) || !defined(FASTSEG_CUDA_VERSION) || \
    !defined(FASTSEG_ARCH_LIST)
#error "FASTSEG_VERSION, FASTSEG_TORCH_VERSION, FASTSEG_CUDA_VERSION and FASTSEG_ARCH_LIST must be defined (setup.py)"
#endif

TORCH_LIBRARY(fastseg, m) {
  // Out-style: the caller allocates every output and the kernel writes all of it; (a!)/(b!) declare the
  // mutation so that functionalization and torch.compile treat the calls correctly.
  m.def(
      "ext_max_pool2d_out(Tensor x, Tensor(a!) out, Tensor(b!) argmax, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation) -> ()");
  m.def(
      "ext_max_pool2d_backward_out(Tensor grad_out, Tensor argmax, Tensor(a!) grad_in, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> ()");

  // The permutohedral lattice (csrc/lattice). ext_lattice_build turns features [B, d, N] (float32/float64, each
  // feature already divided by its standard deviation; 1 <= d <= 32) into these tables, one lattice per image,
  // padded over the batch to M = max(num_vertices); E = N * (d + 1):
  //   splat_vertex   int32 [B, N, d + 1]   the d + 1 simplex vertices of each point (ids 0..num_vertices[b]-1)
  //   splat_weight   features' dtype [B, N, d + 1]   their barycentric weights (each row sums to 1)
  //   blur_neighbors int32 [B, d + 1, M, 2]   per direction and vertex, the two neighbours' ids; -1 when absent
  //                                           and for padding vertices
  //   num_vertices   int64 [B]              vertices of each image's lattice
  //   splat_offsets  int32 [B, M + 1]       the splat as a CSR over vertices: vertex v's (point, weight) entries
  //   splat_points   int32 [B, E]           are splat_points[b, i] and splat_points_weight[b, i] for
  //   splat_points_weight  [B, E]           splat_offsets[b, v] <= i < splat_offsets[b, v + 1] (points
  //                                         ascending); padding vertices have empty rows
  // The CSR is the transpose of (splat_vertex, splat_weight): it makes the splat a gather (no atomics,
  // deterministic). Keys are int32: a build whose coordinates would overflow raises, naming the point. Vertex
  // numbering is the build's choice (the CPU build numbers them by first appearance); the filter does not
  // depend on it.
  m.def(
      "ext_lattice_build(Tensor features) -> (Tensor splat_vertex, Tensor splat_weight, Tensor blur_neighbors, "
      "Tensor num_vertices, Tensor splat_offsets, Tensor splat_points, Tensor splat_points_weight)");
  // values [B, C, N] (float32/float64, any strides; the weights must have its dtype) -> [B, C, N]: splat, blur
  // along directions 0..d with [0.5, 1, 0.5] (d..0 when reverse: the exact adjoint, for the backward), slice
  // with alpha = 1 / (1 + 2^-d). Each point's own contribution is included. The result is channels-innermost
  // (strides (N * C, 1, C)) when C > 1 and values.stride(1) == 1, else contiguous.
  m.def(
      "ext_lattice_filter(Tensor values, Tensor splat_vertex, Tensor splat_weight, Tensor blur_neighbors, "
      "Tensor num_vertices, Tensor splat_offsets, Tensor splat_points, Tensor splat_points_weight, bool reverse) "
      "-> Tensor");

  // Dense-CRF mean-field inference (csrc/crf: CPU and CUDA kernels), every iteration in one call; inference
  // only (no autograd: fastseg/ops/crf.py uses it when nothing requires grad). logits [B, L, N] (float32/float64,
  // any strides) and K pairwise terms, term k given by the seven lattice tables of ext_lattice_build over B or
  // 1 images (one image: the lattice serves the whole batch), splat_vertex[k] ... splat_points_weight[k] (the
  // weights in the logits' dtype; all on the logits' device, num_vertices also on the CPU), pydensecrf's
  // normalization[k] ("symmetric", "before", "after" or "none"), a weight[k] and compat[k] (None: Potts, or an
  // [L, L] matrix M_k of the logits' dtype and device). Returns the contiguous [B, L, N] marginals:
  // Q = softmax(logits), then `iterations` times
  //   m_k = weight_k * post_k * lattice_filter_k(pre_k * Q)
  //   Q = softmax over L of (logits + sum_{Potts k} m_k - sum_{matrix k} M_k m_k)
  // with n_k = lattice_filter_k(1): "symmetric" pre = post = 1 / sqrt(n_k + 1e-20), "before" pre = 1 / (n_k +
  // 1e-20), "after" post = 1 / (n_k + 1e-20) (absent scales are 1). As for ext_lattice_filter, the CPU kernel
  // splats by scattering through (splat_vertex, splat_weight) and only checks the CSR tables' shapes; the CUDA
  // kernel gathers through the CSR (no atomics: deterministic) and does not read num_vertices (no host
  // synchronisation), clamping every id into its padded table instead of validating it, so malformed tables
  // give wrong numbers there, never out-of-bounds accesses.
  m.def(
      "ext_crf_mean_field(Tensor logits, Tensor[] splat_vertex, Tensor[] splat_weight, Tensor[] blur_neighbors, "
      "Tensor[] num_vertices, Tensor[] splat_offsets, Tensor[] splat_points, Tensor[] splat_points_weight, "
      "str[] normalization, float[] weight, Tensor?[] compat, int iterations) -> Tensor");
}

namespace {

// "" -> None, "a;b" -> ["a", "b"]: setup.py passes the arch list ';'-separated.
py::object split_or_none(const std::string& s) {
  if (s.empty()) {
    return py::none();
  }
  py::list parts;
  size_t begin = 0;
  while (true) {
    const size_t end = s.find(';', begin);
    parts.append(s.substr(begin, end - begin));
    if (end == std::string::npos) {
      break;
    }
    begin = end + 1;
  }
  return parts;
}

py::dict build_info() {
  py::dict info;
  info["version"] = std::string(FASTSEG_VERSION);
  info["torch_version"] = std::string(FASTSEG_TORCH_VERSION);
  const std::string cuda_version = FASTSEG_CUDA_VERSION;
  info["cuda_version"] = cuda_version.empty() ? py::object(py::none()) : py::object(py::str(cuda_version));
  info["arch_list"] = split_or_none(FASTSEG_ARCH_LIST);
#ifdef FASTSEG_WITH_CUDA
  info["cuda_kernels"] = true;
#else
  info["cuda_kernels"] = false;
#endif
  return info;
}

// Queries the CUDA runtime directly (not torch.cuda) so that it reports what this extension's kernels will
// see. Without a driver or device cudaGetDeviceCount fails; that means "no devices", never an exception.
py::list cuda_device_query() {
  py::list devices;
#ifdef FASTSEG_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the error so later CUDA calls in this process do not see it
    return devices;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    py::dict d;
    d["name"] = std::string(prop.name);
    d["compute_capability"] = std::to_string(prop.major) + "." + std::to_string(prop.minor);
    d["multiprocessors"] = prop.multiProcessorCount;
    d["total_memory"] = static_cast<int64_t>(prop.totalGlobalMem);
    d["l2_cache"] = static_cast<int64_t>(prop.l2CacheSize);
    devices.append(d);
  }
#endif
  return devices;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastseg compiled kernels; the ops are registered as torch.ops.fastseg.*";
  m.def("build_info", &build_info,
        "Build configuration: version, torch_version, cuda_version (None for CPU-only), arch_list (None for "
        "CPU-only) and cuda_kernels.");
  m.def("cuda_device_query", &cuda_device_query,
        "Visible CUDA devices as dicts (name, compute_capability, multiprocessors, total_memory, l2_cache); [] "
        "when built without CUDA or when no device is usable.");
}
