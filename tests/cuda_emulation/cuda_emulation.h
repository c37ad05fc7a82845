// Runs fastseg's CUDA sources on the CPU, for the tests (tests/cuda_emulation/build.py; tests/test_cuda_emulation.py).
//
// build.py compiles each .cu file as C++ with this header force-included, after a few textual rewrites: a
// launch `kernel<<<grid, block, shared, stream>>>(args)` becomes `fastseg_emu::launch(fastseg_emu::Config{grid,
// block, shared, stream}, kernel, args)`, `c10::cuda::` becomes `fastseg_emu::`, the CUDA headers go, and the
// kernels register for CPU tensors under the op namespace fastseg_cuda_emu. So the host code (allocation sizes,
// strides, the order of the passes, the launch configurations) and every kernel run as written, on CPU tensors.
//
// Each CUDA thread is a fiber (ucontext) with its own threadIdx / blockIdx; the fibers of a block run one at a
// time, each until it ends or reaches a warp shuffle, where it waits for the other 31 lanes of its warp (the
// shuffles need all 32 lanes, as __shfl_xor_sync with a full mask does on the GPU). Atomics are plain
// read-modify-writes (one fiber runs at a time). What this cannot show: races between threads (one order of
// the threads is tried, never an interleaving within a step), the device's memory model, warp divergence, and
// speed. It has no shared memory or __syncthreads: fastseg's kernels use neither (a kernel that did would not
// compile here).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned int x_, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}  // NOLINT: as CUDA's
};

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

// The built-in variables: set by the fiber scheduler before each fiber runs.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fastseg_emu {

// Multiprocessors the emulated device reports: few, so that the kernels' grid-stride loops wrap around.
constexpr int kMultiprocessors = 1;
constexpr int kWarpSize = 32;
constexpr size_t kFiberStack = 256 * 1024;

struct Config {
  dim3 grid, block;
  size_t shared = 0;
  cudaStream_t stream = nullptr;
};

struct Stream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }  // NOLINT: as c10::cuda::CUDAStream converts
};

inline Stream getCurrentCUDAStream() { return {}; }
inline int8_t current_device() { return 0; }

struct CUDAGuard {
  template <typename T>
  explicit CUDAGuard(const T&) {}
};

// --- the fiber scheduler ---------------------------------------------------------------------------------

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 thread;
  bool done = false;
  int64_t shuffles = 0;  // warp shuffles this fiber has taken part in
};

// Per warp, two alternating exchange slots: a lane can reach shuffle k + 2 only after every lane has left
// shuffle k (they all had to arrive at k + 1 first), so slot k % 2 is free again by then.
struct WarpExchange {
  uint64_t value[2][kWarpSize];
  int arrived[2] = {0, 0};
  int left[2] = {0, 0};
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<WarpExchange> warps;
  size_t current = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;  // the first exception a thread threw: rethrown once the grid has run
};

inline Block*& active_block() {
  static Block* block = nullptr;
  return block;
}

inline void fiber_main() {
  Block* block = active_block();
  try {
    (*block->body)();
  } catch (...) {  // an exception must not unwind past the fiber's first frame
    if (!block->error) {
      block->error = std::current_exception();
    }
  }
  block->fibers[block->current].done = true;
  swapcontext(&block->fibers[block->current].context, &block->scheduler);
}

inline void yield_to_scheduler() {
  Block* block = active_block();
  swapcontext(&block->fibers[block->current].context, &block->scheduler);
}

