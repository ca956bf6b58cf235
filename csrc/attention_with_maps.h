// Declarations shared by the operator registration, the CPU implementation and the CUDA glue:
// the checked description of one attention-with-maps call, and the checks that produce it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <optional>
#include <vector>

namespace i2am_fast {

// One attention-with-maps call after every argument has been checked.
//   q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]; maps for the Bm = map_batch.size()
//   batch entries listed in map_batch, in that order; P = probe_index.size() probe rows.
struct AttentionMapsProblem {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t num_queries = 0;
  int64_t num_keys = 0;
  int64_t head_dim = 0;
  int64_t value_dim = 0;
  double scale = 0.0;
  std::vector<int64_t> map_batch;    // batch entry of each map slot
  std::vector<int64_t> map_slot;     // per batch entry: its map slot, or -1
  std::vector<int64_t> probe_index;  // query index of each probe row, in range
  // float32 [B, Nq] on q's device (the [Nq] form already expanded), or undefined for all ones.
  at::Tensor query_weights;

  int64_t map_count() const { return static_cast<int64_t>(map_batch.size()); }
  int64_t probe_count() const { return static_cast<int64_t>(probe_index.size()); }
};

// Checks q, k, v and the optional arguments; every failure is a ValueError that names the
// argument and says what was expected. `allow_float64` is false on devices whose kernels
// have no float64 path.
AttentionMapsProblem check_attention_with_maps_inputs(
    const char* op_name,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    std::optional<double> scale,
    const std::optional<at::Tensor>& query_weights,
    const std::optional<at::Tensor>& probe_index,
    at::OptionalIntArrayRef map_batch,
    bool allow_float64);

// Checks caller-owned float32 accumulators: generated [Bm, H, Nq], reference [Bm, H, Nk],
// probes [Bm, H, P, Nk] (may be absent when P == 0), all on q's device. Any strides.
void check_map_accumulators(
    const char* op_name,
    const AttentionMapsProblem& problem,
    const at::Tensor& q,
    const at::Tensor& generated,
    const at::Tensor& reference,
    const std::optional<at::Tensor>& probes);

// Zero-filled float32 accumulators for the functional op: generated, reference, probes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> make_map_accumulators(
    const AttentionMapsProblem& problem, const at::Tensor& q);

}  // namespace i2am_fast
