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

void check_accumulator(
    const char* op,
    const char* name,
    const at::Tensor& acc,
    const at::Tensor& q,
    std::vector<int64_t> expected,
    const char* layout) {
  TORCH_CHECK_VALUE(acc.defined(), op, ": ", name, " is an undefined tensor; expected float32 ", layout, ".");
  TORCH_CHECK_VALUE(
      acc.scalar_type() == at::kFloat, op, ": ", name, " must be a float32 accumulator, got ",
      acc.scalar_type(), ".");
  TORCH_CHECK_VALUE(
      acc.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
      acc.device(), ".");
  TORCH_CHECK_VALUE(
      acc.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ",
      at::IntArrayRef(expected), " ", layout, ", got ", shape_string(acc), ".");
  TORCH_CHECK_VALUE(
      !acc.requires_grad() || !c10::GradMode::is_enabled(), op, ": ", name,
      " requires grad; accumulators are inference-only state.");
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

  if (probe_index.has_value() && probe_index->defined()) {
    const at::Tensor& idx = *probe_index;
    TORCH_CHECK_VALUE(
        idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op,
        ": probe_index must be an integer (int64) tensor of query indices, got ",
        idx.scalar_type(), ".");
    TORCH_CHECK_VALUE(
        idx.dim() == 1, op, ": probe_index must be 1-D [P], got shape ", shape_string(idx), ".");
    const at::Tensor host = idx.to(at::kCPU, at::kLong).contiguous();
    const int64_t* data = host.data_ptr<int64_t>();
    p.probe_index.assign(data, data + host.numel());
    for (const int64_t index : p.probe_index) {
      TORCH_CHECK_VALUE(
          index >= 0 && index < p.num_queries, op, ": probe_index entry ", index,
          " is out of range for ", p.num_queries, " queries; entries must lie in [0, ",
          p.num_queries, ").");
    }
  }

  if (query_weights.has_value() && query_weights->defined()) {
    const at::Tensor& w = *query_weights;
    TORCH_CHECK_VALUE(
        at::isFloatingType(w.scalar_type()), op,
        ": query_weights must be a floating-point tensor, got ", w.scalar_type(), ".");
    TORCH_CHECK_VALUE(
        w.device() == q.device(), op, ": query_weights must be on q's device ", q.device(),
        ", got ", w.device(), ".");
    const bool per_batch = w.dim() == 2 && w.size(0) == p.batch && w.size(1) == p.num_queries;
    const bool shared = w.dim() == 1 && w.size(0) == p.num_queries;
    TORCH_CHECK_VALUE(
        per_batch || shared, op, ": query_weights must have shape [batch, queries] = [", p.batch,
        ", ", p.num_queries, "] or [queries] = [", p.num_queries, "], got ", shape_string(w), ".");
    p.query_weights = (shared ? w.unsqueeze(0).expand({p.batch, p.num_queries}) : w)
                          .to(at::kFloat)
                          .contiguous();
  }

  if (c10::GradMode::is_enabled()) {
    TORCH_CHECK_VALUE(
        !q.requires_grad() && !k.requires_grad() && !v.requires_grad(), op,
        " is inference-only and has no backward: q, k or v requires grad. Call it under "
        "torch.no_grad() or torch.inference_mode(), or detach the inputs.");
  }
  return p;
}

void check_map_accumulators(
    const char* op,
    const AttentionMapsProblem& p,
    const at::Tensor& q,
    const at::Tensor& generated,
    const at::Tensor& reference,
    const std::optional<at::Tensor>& probes) {
  const int64_t bm = p.map_count();
  check_accumulator(op, "generated", generated, q, {bm, p.heads, p.num_queries}, "[maps, heads, queries]");
  check_accumulator(op, "reference", reference, q, {bm, p.heads, p.num_keys}, "[maps, heads, keys]");
  const bool have_probes = probes.has_value() && probes->defined();
  if (have_probes) {
    check_accumulator(
        op, "probes", *probes, q, {bm, p.heads, p.probe_count(), p.num_keys},
        "[maps, heads, probes, keys]");
  } else {
    TORCH_CHECK_VALUE(
        p.probe_count() == 0 || bm == 0, op, ": probe_index has ", p.probe_count(),
        " entries but no probes accumulator was given; pass probes as a float32 tensor of shape [",
        bm, ", ", p.heads, ", ", p.probe_count(), ", ", p.num_keys, "].");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> make_map_accumulators(
    const AttentionMapsProblem& p, const at::Tensor& q) {
  const auto options = q.options().dtype(at::kFloat);
  const int64_t bm = p.map_count();
  return {
      at::zeros({bm, p.heads, p.num_queries}, options),
      at::zeros({bm, p.heads, p.num_keys}, options),
      at::zeros({bm, p.heads, p.probe_count(), p.num_keys}, options)};
}

}  // namespace i2am_fast
