// CUDA kernels of i2am_fast::attention_with_maps_accumulate (docs/design.md, "The kernels"),
// mirroring csrc/cpu/attention_with_maps_cpu.cpp. Rows and columns are visited in the token order
// of csrc/attention_with_maps.h (tile loads gather through its tables; null tables = in place):
//
//   pass 1   one CTA per (query block, batch entry x head), rows [0, Nq) x the entry's unmasked
//            keys: online softmax over key blocks gives the output (written to each row's query
//            position) and, for map entries, the row statistics (max, 1/sum) of rows [0, R2) and
//            per-query-block column partials (max, sum) of mapped rows x mapped keys;
//   combine  merges the column partials over query blocks, in order, into column (max, 1/sum);
//   pass 2   map entries only, one CTA per (query block, map entry x head), rows [0, R2) x the
//            unmasked mapped keys: recomputes the score tiles; p = exp(S - rowmax) * (1/rowsum)
//            gives the reference-map partial of the block, the share and the probe rows,
//            exp(S - colmax) * (1/colsum) summed over keys the generated map;
//   reduce   sums the reference partials over query blocks, in order, into the accumulator at
//            each key's map position (key_slot).
//
// Every softmax weight is exp(S - max) * (1/sum), never exp(S - log-sum-exp) (tile_math.h;
// docs/design.md, "Numerical accuracy"). A row whose scores are all -inf has sum 0: output NaN,
// 0 in every map.
//
// Every reduction runs in a fixed order (fixed shuffle butterflies, fixed warp order, fixed
// query-block order) and every accumulator element is updated by exactly one thread: no float
// atomics, the maps are bit-identical from run to run.
//
// Matrix products: float16 / bfloat16 use mma.sync.m16n8k16 (float32 accumulate) with operands
// loaded by ldmatrix, as FlashAttention-2 does. Unlike WMMA, mma.sync has a documented register
// layout for its accumulators, so row and column statistics are computed on the scores in
// registers (quad shuffles for rows, a reduce-scatter butterfly for columns) without a round
// trip through shared memory, and the softmax probabilities feed the P.V product straight from
// the score registers. float32 inputs use plain FMA loops that produce the same register layout
// (accuracy of float32 throughout; tf32 would miss the 1e-4 map tolerance), so all the softmax and
// map code is shared.
//
// Each warp owns 16 query rows of the CTA's block; in the m16n8 accumulator layout lane
// (g = lane / 4, t = lane % 4) holds rows g and g + 8, columns 8 j + 2 t and 8 j + 2 t + 1 of
// n-tile j. Head and value dims are zero-padded in shared memory to a compiled width DP. Both
// passes start a CTA the same way (BlockSetup: which pair and query block, shared-memory
// tiles, padding, the first loads, the lane's rows); dispatch.cuh turns the run-time element
// type and padded width into the template arguments T and DP.
//
// Only CUDA runtime headers, tile_math.h and the standard library are included (CI compiles
// this file with nvcc -c alone).
#include "attention_with_maps_kernels.cuh"
#include "dispatch.cuh"

#include "../tile_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace i2am_fast {
namespace cuda {
namespace {

// ==== BEGIN DEVICE PRIMITIVES ====================================================================
// Every intrinsic, PTX instruction and launch the kernels use, in one place.

__device__ __forceinline__ int thread_index() { return static_cast<int>(threadIdx.x); }
__device__ __forceinline__ int block_index_x() { return static_cast<int>(blockIdx.x); }
__device__ __forceinline__ int block_index_y() { return static_cast<int>(blockIdx.y); }
__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
__device__ __forceinline__ float shfl_idx(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
__device__ __forceinline__ bool warp_any(bool p) { return __any_sync(0xffffffffu, p) != 0; }
// exp(x) as ex2.approx(x * log2 e): about 2 ulp plus the rounding of the product (relative error
// below 1e-5 for |x| < 90); exp(-inf) = 0, results below 2^-126 flush to 0.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }

__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 and does not block the thread.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i of
// lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}
// The same, transposed: register i of lane l receives rows 2 (l % 4) and 2 (l % 4) + 1 of column
// l / 4 of matrix i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// d += a (16x16, row-major fragments) * b (16x8, column fragments), float32 accumulate.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(
    float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename Kernel, typename... Args>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream, const Args&... args) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) {
      return err;
    }
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}
// ==== END DEVICE PRIMITIVES ======================================================================

constexpr float kInf = INFINITY;

// ------------------------------------------------------------------------------------------------
// Element types
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Element;

template <>
struct Element<float> {
  static __device__ __forceinline__ float zero() { return 0.0f; }
  static __device__ __forceinline__ void store_pair(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  }
  static __device__ __forceinline__ void store(float* p, float a) { *p = a; }
};

template <>
struct Element<__half> {
  static __device__ __forceinline__ __half zero() { return __float2half(0.0f); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);  // a in the low half: the lower column
    uint32_t r;
    memcpy(&r, &h, sizeof(r));
    return r;
  }
  static __device__ __forceinline__ void store_pair(__half* p, float a, float b) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  }
  static __device__ __forceinline__ void store(__half* p, float a) { *p = __float2half(a); }
};

template <>
struct Element<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __float2bfloat16(0.0f); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    uint32_t r;
    memcpy(&r, &h, sizeof(r));
    return r;
  }
  static __device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float a) { *p = __float2bfloat16(a); }
};

// ------------------------------------------------------------------------------------------------
// Tile configuration
// ------------------------------------------------------------------------------------------------

// Per element type and padded width DP:
//   float16/bfloat16: 8 warps (128 queries) x 64 keys; for DP = 256, 4 warps x 32 keys;
//   float32:          4 warps (64 queries) x 32 keys;  for DP = 256, 2 warps x 32 keys.
// Shared memory: the query tile, two key/value tiles (pass 1: K and V; pass 2: K double
// buffered), each row padded by 16 bytes (conflict-free ldmatrix), plus the statistics area.
// Every configuration fits the 99 KB opt-in limit of sm_86/sm_89.
template <typename T, int DP>
struct Config {
  static_assert(DP % 16 == 0 && DP >= 16 && DP <= kMaxHeadDim, "padded width");
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  static constexpr int kWarps = kTensorCores ? (DP <= 160 ? 8 : 4) : (DP <= 160 ? 4 : 2);
  static constexpr int kBK = kTensorCores ? (DP <= 160 ? 64 : 32) : 32;
  static constexpr int kBQ = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = DP + 16 / static_cast<int>(sizeof(T));  // shared row length, elements
  static constexpr int kNT = kBK / 8;      // score n-tiles per warp
  static constexpr int kNO = DP / 8;       // output n-tiles per warp
  static constexpr int kSlots = kBK / 4;   // score columns per lane (2 per n-tile)
  static constexpr int kOwned = kSlots / 8;  // columns a lane owns after the reduce-scatter
  static_assert(kSlots % 8 == 0, "the column reduce-scatter needs 8 slots per lane or more");

