// The schemas of every fastseg C++ op, and the Python module fastseg._C.
//
// The kernels live beside their math (csrc/pool/cpu, csrc/pool/cuda) and register against these schemas
// with TORCH_LIBRARY_IMPL; fake (meta) implementations are registered from Python. Importing fastseg._C
// loads this shared library, which runs all the registrations.
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
