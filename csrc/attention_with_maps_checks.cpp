// Argument checks for i2am_fast::attention_with_maps and its accumulating variant, shared by
// every back end so that a bad call fails the same way on CPU and CUDA.
#include "attention_with_maps.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>

namespace i2am_fast {
namespace {

std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

bool is_supported_dtype(at::ScalarType t, bool allow_float64) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 ||
      (allow_float64 && t == at::kDouble);
}

void check_qkv_tensor(const char* op, const char* name, const at::Tensor& t, const char* layout) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor; expected ", layout, ".");
  TORCH_CHECK_VALUE(
      t.dim() == 4, op, ": ", name, " must be a 4-D tensor ", layout, ", got shape ",
      shape_string(t), " (", t.dim(), "-D). Split the heads first: x.view(B, N, H, D).transpose(1, 2).");
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A 1-D integer tensor of positions in [0, limit), read to the host. `what` names one position
// ("query", "key"); with `distinct`, a position may appear once.
std::vector<int64_t> read_positions(
    const char* op, const char* name, const at::Tensor& idx, int64_t limit, const char* what, bool distinct) {
  TORCH_CHECK_VALUE(
      idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op, ": ", name,
      " must be an integer (int64 or int32) tensor of ", what, " positions, got ", idx.scalar_type(), ".");
  TORCH_CHECK_VALUE(idx.dim() == 1, op, ": ", name, " must be 1-D, got shape ", shape_string(idx), ".");
  const at::Tensor host = idx.to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = host.const_data_ptr<int64_t>();
  std::vector<int64_t> positions(data, data + host.numel());
  std::vector<uint8_t> seen(distinct ? limit : 0, 0);
  for (const int64_t position : positions) {
    TORCH_CHECK_VALUE(
        position >= 0 && position < limit, op, ": ", name, " entry ", position, " is out of range for ", limit,
        " ", what, "s; entries must lie in [0, ", limit, ").");
    if (distinct) {
      TORCH_CHECK_VALUE(
          !seen[position], op, ": ", name, " lists ", what, " ", position,
          " twice; each position may appear once.");
      seen[position] = 1;
    }
  }
  return positions;
}

std::optional<std::vector<int64_t>> read_index_set(
    const char* op, const char* name, const std::optional<at::Tensor>& idx, int64_t limit, const char* what) {
  if (!given(idx)) {
    return std::nullopt;
  }
  std::vector<int64_t> positions = read_positions(op, name, *idx, limit, what, /*distinct=*/true);
  TORCH_CHECK_VALUE(
      !positions.empty(), op, ": ", name, " is empty; list at least one ", what, ", or pass None for every ", what,
      ".");
  return positions;
}

std::optional<std::vector<uint8_t>> read_key_mask(
    const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& q, int64_t batch, int64_t keys) {
  if (!given(mask)) {
    return std::nullopt;
  }
  const at::Tensor& m = *mask;
  TORCH_CHECK_VALUE(
      m.scalar_type() == at::kBool, op, ": key_padding_mask must be a bool tensor [batch, keys] (True = the key ",
      "takes part), got ", m.scalar_type(), ".");
  TORCH_CHECK_VALUE(
      m.dim() == 2 && m.size(0) == batch && m.size(1) == keys, op, ": key_padding_mask must have shape [batch, keys] = [",
      batch, ", ", keys, "], got ", shape_string(m), ".");
  TORCH_CHECK_VALUE(
      m.device() == q.device(), op, ": key_padding_mask must be on q's device ", q.device(), ", got ", m.device(), ".");
  const at::Tensor host = m.to(at::kCPU, at::kByte).contiguous();
  const uint8_t* data = host.const_data_ptr<uint8_t>();
  return std::vector<uint8_t>(data, data + host.numel());
}

}  // namespace

