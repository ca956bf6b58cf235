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

// The element types the kernels are compiled for: the only list of them. Each entry is
//   X(enumerator, CUDA element type, torch ScalarType enumerator, name in messages)
// The enum below, the torch glue's dtype mapping and the compile-time dispatch (dispatch.cuh)
// all expand this list; only the .cu needs the CUDA element types themselves.
#define I2AM_CUDA_ELEMENT_TYPES(X)                  \
  X(kFloat32, float, Float, "float32")              \
  X(kFloat16, __half, Half, "float16")              \
  X(kBFloat16, __nv_bfloat16, BFloat16, "bfloat16")

enum class ElementType : int {
#define I2AM_ELEMENT_TYPE_ENUMERATOR(enumerator, type, torch_type, name) enumerator,
  I2AM_CUDA_ELEMENT_TYPES(I2AM_ELEMENT_TYPE_ENUMERATOR)
#undef I2AM_ELEMENT_TYPE_ENUMERATOR
};

// The padded widths the kernels are compiled for, ascending, each a multiple of 16: the only
// list of them. Head dims (q/k) and value dims (v) from 1 to kMaxHeadDim are supported; both
// are padded with zeros in shared memory to the smallest width that holds them.
inline constexpr int kPaddedWidths[] = {32, 48, 64, 80, 128, 160, 256};
inline constexpr int kPaddedWidthCount = static_cast<int>(sizeof(kPaddedWidths) / sizeof(kPaddedWidths[0]));
inline constexpr int kMaxHeadDim = kPaddedWidths[kPaddedWidthCount - 1];

// Padded width for head dim `head_dim` and value dim `value_dim`: the smallest compiled width
// >= max(head_dim, value_dim), or 0 when either is outside [1, kMaxHeadDim].
int padded_head_dim(int head_dim, int value_dim);

// Queries per CTA (the query block) for this element type and padded width. The column
// partials have ceil(R2 / query_block_size) rows per (map entry, head).
int query_block_size(ElementType dtype, int padded_dim);

// Dynamic shared memory per CTA of the largest kernel for this element type and padded width.
int shared_memory_bytes(ElementType dtype, int padded_dim);

// One call. Sizes as in docs/design.md ("The kernels"): q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv], each with
// unit stride along its last dim and the element strides given for (batch, head, token).
//
// Token order (csrc/attention_with_maps.h explains the tables): the kernels visit query rows
// and key columns in a reordered index space where the mapped queries (rows [0, Nqm)) and the
// unmasked mapped keys of entry b (columns [0, map_key_count[b])) are prefixes. Pass 1 sweeps
// rows [0, Nq) x columns [0, key_count[b]); pass 2 rows [0, R2) x columns [0, map_key_count[b]).
// A null order table is the identity (the fast path: rows and keys read in place).
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

  // Token order tables (device memory, int32).
  int num_map_queries = 0;             // Nqm >= 1
  int num_map_keys = 0;                // Nkm >= 1
  int pass2_rows = 0;                  // R2: mapped queries, then probe queries outside them
  const int* query_order = nullptr;    // [Nq]: query position of row r; null = identity
  const int* key_order = nullptr;      // [B, Nk]: key of column j of entry b; null = identity
  const int* key_slot = nullptr;       // [B, Nkm]: map position of mapped column j; null = identity
  const int* key_count = nullptr;      // [B]: unmasked keys of entry b
  const int* map_key_count = nullptr;  // [B]: unmasked mapped keys of entry b (may be 0)

  // Map scratch, only read when map_count > 0 (nqb2 = ceil(R2 / query_block_size)):
  float* row_max = nullptr;       // [Bm, H, R2] row maxima
  float* row_inv = nullptr;       // [Bm, H, R2] 1 / row sums (0: every score of the row is -inf)
  float* col_max = nullptr;       // [Bm, H, nqb2, Nkm] column partials; pass 2 reuses it for the reference partials
  float* col_sum = nullptr;       // [Bm, H, nqb2, Nkm]
  float* col_stat_max = nullptr;  // [Bm, H, Nkm] column maxima (+inf: column -inf for every mapped query)
  float* col_stat_inv = nullptr;  // [Bm, H, Nkm] 1 / column sums (0 for such a column)
  const float* query_weights = nullptr;  // [B, Nqm] contiguous, or null for all ones

  // Accumulators (float32, any strides; every element is updated by exactly one thread).
  float* generated = nullptr;  // [Bm, H, Nqm]
  int64_t generated_stride[3] = {0, 0, 0};
  float* reference = nullptr;  // [Bm, H, Nkm]
  int64_t reference_stride[3] = {0, 0, 0};
  float* probes = nullptr;     // [Bm, H, P, Nkm], or null when probe_count == 0
  int64_t probes_stride[4] = {0, 0, 0, 0};
  float* share = nullptr;      // [Bm, H, Nqm], or null (not requested)
  int64_t share_stride[3] = {0, 0, 0};

  // Probe rows sorted by row (token order): probe_row[i] is the row of probe slot probe_slot[i];
  // the probes of pass-2 query block qb are i in [probe_block_start[qb], probe_block_start[qb + 1]).
  int probe_count = 0;
  const int* probe_row = nullptr;          // [P]
  const int* probe_slot = nullptr;         // [P]
  const int* probe_block_start = nullptr;  // [nqb2 + 1]
};

// Enqueues every kernel of one call on `stream`: pass 1 for the map entries and for the other
// entries, the column combine, pass 2 and the reference reduction. Returns the first launch
// error (cudaSuccess otherwise); kernels run asynchronously.
cudaError_t launch_attention_with_maps(const AttentionMapsLaunch& launch, cudaStream_t stream);

}  // namespace cuda
}  // namespace i2am_fast