  static constexpr int kQBytes = kBQ * kLd * static_cast<int>(sizeof(T));
  static constexpr int kKVBytes = kBK * kLd * static_cast<int>(sizeof(T));
  static constexpr int kStatsOffset = kQBytes + 2 * kKVBytes;
  // pass 1: column statistics (max, sum) per warp and column
  static constexpr int kPass1Bytes = kStatsOffset + kWarps * kBK * 8;
  // pass 2: reference partial per warp and column; column max, inverse sum and reuse factor,
  // double buffered; the row maxima of the block
  static constexpr int kPass2Bytes = kStatsOffset + kWarps * kBK * 4 + 3 * 2 * kBK * 4 + kBQ * 4;
  static constexpr int kSmemBytes = kPass1Bytes > kPass2Bytes ? kPass1Bytes : kPass2Bytes;
  static_assert(kSmemBytes <= 99 * 1024, "shared memory must fit an sm_86 CTA (99 KB opt-in)");
  // Two CTAs per SM for the narrow half-precision tiles (caps registers at 128 per thread);
  // pass 1 with map statistics needs about 150 registers from DP = 64 on, so it gets one.
  static constexpr int kMinBlocks = (kTensorCores && DP <= 64) ? 2 : 1;
  static constexpr int kMinBlocksMaps = (kTensorCores && DP <= 48) ? 2 : 1;
};

// ------------------------------------------------------------------------------------------------
// Tile loads
// ------------------------------------------------------------------------------------------------

// smem[r][c] = g[row(r) * row_stride + c] for r < rows_valid, c < width, where row(r) = rows[r]
// (a gather through a token order table) or r (rows null); zero for rows_valid <= r < ROWS.
// Columns width..DP-1 are zeroed once per CTA by zero_pad_columns and never written here.
template <typename T, int LD, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(
    T* smem, const T* g, int64_t row_stride, int rows_valid, int width, bool vectorized, const int* rows) {
  if (vectorized) {
    constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
    const int chunks = width / kChunk;
    const int total = ROWS * chunks;
    for (int i = thread_index(); i < total; i += THREADS) {
      const int r = i / chunks;
      const int c = (i - r * chunks) * kChunk;
      T* dst = smem + r * LD + c;
      if (r < rows_valid) {
        cp_async_16(dst, g + static_cast<int64_t>(rows == nullptr ? r : rows[r]) * row_stride + c);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  } else {
    const int total = ROWS * width;
    for (int i = thread_index(); i < total; i += THREADS) {
      const int r = i / width;
      const int c = i - r * width;
      smem[r * LD + c] =
          r < rows_valid ? g[static_cast<int64_t>(rows == nullptr ? r : rows[r]) * row_stride + c] : Element<T>::zero();
    }
  }
}

template <typename T, int LD, int DP, int ROWS, int THREADS>
__device__ __forceinline__ void zero_pad_columns(T* smem, int width) {
  const int pad = DP - width;
  if (pad <= 0) {
    return;
  }
  const int total = ROWS * pad;
  for (int i = thread_index(); i < total; i += THREADS) {
    const int r = i / pad;
    smem[r * LD + width + (i - r * pad)] = Element<T>::zero();
  }
}

// ------------------------------------------------------------------------------------------------
// Warp-level products, all in the m16n8 accumulator layout
// ------------------------------------------------------------------------------------------------

// acc[j] = Q_w K_j^T for the warp's 16 query rows (sq) and the tile's keys (sk): tensor cores.
template <typename T, int DP, int LD, int NT>
__device__ __forceinline__ void warp_scores(float (&acc)[NT][4], const T* sq, const T* sk, int lane, std::true_type) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  }
  const int mi = lane >> 3;
  const int r = lane & 7;
  // A (queries, row-major): matrix 0 rows 0-7 cols 0-7, 1 rows 8-15, 2 cols 8-15, 3 both.
  const T* a_row = sq + (r + (mi & 1) * 8) * LD + (mi >> 1) * 8;
  // B (keys as columns): matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), ...
  const T* b_row = sk + (r + (mi >> 1) * 8) * LD + (mi & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_row + kk * 16);
#pragma unroll
    for (int jp = 0; jp < NT / 2; ++jp) {
      uint32_t b[4];
      ldmatrix_x4(b, b_row + jp * 16 * LD + kk * 16);
      mma_16816(acc[2 * jp], a, b[0], b[1], T());
      mma_16816(acc[2 * jp + 1], a, b[2], b[3], T());
    }
  }
}

// The same for float32: plain FMAs in the same register layout.
template <typename T, int DP, int LD, int NT>
__device__ __forceinline__ void warp_scores(float (&acc)[NT][4], const T* sq, const T* sk, int lane, std::false_type) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  }
  const int g = lane >> 2;
  const int t = lane & 3;
  const float* q0 = sq + g * LD;
  const float* q1 = q0 + 8 * LD;
#pragma unroll 2
  for (int d = 0; d < DP; d += 4) {
    const float4 a0 = *reinterpret_cast<const float4*>(q0 + d);
    const float4 a1 = *reinterpret_cast<const float4*>(q1 + d);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float4 b = *reinterpret_cast<const float4*>(sk + (j * 8 + 2 * t + e) * LD + d);
        float x = acc[j][e];
        x = fmaf(a0.x, b.x, x);
        x = fmaf(a0.y, b.y, x);
        x = fmaf(a0.z, b.z, x);
        x = fmaf(a0.w, b.w, x);
        acc[j][e] = x;
        float y = acc[j][2 + e];
        y = fmaf(a1.x, b.x, y);
        y = fmaf(a1.y, b.y, y);
        y = fmaf(a1.z, b.z, y);
        y = fmaf(a1.w, b.w, y);
        acc[j][2 + e] = y;
      }
    }
  }
}

