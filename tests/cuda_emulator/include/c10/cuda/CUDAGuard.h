// Host stand-in for c10/cuda/CUDAGuard.h: the emulated kernels run on the CPU, so there is no
// device to switch to.
#pragma once
#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
