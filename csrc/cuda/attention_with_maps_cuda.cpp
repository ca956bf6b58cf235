// CUDA back end of i2am_fast::attention_with_maps_accumulate (the functional op is zeros plus
// this kernel, registered once for every back end in ../attention_with_maps_composite.cpp):
// argument checks (shared with the CPU back end), device guard, stream, the token order tables
// copied to the device, scratch buffers from the caching allocator, and the dispatcher
// registration. The kernels themselves are in
// attention_with_maps_kernels.cu (see there for the algorithm); this file is compiled only
// when torch has CUDA.
//
// Accumulators: the kernels add straight into the caller's float32 tensors through their
// strides (any strides, e.g. a slice state[:, tau] of a larger state); every element is
// updated by exactly one thread, so there is no temporary and no extra add_. Views whose
// elements overlap (a stride-0 expanded accumulator) are not supported.
//
// Scratch per call, only when maps are requested (Bm map entries, R2 = pass-2 rows,
// nqb2 = ceil(R2 / query block), Nkm mapped keys): row max and 1 / sum [Bm, H, R2], column max
// and 1 / sum [Bm, H, Nkm], column partials (max, sum) [Bm, H, nqb2, Nkm] (the max buffer is
// reused for the reference partials in pass 2), all float32, and one int32 table (batch
// entries, the token order tables that are not the identity, key counts, sorted probe rows).
#include "../attention_with_maps.h"
#include "attention_with_maps_kernels.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream, the function at::cuda re-exports;
                                  // unlike ATen/cuda/CUDAContext.h it needs no cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace i2am_fast {
