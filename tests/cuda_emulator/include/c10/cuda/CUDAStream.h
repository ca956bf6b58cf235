// Host stand-in for c10/cuda/CUDAStream.h: one implicit stream (the emulator runs launches in
// order, synchronously).
#pragma once
#include <cuda_runtime.h>

namespace c10 {
namespace cuda {
struct EmulatedStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
