// Which SIMD target the CPU kernels run: setup.py compiles for the baseline (SSE2 on x86-64, NEON on arm64),
// and the kernels whose loops gain from wider vectors exist a second time, compiled for AVX2 and FMA on
// x86-64 (FASTSEG_TARGET_AVX2 on the function whose loops should use them; a lambda or a function it calls
// without inlining is compiled for the baseline again, so such kernels are plain functions called through
// pointers, and their helpers FASTSEG_ALWAYS_INLINE; parallel_rows does this for a kernel object).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <cstdint>

#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTSEG_HAVE_AVX2_TARGET 1
#define FASTSEG_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

#define FASTSEG_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastseg {

// Whether to run the AVX2 kernels: torch's CPU capability says so (ATEN_CPU_CAPABILITY=default lowers it to
// the baseline, as for torch's own kernels, which is how the tests reach the baseline kernels), and the CPU
// itself has AVX2 and FMA.
inline bool use_avx2() {
#ifdef FASTSEG_HAVE_AVX2_TARGET
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

template <typename Kernel>
void kernel_rows_baseline(const Kernel& kernel, int64_t begin, int64_t end) {
  kernel.rows(begin, end);
}

#ifdef FASTSEG_HAVE_AVX2_TARGET
template <typename Kernel>
FASTSEG_TARGET_AVX2 void kernel_rows_avx2(const Kernel& kernel, int64_t begin, int64_t end) {
  kernel.rows(begin, end);
}
#endif

// kernel.rows(begin, end) over 0 .. rows - 1 split by at::parallel_for, compiled for the target use_avx2()
// picks: Kernel::rows must be FASTSEG_ALWAYS_INLINE (and call only inlined helpers, no lambdas) so that its
// loops are compiled into each target's wrapper.
template <typename Kernel>
void parallel_rows(const Kernel& kernel, int64_t rows, int64_t grain) {
  void (*run)(const Kernel&, int64_t, int64_t) = &kernel_rows_baseline<Kernel>;
#ifdef FASTSEG_HAVE_AVX2_TARGET
  if (use_avx2()) {
    run = &kernel_rows_avx2<Kernel>;
  }
#endif
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { run(kernel, begin, end); });
}

}  // namespace fastseg