// o += P V for the warp's rows: P (the exponentials, score layout) times the value tile sv.
template <typename T, int DP, int LD, int NT>
__device__ __forceinline__ void warp_pv(float (&o)[DP / 8][4], const float (&p)[NT][4], const T* sv, int lane, std::true_type) {
  const int mi = lane >> 3;
  const int r = lane & 7;
  // B (values, transposed load): matrices (keys 0-7, dv 0-7), (keys 8-15, dv 0-7), (keys 0-7,
  // dv 8-15), (keys 8-15, dv 8-15).
  const T* b_row = sv + (r + (mi & 1) * 8) * LD + (mi >> 1) * 8;
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    // The accumulators of n-tiles 2kk and 2kk+1 are exactly the A fragment of keys 16kk..16kk+15.
    uint32_t a[4];
    a[0] = Element<T>::pack(p[2 * kk][0], p[2 * kk][1]);
    a[1] = Element<T>::pack(p[2 * kk][2], p[2 * kk][3]);
    a[2] = Element<T>::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = Element<T>::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < DP / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_row + kk * 16 * LD + dp * 16);
      mma_16816(o[2 * dp], a, b[0], b[1], T());
      mma_16816(o[2 * dp + 1], a, b[2], b[3], T());
    }
  }
}

template <typename T, int DP, int LD, int NT>
__device__ __forceinline__ void warp_pv(float (&o)[DP / 8][4], const float (&p)[NT][4], const T* sv, int lane, std::false_type) {
  const int t = lane & 3;
  const int quad = lane & ~3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int tc = 0; tc < 4; ++tc) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        // P[row g][key 8j + 2tc + e] and P[row g + 8][...] live in lane quad + tc.
        const float p0 = shfl_idx(p[j][e], quad + tc);
        const float p1 = shfl_idx(p[j][2 + e], quad + tc);
        const float* vrow = sv + (j * 8 + 2 * tc + e) * LD + 2 * t;
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
          const float2 vv = *reinterpret_cast<const float2*>(vrow + n * 8);
          o[n][0] = fmaf(p0, vv.x, o[n][0]);
          o[n][1] = fmaf(p0, vv.y, o[n][1]);
          o[n][2] = fmaf(p1, vv.x, o[n][2]);
          o[n][3] = fmaf(p1, vv.y, o[n][3]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Column reductions over the warp's 16 rows
// ------------------------------------------------------------------------------------------------

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// v[s] holds this lane's value for column slot s (slot 2j + e = column 8j + 2t + e). Reduces
// over the 8 lanes sharing t (lane bits 2-4) with a reduce-scatter butterfly: afterwards v[i]
// for i < N/8 holds the reduction of slot g * (N/8) + i (g = lane / 4). 7N/8 shuffles instead of
// the 3N of an all-reduce; the order of every operation is fixed.
template <int HALF, int MASK, int N, typename Op>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[N], int lane, Op op) {
  const bool upper = (lane & MASK) != 0;
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const float send = upper ? v[i] : v[i + HALF];
    const float keep = upper ? v[i + HALF] : v[i];
    v[i] = op(keep, shfl_xor(send, MASK));
  }
}

template <int N, typename Op>
__device__ __forceinline__ void reduce_scatter_columns(float (&v)[N], int lane, Op op) {
  static_assert(N % 8 == 0, "reduce-scatter over 8 lanes");
  reduce_scatter_step<N / 2, 16>(v, lane, op);
  reduce_scatter_step<N / 4, 8>(v, lane, op);
  reduce_scatter_step<N / 8, 4>(v, lane, op);
}

// Column (within the tile) of the i-th slot a lane owns after reduce_scatter_columns.
template <int N>
__device__ __forceinline__ int owned_column(int lane, int i) {
  const int slot = (lane >> 2) * (N / 8) + i;
  return (slot >> 1) * 8 + 2 * (lane & 3) + (slot & 1);
}

__device__ __forceinline__ float exp_shifted_fast(float x, float shift) {
  return x == -kInf ? 0.0f : fast_exp(x - shift);
}

// Row reductions: the 4 lanes of a quad (lane bits 0-1) hold the columns of the same rows.
__device__ __forceinline__ float quad_sum(float x) {
  x += shfl_xor(x, 1);
  x += shfl_xor(x, 2);
  return x;
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, shfl_xor(x, 1));
  x = fmaxf(x, shfl_xor(x, 2));
  return x;
}

// ------------------------------------------------------------------------------------------------
// Per-CTA setup shared by pass 1 and pass 2
// ------------------------------------------------------------------------------------------------

// What a CTA of either pass works on and where. Grid (query blocks, entries x heads): CTA
// (qb, pair) takes query block qb (rows of the token order) of head pair % H of batch entry
// entries[entry_offset + slot], slot = pair / H (the map slot for map entries). Pass 1 sweeps
// rows [0, Nq) x the entry's unmasked keys; pass 2 rows [0, R2) x its unmasked mapped keys.
// Shared memory: the query tile [BQ][LD], two key/value tiles [BK][LD] (pass 1: K and V;
// pass 2: K double buffered) and, from Config::kStatsOffset, the pass's statistics area.
template <typename T, int DP>
struct BlockSetup {
  using C = Config<T, DP>;

  int tid, lane, warp, g, t;  // g = lane / 4 and t = lane % 4 as in the m16n8 layout
  int qb, pair, h, slot, b;
  int nq;     // rows this pass sweeps: Nq (pass 1) or R2 (pass 2)
  int nk;     // columns this pass sweeps: key_count[b] (pass 1) or map_key_count[b] (pass 2)
  int nqb;    // rows of the column / reference partials: ceil(R2 / BQ)
  int q0;
  int r0, r1;  // the query rows this lane holds (may lie past nq in the last block)
  const T* qg;  // query 0 of the pair
  const T* kg;  // key 0 of the pair
  const T* vg;  // value 0 of the pair
  const int* query_rows;  // query positions of rows q0.., or null (in order)
  const int* key_cols;    // key positions of the entry's columns, or null (in order)
  T* sq;
  T* tile0;
  T* tile1;
  unsigned char* stats;
  const T* sq_warp;  // the warp's 16 rows of the query tile