// Runs body once per thread of the grid, each thread a fiber of its block.
inline void run_grid(const Config& config, const std::function<void()>& body) {
  if (config.shared != 0) {
    throw std::runtime_error("cuda emulation: dynamic shared memory is not emulated");
  }
  const unsigned int threads = config.block.x * config.block.y * config.block.z;
  if (threads == 0 || threads > 1024 || config.grid.x == 0 || config.grid.y == 0 || config.grid.z == 0 ||
      config.grid.y > 65535 || config.grid.z > 65535) {
    throw std::runtime_error("cuda emulation: invalid launch configuration");
  }
  Block block;
  block.body = &body;
  block.fibers.resize(threads);
  for (Fiber& f : block.fibers) {
    f.stack.reset(new char[kFiberStack]);
  }
  block.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  active_block() = &block;
  gridDim = config.grid;
  blockDim = config.block;
  for (unsigned int bz = 0; bz < config.grid.z; ++bz) {
    for (unsigned int by = 0; by < config.grid.y; ++by) {
      for (unsigned int bx = 0; bx < config.grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        for (unsigned int t = 0; t < threads; ++t) {
          Fiber& f = block.fibers[t];
          f.thread = dim3(t % config.block.x, (t / config.block.x) % config.block.y,
                          t / (config.block.x * config.block.y));
          f.done = false;
          f.shuffles = 0;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kFiberStack;
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_main, 0);
        }
        for (WarpExchange& w : block.warps) {
          w = WarpExchange{};
        }
        // Round robin until every fiber has ended; a round in which none ends or moves on is a deadlock
        // (a shuffle some lanes of the warp never reach).
        size_t remaining = threads;
        while (remaining > 0) {
          size_t progressed = 0;
          for (size_t t = 0; t < threads; ++t) {
            Fiber& f = block.fibers[t];
            if (f.done) {
              continue;
            }
            const int64_t before = f.shuffles;
            block.current = t;
            threadIdx = f.thread;
            swapcontext(&block.scheduler, &f.context);
            if (f.done) {
              --remaining;
              ++progressed;
            } else if (f.shuffles != before) {
              ++progressed;
            }
          }
          if (remaining > 0 && progressed == 0) {
            active_block() = nullptr;
            if (block.error) {  // a thread that threw never reaches the shuffle its warp waits at
              std::rethrow_exception(block.error);
            }
            throw std::runtime_error("cuda emulation: deadlock (a warp shuffle that not every lane reaches)");
          }
        }
      }
    }
  }
  active_block() = nullptr;
  if (block.error) {
    std::rethrow_exception(block.error);
  }
}

template <typename Kernel, typename... Args>
void launch(const Config& config, Kernel kernel, Args... args) {
  const std::function<void()> body = [&] { kernel(args...); };
  run_grid(config, body);
}

}  // namespace fastseg_emu

// --- device functions ------------------------------------------------------------------------------------

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) {
    *address = value;
  }
  return old;
}

template <typename T>
inline T atomicMin(T* address, T value) {
  const T old = *address;
  *address = value < old ? value : old;
  return old;
}

template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// __shfl_xor_sync(mask, v, lane_mask, width): lane l receives lane (l ^ lane_mask)'s v, within its group of
// `width` lanes (a source in a later group gives l its own v, as CUDA documents). Every lane of the warp must
// take part (the kernels pass a full mask).
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = fastseg_emu::kWarpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "shuffle of a 1-8 byte value");
  if (mask != 0xffffffffu) {
    throw std::runtime_error("cuda emulation: only full-warp shuffles are emulated");
  }
  using fastseg_emu::kWarpSize;
  fastseg_emu::Block* block = fastseg_emu::active_block();
  fastseg_emu::Fiber& self = block->fibers[block->current];
  const unsigned int linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int lane = static_cast<int>(linear % kWarpSize);
  fastseg_emu::WarpExchange& warp = block->warps[linear / kWarpSize];
  const int slot = static_cast<int>(self.shuffles % 2);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  warp.value[slot][lane] = bits;
  ++warp.arrived[slot];
  ++self.shuffles;
  while (warp.arrived[slot] < kWarpSize) {
    fastseg_emu::yield_to_scheduler();
  }
  const int group_start = lane - lane % width;
  const int source = lane ^ lane_mask;
  T result = v;
  if (source < group_start + width) {
    std::memcpy(&result, &warp.value[slot][source], sizeof(T));
  }
  if (++warp.left[slot] == kWarpSize) {
    warp.arrived[slot] = 0;
    warp.left[slot] = 0;
  }
  return result;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) {
    throw std::runtime_error("cuda emulation: device attribute not emulated");
  }
  *value = fastseg_emu::kMultiprocessors;
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
