// Host stand-in for c10/cuda/CUDAException.h: launch errors of the emulated kernels surface as
// cudaError_t values from the launch function, which C10_CUDA_CHECK turns into a torch error.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t emulated_error = (expr);                                                 \
    TORCH_CHECK(emulated_error == cudaSuccess, "emulated CUDA error ", int(emulated_error));   \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