  __device__ __forceinline__ BlockSetup(const AttentionMapsLaunch& p, int entry_offset, bool pass2) {
    unsigned char* smem = dynamic_smem();
    sq = reinterpret_cast<T*>(smem);
    tile0 = sq + C::kBQ * C::kLd;
    tile1 = tile0 + C::kBK * C::kLd;
    stats = smem + C::kStatsOffset;

    tid = thread_index();
    lane = tid & 31;
    warp = tid >> 5;
    g = lane >> 2;
    t = lane & 3;
    qb = block_index_x();
    pair = block_index_y();
    h = pair % p.heads;
    slot = pair / p.heads;
    b = p.entries[entry_offset + slot];
    nq = pass2 ? p.pass2_rows : p.num_queries;
    nk = pass2 ? p.map_key_count[b] : p.key_count[b];
    nqb = (p.pass2_rows + C::kBQ - 1) / C::kBQ;
    q0 = qb * C::kBQ;

    qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
    vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
    query_rows = p.query_order == nullptr ? nullptr : p.query_order + q0;
    key_cols = p.key_order == nullptr ? nullptr : p.key_order + static_cast<int64_t>(b) * p.num_keys;
    if (query_rows == nullptr) {
      qg += q0 * p.q_stride[2];
    }

    r0 = q0 + warp * 16 + g;
    r1 = r0 + 8;
    sq_warp = sq + warp * 16 * C::kLd;
  }

  // Zeroes the padding columns of the three tiles (once per CTA: the loads never write them;
  // tile1 holds `tile1_width` columns), then starts the copies of the query block and of key
  // tile 0 into tile0 as one cp.async group.
  __device__ __forceinline__ void start(const AttentionMapsLaunch& p, int tile1_width) const {
    zero_pad_columns<T, C::kLd, DP, C::kBQ, C::kThreads>(sq, p.head_dim);
    zero_pad_columns<T, C::kLd, DP, C::kBK, C::kThreads>(tile0, p.head_dim);
    zero_pad_columns<T, C::kLd, DP, C::kBK, C::kThreads>(tile1, tile1_width);
    load_tile<T, C::kLd, C::kBQ, C::kThreads>(
        sq, qg, p.q_stride[2], min(C::kBQ, nq - q0), p.head_dim, p.q_vectorized, query_rows);
    load_keys(p, tile0, 0);
    cp_async_commit();
  }

