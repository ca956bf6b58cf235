// Declarations shared by the operator registration, the CPU implementation and the CUDA glue:
// the checked description of one attention-with-maps call, and the checks that produce it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace i2am_fast {

// One attention-with-maps call after every argument has been checked.
//
//   q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]; maps for the Bm = map_batch.size() batch
//   entries listed in map_batch, in that order; P = probe_index.size() probe rows. The maps are
//   taken over a sub-block of the call (docs/design.md, "Reference tokens inside one softmax"):
//   the generated queries Qg (map_queries, Nqm of them) and the reference keys Kr (map_keys, Nkm
//   of them); keys that key_padding_mask leaves out take part in nothing.
//
// Token order tables. Both back ends visit the scores in a reordered index space, so that every
// set the kernel sweeps is a prefix:
//
//   query rows (one order for every batch entry), r in [0, Nq):
//       [ map_queries in index order | probe queries outside Qg (distinct, ascending) | the rest ]
//       rows [0, Nqm) are the mapped queries (row r is map output position r); rows [Nqm, R2)
//       exist only for probes; R2 = pass2_rows.
//   key columns (per batch entry b, because of the mask), j in [0, key_count[b]):
//       [ unmasked mapped keys in map_keys order | unmasked other keys, ascending ]
//       columns [0, map_key_count[b]) are the mapped keys; column j's map output position is
//       key_slot[b * Nkm + j]. Masked keys are not in the list at all.
//
//   pass 1 (every entry): rows [0, Nq) x columns [0, key_count[b]) give the output (row r is
//       written to query query_order[r]) and the row statistics; for map entries, rows [0, Nqm)
//       x columns [0, map_key_count[b]) also give the column statistics.
//   pass 2 (map entries): rows [0, R2) x columns [0, map_key_count[b]) only.
//
// Numerics both back ends follow (tile_math.h; docs/design.md, "Numerical accuracy"): row and
// column statistics stay (max, sum) pairs, kept for pass 2 as (max, inverse_sum); a softmax
// weight is exp(S - max) * inverse_sum, never exp(S - log-sum-exp). A row whose scores are all
// -inf (sum 0) gets output NaN and adds 0 to every map; a column that is -inf for every mapped
// query adds 0 (kept as max = +inf, inverse_sum = 0). The generated map divides by
// map_key_count[b] (0 when that is 0), the reference map by Nqm.
//
// With map_queries, map_keys and key_padding_mask all None (or equivalent: every query, every
// key in order, nothing masked) the tables are the identity, queries_in_order and every
// keys_in_order[b] are true, and the back ends read q, k, v in place as before.
struct AttentionMapsProblem {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t num_queries = 0;  // Nq
  int64_t num_keys = 0;     // Nk
  int64_t head_dim = 0;
  int64_t value_dim = 0;
  double scale = 0.0;       // finite, and finite in float32
  std::vector<int64_t> map_batch;    // batch entry of each map slot
  std::vector<int64_t> map_slot;     // per batch entry: its map slot, or -1
  std::vector<int64_t> probe_index;  // full query position of each probe, in [0, Nq)
  // float32 [B, Nqm] on q's device, contiguous (the [Nqm] form already expanded), finite;
  // undefined for all ones. Column r weights query row r (r < Nqm).
  at::Tensor query_weights;

  // --- token order tables (see above) ---
  int64_t num_map_queries = 0;          // Nqm >= 1
  int64_t num_map_keys = 0;             // Nkm >= 1
  int64_t pass2_rows = 0;               // R2 = Nqm + probe queries outside Qg
  bool queries_in_order = true;         // query_order[r] == r for every r
  std::vector<int64_t> query_order;     // [Nq]: query position of row r
  std::vector<int64_t> probe_row;       // [P]: row of each probe's query (< R2)
  std::vector<int64_t> key_count;       // [B]: unmasked keys of entry b (>= 1)
  std::vector<int64_t> map_key_count;   // [B]: unmasked mapped keys of entry b (may be 0)
  std::vector<int64_t> key_order;       // [B * Nk]: entry b's key of column j; -1 past key_count[b]
  std::vector<int64_t> key_slot;        // [B * Nkm]: map output position of column j < map_key_count[b]; -1 past it
  std::vector<uint8_t> keys_in_order;   // [B]: 1 when entry b's key order is the identity over all Nk keys

  int64_t map_count() const { return static_cast<int64_t>(map_batch.size()); }
  int64_t probe_count() const { return static_cast<int64_t>(probe_index.size()); }
  const int64_t* key_order_of(int64_t b) const { return key_order.data() + b * num_keys; }
  const int64_t* key_slot_of(int64_t b) const { return key_slot.data() + b * num_map_keys; }
};

// Checks q, k, v and the optional arguments and builds the token order tables; every failure is
// a ValueError that names the argument and says what was expected. Index tensors and the mask
// are read on the host (a device synchronisation for CUDA inputs). `allow_float64` is false on
// devices whose kernels have no float64 path.
AttentionMapsProblem check_attention_with_maps_inputs(
    const char* op_name,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    std::optional<double> scale,
    const std::optional<at::Tensor>& query_weights,
    const std::optional<at::Tensor>& probe_index,
    at::OptionalIntArrayRef map_batch,
    const std::optional<at::Tensor>& map_queries,
    const std::optional<at::Tensor>& map_keys,
    const std::optional<at::Tensor>& key_padding_mask,
    bool allow_float64);

// Checks caller-owned float32 accumulators: generated [Bm, H, Nqm], reference [Bm, H, Nkm],
// probes [Bm, H, P, Nkm] (may be absent when P == 0), share [Bm, H, Nqm] (optional), all on
// q's device, any strides, but none of them sharing memory with itself (no expanded or stride-0
// views), with another accumulator, or with q, k, v.
void check_map_accumulators(
    const char* op_name,
    const AttentionMapsProblem& problem,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const at::Tensor& generated,
    const at::Tensor& reference,
    const std::optional<at::Tensor>& probes,
    const std::optional<at::Tensor>& share);

// Zero-filled float32 accumulators for the functional op: generated, reference, probes, share.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_map_accumulators(
    const AttentionMapsProblem& problem, const at::Tensor& q);

// Builds the token order tables of `problem` (sizes, map_batch and probe_index already set) from
// the checked index sets; nullopt = every query / every key / nothing masked. Used by
// check_attention_with_maps_inputs.
void build_token_order(
    const char* op_name,
    AttentionMapsProblem& problem,
    const std::optional<std::vector<int64_t>>& map_queries,
    const std::optional<std::vector<int64_t>>& map_keys,
    const std::optional<std::vector<uint8_t>>& key_mask);

}  // namespace i2am_fast
