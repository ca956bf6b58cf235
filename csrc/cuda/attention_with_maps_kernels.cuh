// Launch interface of the CUDA attention-with-maps kernels (attention_with_maps_kernels.cu).
//
// Plain C++ on raw device pointers, sizes and element strides: no torch headers, so that the
// .cu file compiles with nvcc alone (CI builds it for sm_80/86/89/90 without a CUDA torch).
// The torch glue (attention_with_maps_cuda.cpp) checks the arguments, allocates the outputs
// and the scratch buffers described below, and fills one AttentionMapsLaunch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace i2am_fast {
namespace cuda {

enum class ElementType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Head dims (q/k) and value dims (v) from 1 to kMaxHeadDim are supported; both are padded
// with zeros in shared memory to one of the compiled widths (a multiple of 16).
constexpr int kMaxHeadDim = 256;

// Padded width for head dim `head_dim` and value dim `value_dim`: the smallest compiled width
// >= max(head_dim, value_dim), or 0 when either is outside [1, kMaxHeadDim].
int padded_head_dim(int head_dim, int value_dim);

// Queries per CTA (the query block) for this element type and padded width. The column
// partials have ceil(Nq / query_block_size) rows per (map entry, head).
int query_block_size(ElementType dtype, int padded_dim);

// Dynamic shared memory per CTA of the largest kernel for this element type and padded width.
int shared_memory_bytes(ElementType dtype, int padded_dim);

// One call. Sizes as in docs/design.md: q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv], each with
// unit stride along its last dim and the element strides given for (batch, head, token).
struct AttentionMapsLaunch {
  ElementType dtype = ElementType::kFloat32;
  int batch = 0;
  int heads = 0;
  int num_queries = 0;
  int num_keys = 0;
  int head_dim = 0;
  int value_dim = 0;
  int padded_dim = 0;  // padded_head_dim(head_dim, value_dim)
  int map_count = 0;   // Bm
  float scale = 1.0f;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  // 16-byte copies allowed: the row start of every (batch, head, token) is 16-byte aligned and
  // the row length (D or Dv elements) is a multiple of 16 bytes.
  bool q_vectorized = false;
  bool k_vectorized = false;
  bool v_vectorized = false;

  void* output = nullptr;  // [B, H, Nq, Dv], contiguous, in the input dtype

  // [B] batch entries: the Bm map entries in map-slot order, then the other entries.
  const int* entries = nullptr;

  // Map scratch, only read when map_count > 0 (nqb = ceil(Nq / query_block_size)):
  float* row_lse = nullptr;     // [Bm, H, Nq]
  float* col_max = nullptr;     // [Bm, H, nqb, Nk]; pass 2 reuses it for the reference partials
  float* col_sum = nullptr;     // [Bm, H, nqb, Nk]
  float* col_lse = nullptr;     // [Bm, H, Nk]
  const float* query_weights = nullptr;  // [B, Nq] contiguous, or null for all ones

  // Accumulators (float32, any strides; every element is updated by exactly one thread).
  float* generated = nullptr;  // [Bm, H, Nq]
  int64_t generated_stride[3] = {0, 0, 0};
  float* reference = nullptr;  // [Bm, H, Nk]
  int64_t reference_stride[3] = {0, 0, 0};
  float* probes = nullptr;     // [Bm, H, P, Nk], or null when probe_count == 0
  int64_t probes_stride[4] = {0, 0, 0, 0};

  // Probe rows sorted by query index: probe_query[i] is the query of probe slot probe_slot[i];
  // the probes of query block qb are i in [probe_block_start[qb], probe_block_start[qb + 1]).
  int probe_count = 0;
  const int* probe_query = nullptr;        // [P]
  const int* probe_slot = nullptr;         // [P]
  const int* probe_block_start = nullptr;  // [nqb + 1]
};

// Enqueues every kernel of one call on `stream`: pass 1 for the map entries and for the other
// entries, the column combine, pass 2 and the reference reduction. Returns the first launch
// error (cudaSuccess otherwise); kernels run asynchronously.
cudaError_t launch_attention_with_maps(const AttentionMapsLaunch& launch, cudaStream_t stream);

}  // namespace cuda
}  // namespace i2am_fast