  // Starts the copies of the keys / values of columns [k0, k0 + BK) into `dst` (rows past the
  // pass's column count become zero); the caller commits.
  __device__ __forceinline__ void load_keys(const AttentionMapsLaunch& p, T* dst, int k0) const {
    if (key_cols == nullptr) {
      load_tile<T, C::kLd, C::kBK, C::kThreads>(
          dst, kg + k0 * p.k_stride[2], p.k_stride[2], min(C::kBK, nk - k0), p.head_dim, p.k_vectorized, nullptr);
    } else {
      load_tile<T, C::kLd, C::kBK, C::kThreads>(
          dst, kg, p.k_stride[2], min(C::kBK, nk - k0), p.head_dim, p.k_vectorized, key_cols + k0);
    }
  }
  __device__ __forceinline__ void load_values(const AttentionMapsLaunch& p, T* dst, int k0) const {
    if (key_cols == nullptr) {
      load_tile<T, C::kLd, C::kBK, C::kThreads>(
          dst, vg + k0 * p.v_stride[2], p.v_stride[2], min(C::kBK, nk - k0), p.value_dim, p.v_vectorized, nullptr);
    } else {
      load_tile<T, C::kLd, C::kBK, C::kThreads>(
          dst, vg, p.v_stride[2], min(C::kBK, nk - k0), p.value_dim, p.v_vectorized, key_cols + k0);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Pass 1
// ------------------------------------------------------------------------------------------------

// grid (query blocks, entries x heads) over rows [0, Nq) x the entry's unmasked keys; kMaps: the
// map entries (entries[0, Bm)), with the row statistics of rows [0, R2) and the column partials
// of mapped rows x mapped columns; otherwise the other entries (entries[Bm, B)), output only.
// Output row r goes to query query_order[r].
template <typename T, int DP, bool kMaps>
__global__ void __launch_bounds__(Config<T, DP>::kThreads, kMaps ? Config<T, DP>::kMinBlocksMaps : Config<T, DP>::kMinBlocks)
    attention_pass1_kernel(const AttentionMapsLaunch p) {
  using C = Config<T, DP>;
  constexpr int BQ = C::kBQ, BK = C::kBK, LD = C::kLd, NT = C::kNT, NO = C::kNO;
  constexpr int SLOTS = C::kSlots, OWNED = C::kOwned, WARPS = C::kWarps;
  using TC = std::integral_constant<bool, C::kTensorCores>;

  const BlockSetup<T, DP> cta(p, kMaps ? 0 : p.map_count, false);
  const int tid = cta.tid, lane = cta.lane, warp = cta.warp, t = cta.t;
  const int nq = cta.nq, nk = cta.nk, q0 = cta.q0, r0 = cta.r0, r1 = cta.r1;
  T* sk = cta.tile0;
  T* sv = cta.tile1;
  float2* col_stat = reinterpret_cast<float2*>(cta.stats);  // [WARPS][BK]
  cta.start(p, p.value_dim);
  const bool row_tail = q0 + BQ > nq;
  // Column statistics: mapped rows [0, Nqm) x mapped columns [0, map_nk) only. The CTA and
  // tile conditions are block-uniform; the row conditions mask the lane's rows.
  const int nqm = p.num_map_queries;
  const int map_nk = kMaps ? p.map_key_count[cta.b] : 0;
  const bool cta_maps = kMaps && q0 < nqm && map_nk > 0;
  const bool mapped0 = r0 < nqm;
  const bool mapped1 = r1 < nqm;

  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) {
    o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  }
  float m0 = -kInf, m1 = -kInf;  // running row maxima
  float l0 = 0.0f, l1 = 0.0f;    // running row sums (this lane's columns only until the end)

  const int nkb = (nk + BK - 1) / BK;
  for (int kb = 0; kb < nkb; ++kb) {
    const int k0 = kb * BK;
    cp_async_wait<0>();
    block_sync();  // K tile (and Q) landed; everyone is done with the previous V tile
    cta.load_values(p, sv, k0);
    cp_async_commit();

    float s[NT][4];
    warp_scores<T, DP, LD, NT>(s, cta.sq_warp, sk, lane, TC());
    block_sync();  // everyone is done reading the K tile
    if (kb + 1 < nkb) {
      cta.load_keys(p, sk, k0 + BK);
      cp_async_commit();
    }

    // Scale; keys past Nk and queries past Nq are -inf (they take no part in any statistic).
    const bool col_tail = k0 + BK > nk;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float x = s[j][i] * p.scale;
        if (col_tail && k0 + j * 8 + 2 * t + (i & 1) >= nk) {
          x = -kInf;
        }
        if (row_tail && (i < 2 ? r0 : r1) >= nq) {
          x = -kInf;
        }
        s[j][i] = x;
      }
    }

    // Row maxima of the tile (the 4 lanes of a quad share a row).
    float mx0 = -kInf, mx1 = -kInf;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
    mx0 = quad_max(mx0);
    mx1 = quad_max(mx1);
    const float mn0 = fmaxf(m0, mx0);
    const float mn1 = fmaxf(m1, mx1);

    // Column statistics of the warp's 16 rows (map entries). As on the CPU, the column sums
    // reuse the row-shifted exponentials: exp(S - R) = exp(S - new_max_i) * exp(new_max_i - R),
    // R = the warp's largest new row max. When some column's own max lies more than
    // kReuseSpread below R, the whole warp tile takes the exact path instead: column max and
    // a second exponential exp(S - colmax) per score (rare: needs a spread of e^30 inside 16 rows).
    float own_max[OWNED > 0 ? OWNED : 1];
    float own_sum[OWNED > 0 ? OWNED : 1];
    bool warp_exact = false;
    float reference = -kInf;
    const bool tile_maps = cta_maps && k0 < map_nk;
    if (tile_maps) {
      // Rows outside Qg take no part: -inf scores and weight 0 below.
      float cm[SLOTS];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        cm[2 * j] = fmaxf(mapped0 ? s[j][0] : -kInf, mapped1 ? s[j][2] : -kInf);
        cm[2 * j + 1] = fmaxf(mapped0 ? s[j][1] : -kInf, mapped1 ? s[j][3] : -kInf);
      }
      reduce_scatter_columns<SLOTS>(cm, lane, MaxOp());
      reference = fmaxf(mapped0 ? mn0 : -kInf, mapped1 ? mn1 : -kInf);
      reference = fmaxf(reference, shfl_xor(reference, 4));
      reference = fmaxf(reference, shfl_xor(reference, 8));
      reference = fmaxf(reference, shfl_xor(reference, 16));
      bool flag = false;
#pragma unroll
      for (int i = 0; i < OWNED; ++i) {
        own_max[i] = cm[i];
        flag = flag || (k0 + owned_column<SLOTS>(lane, i) < map_nk && reference - cm[i] > kReuseSpread);
      }
      warp_exact = warp_any(flag);
      if (warp_exact) {
        float ex[SLOTS];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x0 = mapped0 ? s[j][e] : -kInf;
            const float x1 = mapped1 ? s[j][2 + e] : -kInf;
            float c = fmaxf(x0, x1);
            c = fmaxf(c, shfl_xor(c, 4));
            c = fmaxf(c, shfl_xor(c, 8));
            c = fmaxf(c, shfl_xor(c, 16));
            ex[2 * j + e] = exp_shifted_fast(x0, c) + exp_shifted_fast(x1, c);
          }
        }
        reduce_scatter_columns<SLOTS>(ex, lane, SumOp());
#pragma unroll
        for (int i = 0; i < OWNED; ++i) {
          own_sum[i] = ex[i];
        }
      }
    }

    // Online softmax: exponentials in place, rescale the running sums and the output.
    const float shift0 = mn0 == -kInf ? 0.0f : mn0;
    const float shift1 = mn1 == -kInf ? 0.0f : mn1;
    const float alpha0 = online_rescale(m0, mn0);
    const float alpha1 = online_rescale(m1, mn1);
    float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] = fast_exp(s[j][0] - shift0);
      s[j][1] = fast_exp(s[j][1] - shift0);
      s[j][2] = fast_exp(s[j][2] - shift1);
      s[j][3] = fast_exp(s[j][3] - shift1);
      ls0 += s[j][0] + s[j][1];
      ls1 += s[j][2] + s[j][3];
    }
    l0 = l0 * alpha0 + ls0;
    l1 = l1 * alpha1 + ls1;
    m0 = mn0;
    m1 = mn1;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o[n][0] *= alpha0;
      o[n][1] *= alpha0;
      o[n][2] *= alpha1;
      o[n][3] *= alpha1;
    }

    if (tile_maps) {
      if (!warp_exact) {
        const float w0 = mapped0 ? exp_shifted(mn0, reference) : 0.0f;
        const float w1 = mapped1 ? exp_shifted(mn1, reference) : 0.0f;
        float cs[SLOTS];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          cs[2 * j] = s[j][0] * w0 + s[j][2] * w1;
          cs[2 * j + 1] = s[j][1] * w0 + s[j][3] * w1;
        }
        reduce_scatter_columns<SLOTS>(cs, lane, SumOp());
#pragma unroll
        for (int i = 0; i < OWNED; ++i) {
          own_max[i] = reference;
          own_sum[i] = cs[i];
        }
      }
