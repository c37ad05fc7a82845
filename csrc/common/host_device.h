// FASTSEG_HOST_DEVICE: marks the inline math shared by the CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define FASTSEG_HOST_DEVICE __host__ __device__
#else
#define FASTSEG_HOST_DEVICE
#endif
