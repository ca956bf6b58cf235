// CPU implementation of i2am_fast::attention_with_maps_accumulate (the functional op is zeros plus
// this one, registered once for every back end in ../attention_with_maps_composite.cpp).
//
// The score matrix S = q kᵀ scale of one (batch, head) is visited in tiles of kQueryBlock x
// kKeyBlock and never stored whole (docs/design.md, "The kernels"). Rows and columns are visited in
// the token order of attention_with_maps.h, so that the mapped queries and keys are prefixes:
//   pass 1  for every batch entry, every row x every unmasked column: online softmax over key
//           blocks gives the output and the row statistics (max, sum); for map entries the
//           tiles' mapped rows x mapped columns give column statistics per query chunk;
//   combine the column statistics of the chunks, in chunk order;
//   pass 2  for map entries only, rows [0, R2) x mapped columns: recompute the tiles; the
//           key-axis softmax row p = exp(S - rowmax) / rowsum feeds the reference map, the share
//           and the probe rows, and exp(S - colmax) / colsum (the query-axis softmax) feeds the
//           generated map.
// Every statistic stays a (max, sum) pair and no log-sum-exp is ever subtracted from a score,
// so the maps keep float32's relative precision at any |S| (tile_math.h; docs/design.md,
// "Numerical accuracy"). A row whose scores are all -inf has sum 0: its output is NaN, as
// torch's softmax gives, and it adds 0 to every map; a column that is -inf for every mapped
// query likewise adds 0.
// Products of tiles go to the BLAS behind at::mm; the per-score work is in row_kernels.cpp.
// Work items are (batch, head, chunk of query blocks); threads take them from a shared counter,
// and every reduction over chunks runs in chunk order afterwards, so results do not depend on
// the thread count or the schedule.
#include "kernel.h"

#include <torch/library.h>

namespace i2am_fast {
namespace {

constexpr const char* kOpName = "attention_with_maps_accumulate";

// BLAS needs unit stride along the feature dimension; any other layout is copied once.
at::Tensor with_unit_feature_stride(const at::Tensor& x) {
  return x.stride(3) == 1 ? x : x.contiguous();
}

at::Tensor attention_with_maps_accumulate_cpu(
    const at::Tensor& q_in,
    const at::Tensor& k_in,
    const at::Tensor& v_in,
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
      kOpName, q_in, k_in, v_in, scale, query_weights, probe_index, map_batch, map_queries, map_keys,
      key_padding_mask, /*allow_float64=*/true);
  TORCH_CHECK_VALUE(q_in.device().is_cpu(), kOpName, ": expected CPU tensors, got q on ", q_in.device(), ".");
  check_map_accumulators(kOpName, problem, q_in, k_in, v_in, generated, reference, probes, share);
  at::Tensor probes_acc = probes.has_value() && probes->defined() ? *probes : at::Tensor();
  at::Tensor share_acc = share.has_value() && share->defined() ? *share : at::Tensor();

  const at::Tensor q = with_unit_feature_stride(q_in);
  const at::Tensor k = with_unit_feature_stride(k_in);
  const at::Tensor v = with_unit_feature_stride(v_in);
  at::Tensor output = at::empty({problem.batch, problem.heads, problem.num_queries, problem.value_dim}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_with_maps_cpu", [&] {
    cpu::AttentionWithMapsCpu<scalar_t>(
        problem, q, k, v, output, generated, reference, probes_acc.defined() ? &probes_acc : nullptr,
        share_acc.defined() ? &share_acc : nullptr)
        .run();
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(i2am_fast, CPU, m) {
  m.impl("attention_with_maps_accumulate", &attention_with_maps_accumulate_cpu);
}

}  // namespace i2am_fast