#pragma unroll
      for (int i = 0; i < OWNED; ++i) {
        col_stat[warp * BK + owned_column<SLOTS>(lane, i)] = make_float2(own_max[i], own_sum[i]);
      }
    }

    if (kb + 1 < nkb) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    block_sync();  // V tile landed; column statistics of every warp visible

    if (tile_maps) {
      // Merge the warps' statistics in warp order: the block's partial for these keys.
      if (tid < BK && k0 + tid < map_nk) {
        SoftmaxStat<float> stat{col_stat[tid].x, col_stat[tid].y};
#pragma unroll
        for (int w = 1; w < WARPS; ++w) {
          stat = merge_stats(stat, SoftmaxStat<float>{col_stat[w * BK + tid].x, col_stat[w * BK + tid].y});
        }
        const int64_t at = (static_cast<int64_t>(cta.pair) * cta.nqb + cta.qb) * p.num_map_keys + k0 + tid;
        p.col_max[at] = stat.max;
        p.col_sum[at] = stat.sum;
      }
    }

    warp_pv<T, DP, LD, NT>(o, s, sv, lane, TC());
  }

  // Epilogue: full row sums, normalised output (NaN for a row whose scores are all -inf: sum 0,
  // as torch's softmax gives), row statistics.
  l0 = quad_sum(l0);
  l1 = quad_sum(l1);
  const float inv0 = 1.0f / l0;
  const float inv1 = 1.0f / l1;
  const int dv = p.value_dim;
  T* out = static_cast<T*>(p.output) + (static_cast<int64_t>(cta.b) * p.heads + cta.h) * nq * dv;
  const bool pairs_ok = (dv & 1) == 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = half == 0 ? r0 : r1;
    const float inv = half == 0 ? inv0 : inv1;
    if (row < nq) {
      T* dst = out + static_cast<int64_t>(cta.query_rows == nullptr ? row : cta.query_rows[row - q0]) * dv;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        const int c = n * 8 + 2 * t;
        const float x = o[n][2 * half] * inv;
        const float y = o[n][2 * half + 1] * inv;
        if (pairs_ok && c + 1 < dv) {
          Element<T>::store_pair(dst + c, x, y);
        } else {
          if (c < dv) {
            Element<T>::store(dst + c, x);
          }
          if (c + 1 < dv) {
            Element<T>::store(dst + c + 1, y);
          }
        }
      }
    }
  }
  if constexpr (kMaps) {
    if (t == 0) {
      const int r2 = p.pass2_rows;
      float* row_max = p.row_max + static_cast<int64_t>(cta.pair) * r2;
      float* row_inv = p.row_inv + static_cast<int64_t>(cta.pair) * r2;
      if (r0 < r2) {
        row_max[r0] = m0;
        row_inv[r0] = inverse_sum(SoftmaxStat<float>{m0, l0});
      }
      if (r1 < r2) {
        row_max[r1] = m1;
        row_inv[r1] = inverse_sum(SoftmaxStat<float>{m1, l1});
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Combine: column statistics from the per-query-block partials, merged in query-block order,
// as (max, 1 / sum). A column that is -inf for every mapped query gets (+inf, 0): both of
// pass 2's paths then give it weight 0.
// ------------------------------------------------------------------------------------------------

constexpr int kColumnThreads = 256;

// Query blocks that hold mapped rows: the rows of the column partials that pass 1 writes.
__device__ __forceinline__ int map_query_blocks(const AttentionMapsLaunch& p, int block_rows) {
  return (p.num_map_queries + block_rows - 1) / block_rows;
}

__global__ void __launch_bounds__(kColumnThreads) combine_columns_kernel(const AttentionMapsLaunch p, int block_rows) {
  const int key = block_index_x() * kColumnThreads + thread_index();
  const int pair = block_index_y();
  const int b = p.entries[pair / p.heads];
  const int nkm = p.num_map_keys;
  if (key >= p.map_key_count[b]) {
    return;
  }
  const int nqb = (p.pass2_rows + block_rows - 1) / block_rows;
  const int map_blocks = map_query_blocks(p, block_rows);
  const int64_t base = static_cast<int64_t>(pair) * nqb * nkm + key;
  SoftmaxStat<float> stat{p.col_max[base], p.col_sum[base]};
  for (int qb = 1; qb < map_blocks; ++qb) {
    const int64_t at = base + static_cast<int64_t>(qb) * nkm;
    stat = merge_stats(stat, SoftmaxStat<float>{p.col_max[at], p.col_sum[at]});
  }
  const int64_t at = static_cast<int64_t>(pair) * nkm + key;
  p.col_stat_max[at] = stat.sum > 0.0f ? stat.max : kInf;
  p.col_stat_inv[at] = inverse_sum(stat);
}

// ------------------------------------------------------------------------------------------------
// Pass 2 (map entries only)
// ------------------------------------------------------------------------------------------------

// grid (pass-2 query blocks, map entries x heads) over rows [0, R2) x the entry's unmasked
// mapped keys. Per score, with the row statistics (max, inv) of pass 1: r = exp(S - rowmax)
// and the key softmax p = r * inv feed the reference partial (w-weighted sum over the block's
// mapped rows), the share (sum over keys) and the probe rows. The query softmax
// exp(S - colmax) * colinv reuses r as on the CPU: with A = the largest row max of the block's
// mapped rows, exp(S - colmax) * colinv = r * exp(rowmax - A) * [exp(A - colmax) * colinv], the
// bracket per column once per tile; columns with A - colmax > kReuseSpread take a second
// exponential instead (decided per column; the CPU decides per tile, same bound). Rows whose
// scores are all -inf (inv = 0) and rows past R2 add nothing; rows [Nqm, R2) serve probes only.
template <typename T, int DP>
__global__ void __launch_bounds__(Config<T, DP>::kThreads, Config<T, DP>::kMinBlocks)
    attention_pass2_kernel(const AttentionMapsLaunch p) {
  using C = Config<T, DP>;
  constexpr int BQ = C::kBQ, BK = C::kBK, LD = C::kLd, NT = C::kNT;
  constexpr int SLOTS = C::kSlots, OWNED = C::kOwned, THREADS = C::kThreads, WARPS = C::kWarps;
  using TC = std::integral_constant<bool, C::kTensorCores>;

  const BlockSetup<T, DP> cta(p, 0, true);
  const int tid = cta.tid, lane = cta.lane, warp = cta.warp, g = cta.g, t = cta.t;
  const int qb = cta.qb, pair = cta.pair, slot = cta.slot, h = cta.h;
  const int nq = cta.nq, nk = cta.nk, q0 = cta.q0, r0 = cta.r0, r1 = cta.r1;
  if (nk == 0) {
    return;  // no unmasked mapped key: every map of this entry stays 0 (block-uniform)
  }
  const int nqm = p.num_map_queries;
  const int nkm = p.num_map_keys;
  T* sk0 = cta.tile0;
  T* sk1 = cta.tile1;
  float* ref_part = reinterpret_cast<float*>(cta.stats);  // [WARPS][BK]
  float* col_max_s = ref_part + WARPS * BK;               // [2][BK]
  float* col_inv_s = col_max_s + 2 * BK;                  // [2][BK]
  float* col_factor = col_inv_s + 2 * BK;                 // [2][BK]
  float* row_max_block = col_factor + 2 * BK;             // [BQ]
  cta.start(p, p.head_dim);

  const float* row_max = p.row_max + static_cast<int64_t>(pair) * nq;
  const float* row_inv = p.row_inv + static_cast<int64_t>(pair) * nq;
  for (int i = tid; i < BQ; i += THREADS) {
    row_max_block[i] = q0 + i < nqm ? row_max[q0 + i] : -kInf;
  }
  // Rows that add something: below R2 with a nonzero sum. The others get shift +inf (every
  // exponential 0) and weight 0; their g and share are never written.
  const bool live0 = r0 < nq && row_inv[r0] > 0.0f;
  const bool live1 = r1 < nq && row_inv[r1] > 0.0f;
  const bool mapped0 = live0 && r0 < nqm;
  const bool mapped1 = live1 && r1 < nqm;
  const float rm0 = live0 ? row_max[r0] : kInf;
  const float rm1 = live1 ? row_max[r1] : kInf;
  const float ri0 = live0 ? row_inv[r0] : 0.0f;
  const float ri1 = live1 ? row_inv[r1] : 0.0f;
  const float* weights = p.query_weights == nullptr ? nullptr : p.query_weights + static_cast<int64_t>(cta.b) * nqm;
  const float w0 = mapped0 ? (weights == nullptr ? 1.0f : weights[r0]) : 0.0f;
  const float w1 = mapped1 ? (weights == nullptr ? 1.0f : weights[r1]) : 0.0f;
  block_sync();

  // A = the largest row max of the block's mapped rows (every warp computes the same value).
  float block_reference = -kInf;
  for (int i = lane; i < BQ; i += 32) {
    block_reference = fmaxf(block_reference, row_max_block[i]);
  }
#pragma unroll
  for (int mask = 16; mask >= 1; mask >>= 1) {
    block_reference = fmaxf(block_reference, shfl_xor(block_reference, mask));
  }

  const float* col_max_g = p.col_stat_max + static_cast<int64_t>(pair) * nkm;
  const float* col_inv_g = p.col_stat_inv + static_cast<int64_t>(pair) * nkm;
  // Column statistics and reuse factor exp(A - colmax) * colinv of key tile kb (-1: exact path).
  auto stage_columns = [&](int kb, int buf) {
    for (int i = tid; i < BK; i += THREADS) {
      const int key = kb * BK + i;
      float cmax = kInf;
      float cinv = 0.0f;
      float factor = 0.0f;  // columns past the mapped keys: weight 0
      if (key < nk) {
        cmax = col_max_g[key];
        cinv = col_inv_g[key];
        factor = block_reference - cmax <= kReuseSpread ? fast_exp(block_reference - cmax) * cinv : -1.0f;
      }
      col_max_s[buf * BK + i] = cmax;
      col_inv_s[buf * BK + i] = cinv;
      col_factor[buf * BK + i] = factor;
    }
  };
  stage_columns(0, 0);

  int probe_begin = 0;
  int probe_end = 0;
  if (p.probe_count > 0) {
    probe_begin = p.probe_block_start[qb];
    probe_end = p.probe_block_start[qb + 1];
  }
  const int* key_slot = p.key_slot == nullptr ? nullptr : p.key_slot + static_cast<int64_t>(cta.b) * nkm;
  float g_reused0 = 0.0f, g_reused1 = 0.0f;  // sum_k r * exp(A - colmax) * colinv
  float g_exact0 = 0.0f, g_exact1 = 0.0f;    // sum_k exp(S - colmax) * colinv over exact columns
  float share0 = 0.0f, share1 = 0.0f;        // sum_k p

  const int nkb = (nk + BK - 1) / BK;
  for (int kb = 0; kb < nkb; ++kb) {
    const int k0 = kb * BK;
    const int buf = kb & 1;
    if (kb + 1 < nkb) {
      cta.load_keys(p, buf ? sk0 : sk1, k0 + BK);
      cp_async_commit();
      stage_columns(kb + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    block_sync();  // key tile kb and its column factors visible

    float s[NT][4];
    warp_scores<T, DP, LD, NT>(s, cta.sq_warp, buf ? sk1 : sk0, lane, TC());
    const bool col_tail = k0 + BK > nk;
    const float* cmax_tile = col_max_s + buf * BK;
    const float* cinv_tile = col_inv_s + buf * BK;
    const float* factor_tile = col_factor + buf * BK;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float2 factor = *reinterpret_cast<const float2*>(factor_tile + j * 8 + 2 * t);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = j * 8 + 2 * t + (i & 1);
        float x = s[j][i] * p.scale;
        if (col_tail && k0 + c >= nk) {
          x = -kInf;
        }
        const float r = fast_exp(x - (i < 2 ? rm0 : rm1));
        const float f = (i & 1) ? factor.y : factor.x;
        if (f >= 0.0f) {
          if (i < 2) {
            g_reused0 += r * f;
          } else {
            g_reused1 += r * f;
          }
        } else {
          const float ex = fast_exp(x - cmax_tile[c]) * cinv_tile[c];
          if (i < 2) {
            g_exact0 += ex;
          } else {
            g_exact1 += ex;
          }
        }
        const float e = r * (i < 2 ? ri0 : ri1);
        if (i < 2) {
          share0 += e;
        } else {
          share1 += e;
        }
        s[j][i] = e;
      }
    }

    // Reference partial: sum over the warp's rows of w * p, then over warps below.
    float rs[SLOTS];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      rs[2 * j] = s[j][0] * w0 + s[j][2] * w1;
      rs[2 * j + 1] = s[j][1] * w0 + s[j][3] * w1;
    }
    reduce_scatter_columns<SLOTS>(rs, lane, SumOp());
#pragma unroll
    for (int i = 0; i < OWNED; ++i) {
      ref_part[warp * BK + owned_column<SLOTS>(lane, i)] = rs[i];
    }

    // Probe rows of this block: the 4 lanes holding the row add its p values at the keys' map
    // positions.
    for (int pi = probe_begin; pi < probe_end; ++pi) {
      const int row = p.probe_row[pi] - q0;
      if ((row >> 4) == warp && (row & 7) == g) {
        const bool upper = (row & 8) != 0;
        float* dst = p.probes + slot * p.probes_stride[0] + h * p.probes_stride[1] +
            static_cast<int64_t>(p.probe_slot[pi]) * p.probes_stride[2];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = k0 + j * 8 + 2 * t + e;
            if (key < nk) {
              const int position = key_slot == nullptr ? key : key_slot[key];
              dst[position * p.probes_stride[3]] += upper ? s[j][2 + e] : s[j][e];
            }
          }
        }
      }
    }

    block_sync();  // reference partials visible; everyone is done with key buffer buf
    if (tid < BK && k0 + tid < nk) {
      float total = ref_part[tid];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) {
        total += ref_part[w * BK + tid];
      }
      // The column-max buffer is free after the combine: it holds the reference partials now.
      p.col_max[(static_cast<int64_t>(pair) * cta.nqb + qb) * nkm + k0 + tid] = total;
    }
  }

  // Generated map: g = (exp(rowmax - A) * reused + exact) / (mapped keys), added into the
  // accumulator; the share likewise.
  g_reused0 = quad_sum(g_reused0);
  g_reused1 = quad_sum(g_reused1);
  g_exact0 = quad_sum(g_exact0);
  g_exact1 = quad_sum(g_exact1);
  share0 = quad_sum(share0);
  share1 = quad_sum(share1);
  if (t == 0) {
    const float inv_keys = 1.0f / static_cast<float>(nk);
    float* gen = p.generated + slot * p.generated_stride[0] + h * p.generated_stride[1];
    float* share = p.share == nullptr ? nullptr : p.share + slot * p.share_stride[0] + h * p.share_stride[1];
    if (mapped0) {
      gen[r0 * p.generated_stride[2]] += (exp_shifted(rm0, block_reference) * g_reused0 + g_exact0) * inv_keys;
      if (share != nullptr) {
        share[r0 * p.share_stride[2]] += share0;
      }
    }
    if (mapped1) {
      gen[r1 * p.generated_stride[2]] += (exp_shifted(rm1, block_reference) * g_reused1 + g_exact1) * inv_keys;
      if (share != nullptr) {
        share[r1 * p.share_stride[2]] += share1;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Reduce: reference[key_slot[j]] += (1 / Nqm) * sum over the mapped query blocks (in order) of
// the partials of column j.
// ------------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kColumnThreads) reduce_reference_kernel(const AttentionMapsLaunch p, int block_rows) {
  const int key = block_index_x() * kColumnThreads + thread_index();
  const int pair = block_index_y();
  const int slot = pair / p.heads;
  const int h = pair % p.heads;
  const int b = p.entries[slot];
  const int nkm = p.num_map_keys;
  if (key >= p.map_key_count[b]) {
    return;
  }
  const int nqb = (p.pass2_rows + block_rows - 1) / block_rows;
  const int map_blocks = map_query_blocks(p, block_rows);
  const float* parts = p.col_max + static_cast<int64_t>(pair) * nqb * nkm + key;
  float total = 0.0f;
  for (int qb = 0; qb < map_blocks; ++qb) {
    total += parts[static_cast<int64_t>(qb) * nkm];
  }
  const int position = p.key_slot == nullptr ? key : p.key_slot[static_cast<int64_t>(b) * nkm + key];
  p.reference[slot * p.reference_stride[0] + h * p.reference_stride[1] + position * p.reference_stride[2]] +=
      total * (1.0f / static_cast<float>(p.num_map_queries));
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

template <typename T, int DP>
cudaError_t run(const AttentionMapsLaunch& p, cudaStream_t stream) {
  using C = Config<T, DP>;
  const int nqb = (p.num_queries + C::kBQ - 1) / C::kBQ;
  const int map_pairs = p.map_count * p.heads;
  const int other_pairs = (p.batch - p.map_count) * p.heads;
  cudaError_t err = cudaSuccess;
  if (map_pairs > 0) {
    err = launch_kernel(attention_pass1_kernel<T, DP, true>, dim3(nqb, map_pairs), C::kThreads, C::kPass1Bytes, stream, p);
    if (err != cudaSuccess) {
      return err;
    }
  }
  if (other_pairs > 0) {
    err = launch_kernel(attention_pass1_kernel<T, DP, false>, dim3(nqb, other_pairs), C::kThreads, C::kPass1Bytes, stream, p);
    if (err != cudaSuccess) {
      return err;
    }
  }
  if (map_pairs == 0) {
    return cudaSuccess;
  }
  const dim3 column_grid((p.num_map_keys + kColumnThreads - 1) / kColumnThreads, map_pairs);
  err = launch_kernel(combine_columns_kernel, column_grid, kColumnThreads, 0, stream, p, C::kBQ);
  if (err != cudaSuccess) {
    return err;
  }
  const int pass2_blocks = (p.pass2_rows + C::kBQ - 1) / C::kBQ;
  err = launch_kernel(attention_pass2_kernel<T, DP>, dim3(pass2_blocks, map_pairs), C::kThreads, C::kPass2Bytes, stream, p);
  if (err != cudaSuccess) {
    return err;
  }
  return launch_kernel(reduce_reference_kernel, column_grid, kColumnThreads, 0, stream, p, C::kBQ);
}

}  // namespace

int padded_head_dim(int head_dim, int value_dim) {
  if (head_dim < 1 || value_dim < 1 || head_dim > kMaxHeadDim || value_dim > kMaxHeadDim) {
    return 0;
  }
  const int width = head_dim > value_dim ? head_dim : value_dim;
  for (const int padded : kPaddedWidths) {
    if (width <= padded) {
      return padded;
    }
  }
  return 0;
}

int query_block_size(ElementType dtype, int padded_dim) {
  return I2AM_KERNEL_SWITCH(dtype, padded_dim, T, DP, 0, [&] { return Config<T, DP>::kBQ; });
}

int shared_memory_bytes(ElementType dtype, int padded_dim) {
  return I2AM_KERNEL_SWITCH(dtype, padded_dim, T, DP, 0, [&] { return Config<T, DP>::kSmemBytes; });
}

cudaError_t launch_attention_with_maps(const AttentionMapsLaunch& launch, cudaStream_t stream) {
  if (launch.batch < 1 || launch.heads < 1 || launch.num_queries < 1 || launch.num_keys < 1 ||
      launch.map_count < 0 || launch.map_count > launch.batch || launch.key_count == nullptr ||
      (launch.map_count > 0 && (launch.num_map_queries < 1 || launch.num_map_keys < 1 ||
                                launch.pass2_rows < launch.num_map_queries || launch.map_key_count == nullptr)) ||
      padded_head_dim(launch.head_dim, launch.value_dim) != launch.padded_dim) {
    return cudaErrorInvalidValue;
  }
  return I2AM_KERNEL_SWITCH(launch.dtype, launch.padded_dim, T, DP, cudaErrorInvalidValue,
                            [&] { return run<T, DP>(launch, stream); });
}

}  // namespace cuda
}  // namespace i2am_fast