AttentionMapsProblem check_attention_with_maps_inputs(
    const char* op,
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
    bool allow_float64) {
  check_qkv_tensor(op, "q", q, "[batch, heads, queries, head_dim]");
  check_qkv_tensor(op, "k", k, "[batch, heads, keys, head_dim]");
  check_qkv_tensor(op, "v", v, "[batch, heads, keys, value_dim]");

  TORCH_CHECK_VALUE(
      k.device() == q.device() && v.device() == q.device(), op,
      ": q, k and v must be on one device, got q on ", q.device(), ", k on ", k.device(),
      ", v on ", v.device(), ".");
  TORCH_CHECK_VALUE(
      k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
      ": q, k and v must share one dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(),
      ", v ", v.scalar_type(), ".");
  TORCH_CHECK_VALUE(
      is_supported_dtype(q.scalar_type(), allow_float64), op, ": q has dtype ", q.scalar_type(),
      "; supported are float32, float16 and bfloat16", allow_float64 ? " and float64" : "",
      " on ", q.device().type(), allow_float64 ? "." : " (float64 is CPU-only: move the inputs to the CPU or cast them).");

  AttentionMapsProblem p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.num_queries = q.size(2);
  p.head_dim = q.size(3);
  p.num_keys = k.size(2);
  p.value_dim = v.size(3);

  TORCH_CHECK_VALUE(
      k.size(0) == p.batch && v.size(0) == p.batch, op,
      ": q, k and v must have the same batch size (dim 0), got q ", shape_string(q), ", k ",
      shape_string(k), ", v ", shape_string(v), ".");
  TORCH_CHECK_VALUE(
      k.size(1) == p.heads && v.size(1) == p.heads, op,
      ": q, k and v must have the same number of heads (dim 1), got q ", shape_string(q), ", k ",
      shape_string(k), ", v ", shape_string(v), ".");
  TORCH_CHECK_VALUE(
      k.size(3) == p.head_dim, op, ": k's head_dim (dim 3) must equal q's, got q ",
      shape_string(q), " and k ", shape_string(k), ".");
  TORCH_CHECK_VALUE(
      v.size(2) == p.num_keys, op, ": v must have as many keys (dim 2) as k, got k ",
      shape_string(k), " and v ", shape_string(v), ".");
  TORCH_CHECK_VALUE(p.num_queries >= 1, op, ": q has no queries (dim 2 is 0); need at least 1.");
  TORCH_CHECK_VALUE(p.num_keys >= 1, op, ": k has no keys (dim 2 is 0); need at least 1.");
  TORCH_CHECK_VALUE(p.head_dim >= 1, op, ": q and k have head_dim 0; need at least 1.");
  TORCH_CHECK_VALUE(p.value_dim >= 1, op, ": v has value_dim 0 (dim 3); need at least 1.");

  p.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.head_dim));
  TORCH_CHECK_VALUE(
      std::isfinite(p.scale), op, ": scale must be a finite number, got ", p.scale,
      " (it multiplies every score; a NaN or infinite scale makes every softmax NaN).");
  TORCH_CHECK_VALUE(
      std::isfinite(static_cast<float>(p.scale)), op, ": scale must be finite in float32 (|scale| < 3.4e38), got ",
      p.scale, "; the kernels multiply the queries by it in float32, where it would be infinite.");

  // map_batch: distinct batch entries, in the caller's order.
  p.map_slot.assign(p.batch, -1);
  if (map_batch.has_value()) {
    for (const int64_t entry : *map_batch) {
      TORCH_CHECK_VALUE(
          entry >= 0 && entry < p.batch, op, ": map_batch entry ", entry,
          " is out of range for batch size ", p.batch, "; entries must lie in [0, ", p.batch, ").");
      TORCH_CHECK_VALUE(
          p.map_slot[entry] < 0, op, ": map_batch lists batch entry ", entry,
          " twice; each entry may get maps once.");
      p.map_slot[entry] = static_cast<int64_t>(p.map_batch.size());
      p.map_batch.push_back(entry);
    }
  } else {
    for (int64_t entry = 0; entry < p.batch; ++entry) {
      p.map_slot[entry] = entry;
      p.map_batch.push_back(entry);
    }
  }

  if (given(probe_index)) {
    p.probe_index = read_positions(op, "probe_index", *probe_index, p.num_queries, "query", /*distinct=*/false);
  }
  const auto queries = read_index_set(op, "map_queries", map_queries, p.num_queries, "query");
  const auto keys = read_index_set(op, "map_keys", map_keys, p.num_keys, "key");
  const auto mask = read_key_mask(op, key_padding_mask, q, p.batch, p.num_keys);
  build_token_order(op, p, queries, keys, mask);

  if (given(query_weights)) {
    const at::Tensor& w = *query_weights;
    const int64_t nqm = p.num_map_queries;
    TORCH_CHECK_VALUE(
        at::isFloatingType(w.scalar_type()), op,
        ": query_weights must be a floating-point tensor, got ", w.scalar_type(), ".");
    TORCH_CHECK_VALUE(
        w.device() == q.device(), op, ": query_weights must be on q's device ", q.device(),
        ", got ", w.device(), ".");
    const bool per_batch = w.dim() == 2 && w.size(0) == p.batch && w.size(1) == nqm;
    const bool shared = w.dim() == 1 && w.size(0) == nqm;
    TORCH_CHECK_VALUE(
        per_batch || shared, op, ": query_weights must have shape [batch, mapped queries] = [", p.batch,
        ", ", nqm, "] or [mapped queries] = [", nqm, "] (one weight per map_queries entry, or per query when ",
        "map_queries is None), got ", shape_string(w), ".");
    TORCH_CHECK_VALUE(
        !(w.requires_grad() && c10::GradMode::is_enabled()), op,
        ": query_weights requires grad, but the op is inference-only and has no backward; pass "
        "query_weights.detach(), or call it under torch.no_grad() or torch.inference_mode().");
    p.query_weights = (shared ? w.unsqueeze(0).expand({p.batch, nqm}) : w).to(at::kFloat).contiguous();
    // A NaN or infinite weight would make the whole reference map NaN (it is a sum over queries).
    if (!at::isfinite(p.query_weights).all().item<bool>()) {
      const at::Tensor bad = at::logical_not(at::isfinite(p.query_weights)).nonzero();
      const at::Tensor first = bad[0].cpu();
      const int64_t row = first[0].item<int64_t>();
      const int64_t column = first[1].item<int64_t>();
      TORCH_CHECK_VALUE(
          false, op, ": query_weights must be finite, got ", p.query_weights.select(0, row)[column].item<float>(),
          " at ", shared ? "index " : "[batch, index] ", shared ? "" : std::to_string(row) + ", ", column,
          " (after conversion to float32).");
    }
  }

  if (c10::GradMode::is_enabled()) {
    TORCH_CHECK_VALUE(
        !q.requires_grad() && !k.requires_grad() && !v.requires_grad(), op,
        " is inference-only and has no backward: q, k or v requires grad. Call it under "
        "torch.no_grad() or torch.inference_mode(), or detach the inputs.");
  }
  return p;
}

}  // namespace i2am_fast