namespace {

namespace kernels = ::i2am_fast::cuda;

constexpr const char* kOpName = "attention_with_maps_accumulate";

// The kernels' element type for a torch dtype (the list is I2AM_CUDA_ELEMENT_TYPES).
kernels::ElementType element_type(at::ScalarType t) {
  switch (t) {
#define I2AM_TORCH_DTYPE_CASE(enumerator, type, torch_type, name) \
  case at::ScalarType::torch_type:                                \
    return kernels::ElementType::enumerator;
    I2AM_CUDA_ELEMENT_TYPES(I2AM_TORCH_DTYPE_CASE)
#undef I2AM_TORCH_DTYPE_CASE
    default: break;
  }
#define I2AM_DTYPE_NAME(enumerator, type, torch_type, name) " " name
  TORCH_CHECK_VALUE(false, kOpName, ": q has dtype ", t, "; the CUDA kernels support these dtypes:",
                    I2AM_CUDA_ELEMENT_TYPES(I2AM_DTYPE_NAME), ".");
#undef I2AM_DTYPE_NAME
  return kernels::ElementType::kFloat32;
}

// The kernels read rows with unit stride; any other layout is copied once (as on the CPU).
at::Tensor with_unit_feature_stride(const at::Tensor& x) {
  return x.stride(3) == 1 ? x : x.contiguous();
}

// 16-byte copies are allowed when every row start is 16-byte aligned and a row is a whole
// number of 16-byte chunks.
bool vectorizable(const at::Tensor& x) {
  const int64_t esize = x.element_size();
  if ((x.size(3) * esize) % 16 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) {
    return false;
  }
  for (int d = 0; d < 3; ++d) {
    if (x.size(d) > 1 && (x.stride(d) * esize) % 16 != 0) {
      return false;
    }
  }
  return true;
}

void copy_strides(int64_t* dst, const at::Tensor& t, int count) {
  for (int d = 0; d < count; ++d) {
    dst[d] = t.stride(d);
  }
}

int checked_int(int64_t value, const char* what) {
  TORCH_CHECK_VALUE(
      value <= std::numeric_limits<int32_t>::max(), kOpName, ": ", what, " = ", value,
      " is too large for the CUDA kernels (at most 2^31 - 1).");
  return static_cast<int>(value);
}

// The kernels' int32 copy of a table.
void append_int32(std::vector<int32_t>& table, const std::vector<int64_t>& values) {
  for (const int64_t value : values) {
    table.push_back(static_cast<int32_t>(value));
  }
}

at::Tensor run_cuda(
    const AttentionMapsProblem& problem,
    const at::Tensor& q_in,
    const at::Tensor& k_in,
    const at::Tensor& v_in,
    at::Tensor& generated,
    at::Tensor& reference,
    at::Tensor* probes,
    at::Tensor* share) {
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_unit_feature_stride(q_in);
  const at::Tensor k = with_unit_feature_stride(k_in);
  const at::Tensor v = with_unit_feature_stride(v_in);

  TORCH_CHECK_VALUE(
      problem.head_dim <= kernels::kMaxHeadDim, kOpName, ": q and k have head_dim ", problem.head_dim,
      " (dim 3); the CUDA kernels support head dims from 1 to ", kernels::kMaxHeadDim, ".");
  TORCH_CHECK_VALUE(
      problem.value_dim <= kernels::kMaxHeadDim, kOpName, ": v has value_dim ", problem.value_dim,
      " (dim 3); the CUDA kernels support value dims from 1 to ", kernels::kMaxHeadDim, ".");

  at::Tensor output =
      at::empty({problem.batch, problem.heads, problem.num_queries, problem.value_dim}, q.options());
  if (output.numel() == 0) {
    return output;
  }

  kernels::AttentionMapsLaunch launch;
  launch.dtype = element_type(q.scalar_type());
  launch.batch = checked_int(problem.batch, "batch");
  launch.heads = checked_int(problem.heads, "heads");
  launch.num_queries = checked_int(problem.num_queries, "num_queries");
  launch.num_keys = checked_int(problem.num_keys, "num_keys");
  checked_int(problem.batch * problem.num_keys, "batch x num_keys");
  launch.head_dim = static_cast<int>(problem.head_dim);
  launch.value_dim = static_cast<int>(problem.value_dim);
  launch.padded_dim = kernels::padded_head_dim(launch.head_dim, launch.value_dim);
  launch.map_count = static_cast<int>(problem.map_count());
  launch.scale = static_cast<float>(problem.scale);
  launch.q = q.data_ptr();
  launch.k = k.data_ptr();
  launch.v = v.data_ptr();
  copy_strides(launch.q_stride, q, 3);
  copy_strides(launch.k_stride, k, 3);
  copy_strides(launch.v_stride, v, 3);
  launch.q_vectorized = vectorizable(q);
  launch.k_vectorized = vectorizable(k);
  launch.v_vectorized = vectorizable(v);
  launch.output = output.data_ptr();
  launch.num_map_queries = static_cast<int>(problem.num_map_queries);
  launch.num_map_keys = static_cast<int>(problem.num_map_keys);
  launch.pass2_rows = static_cast<int>(problem.pass2_rows);

  const int64_t bm = problem.map_count();
  const int64_t grid_limit = 65535;  // CTAs along grid y: (map or other entries) x heads
  TORCH_CHECK_VALUE(
      std::max(bm, problem.batch - bm) * problem.heads <= grid_limit, kOpName,
      ": batch entries x heads = ", std::max(bm, problem.batch - bm) * problem.heads,
      " exceeds the CUDA grid limit of ", grid_limit, "; split the batch.");
  const int64_t block = kernels::query_block_size(launch.dtype, launch.padded_dim);
  // Pass 2 sweeps rows [0, R2): its query blocks index the column and reference partials.
  const int64_t pass2_blocks = (problem.pass2_rows + block - 1) / block;

  // One int32 table, copied to the device once: batch entries (map entries in slot order, then
  // the others), the token order tables that are not the identity, the key counts and, for
  // probes, the (row, slot) pairs sorted by row with the first pair of every pass-2 block.
  const bool keys_in_order =
      std::all_of(problem.keys_in_order.begin(), problem.keys_in_order.end(), [](uint8_t in) { return in != 0; });
  const bool with_probes = bm > 0 && probes != nullptr && problem.probe_count() > 0;
  std::vector<int32_t> table;
  for (const int64_t entry : problem.map_batch) {
    table.push_back(static_cast<int32_t>(entry));
  }
  for (int64_t entry = 0; entry < problem.batch; ++entry) {
    if (problem.map_slot[entry] < 0) {
      table.push_back(static_cast<int32_t>(entry));
    }
  }
  const int64_t query_order_at = static_cast<int64_t>(table.size());
  if (!problem.queries_in_order) {
    append_int32(table, problem.query_order);
  }
  const int64_t key_order_at = static_cast<int64_t>(table.size());
  if (!keys_in_order) {
    append_int32(table, problem.key_order);
  }
  const int64_t key_slot_at = static_cast<int64_t>(table.size());
  if (!keys_in_order) {
    append_int32(table, problem.key_slot);
  }
  const int64_t key_count_at = static_cast<int64_t>(table.size());
  append_int32(table, problem.key_count);
  const int64_t map_key_count_at = static_cast<int64_t>(table.size());
  append_int32(table, problem.map_key_count);
  const int64_t probe_row_at = static_cast<int64_t>(table.size());
  if (with_probes) {
    std::vector<std::pair<int64_t, int64_t>> order;  // (row, probe slot)
    order.reserve(problem.probe_count());
    for (int64_t slot = 0; slot < problem.probe_count(); ++slot) {
      order.emplace_back(problem.probe_row[slot], slot);
    }
    std::sort(order.begin(), order.end());
    for (const auto& item : order) {
      table.push_back(static_cast<int32_t>(item.first));
    }
    for (const auto& item : order) {
      table.push_back(static_cast<int32_t>(item.second));
    }
    size_t next = 0;
    for (int64_t qb = 0; qb <= pass2_blocks; ++qb) {
      while (next < order.size() && order[next].first < qb * block) {
        ++next;
      }
      table.push_back(static_cast<int32_t>(next));
    }
  }
  // A synchronous copy from pageable memory: `table` may go out of scope afterwards.
  const at::Tensor table_device =
      at::from_blob(table.data(), {static_cast<int64_t>(table.size())}, at::TensorOptions().dtype(at::kInt))
          .to(q.device());
  const int32_t* table_ptr = table_device.data_ptr<int32_t>();
  launch.entries = table_ptr;
  launch.query_order = problem.queries_in_order ? nullptr : table_ptr + query_order_at;
  launch.key_order = keys_in_order ? nullptr : table_ptr + key_order_at;
  launch.key_slot = keys_in_order ? nullptr : table_ptr + key_slot_at;
  launch.key_count = table_ptr + key_count_at;
  launch.map_key_count = table_ptr + map_key_count_at;

  at::Tensor row_max, row_inv, col_max, col_sum, col_stat_max, col_stat_inv;
  if (bm > 0) {
    const auto f32 = q.options().dtype(at::kFloat);
    row_max = at::empty({bm, problem.heads, problem.pass2_rows}, f32);
    row_inv = at::empty({bm, problem.heads, problem.pass2_rows}, f32);
    col_max = at::empty({bm, problem.heads, pass2_blocks, problem.num_map_keys}, f32);
    col_sum = at::empty({bm, problem.heads, pass2_blocks, problem.num_map_keys}, f32);
    col_stat_max = at::empty({bm, problem.heads, problem.num_map_keys}, f32);
    col_stat_inv = at::empty({bm, problem.heads, problem.num_map_keys}, f32);
    launch.row_max = row_max.data_ptr<float>();
    launch.row_inv = row_inv.data_ptr<float>();
    launch.col_max = col_max.data_ptr<float>();
    launch.col_sum = col_sum.data_ptr<float>();
    launch.col_stat_max = col_stat_max.data_ptr<float>();
    launch.col_stat_inv = col_stat_inv.data_ptr<float>();
    launch.query_weights = problem.query_weights.defined() ? problem.query_weights.data_ptr<float>() : nullptr;
    launch.generated = generated.data_ptr<float>();
    copy_strides(launch.generated_stride, generated, 3);
    launch.reference = reference.data_ptr<float>();
    copy_strides(launch.reference_stride, reference, 3);
    if (share != nullptr) {
      launch.share = share->data_ptr<float>();
      copy_strides(launch.share_stride, *share, 3);
    }
    if (with_probes) {
      launch.probes = probes->data_ptr<float>();
      copy_strides(launch.probes_stride, *probes, 4);
      launch.probe_count = static_cast<int>(problem.probe_count());
      launch.probe_row = table_ptr + probe_row_at;
      launch.probe_slot = table_ptr + probe_row_at + problem.probe_count();
      launch.probe_block_start = table_ptr + probe_row_at + 2 * problem.probe_count();
    }
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(kernels::launch_attention_with_maps(launch, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}

}  // namespace

at::Tensor attention_with_maps_accumulate_cuda(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    at::Tensor& generated,
    at::Tensor& reference,
    const std::optional<at::Tensor>& probes,
    const std::optional<at::Tensor>& share,
    std::optional<double> scale,
    const std::optional<at::Tensor>& query_weights,
    const std::optional<at::Tensor>& probe_index,
    at::OptionalIntArrayRef map_batch,
    const std::optional<at::Tensor>& map_queries,
    const std::optional<at::Tensor>& map_keys,
    const std::optional<at::Tensor>& key_padding_mask) {
  const AttentionMapsProblem problem = check_attention_with_maps_inputs(
      kOpName, q, k, v, scale, query_weights, probe_index, map_batch, map_queries, map_keys, key_padding_mask,
      /*allow_float64=*/false);
  check_map_accumulators(kOpName, problem, q, k, v, generated, reference, probes, share);
  at::Tensor probes_acc = probes.has_value() && probes->defined() ? *probes : at::Tensor();
  at::Tensor share_acc = share.has_value() && share->defined() ? *share : at::Tensor();
  return run_cuda(
      problem, q, k, v, generated, reference, probes_acc.defined() ? &probes_acc : nullptr,
      share_acc.defined() ? &share_acc : nullptr);
}

// Only the accumulating kernel: the functional op is the composite of
// ../attention_with_maps_composite.cpp (zeros plus this kernel).
TORCH_LIBRARY_IMPL(i2am_fast, CUDA, m) {
  m.impl("attention_with_maps_accumulate", &attention_with_maps_accumulate_cuda);
}

}  // namespace i2am_fast
