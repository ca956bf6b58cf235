// The caller-owned float32 accumulators of attention_with_maps_accumulate: their checks, and the
// zero-filled ones the functional op passes.
#include "attention_with_maps.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace i2am_fast {
namespace {

std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
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

void check_map_accumulators(
    const char* op,
    const AttentionMapsProblem& p,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const at::Tensor& generated,
    const at::Tensor& reference,
    const std::optional<at::Tensor>& probes,
    const std::optional<at::Tensor>& share) {
  (void)k;
  (void)v;
  const int64_t bm = p.map_count();
  const int64_t nqm = p.num_map_queries;
  const int64_t nkm = p.num_map_keys;
  check_accumulator(op, "generated", generated, q, {bm, p.heads, nqm}, "[maps, heads, mapped queries]");
  check_accumulator(op, "reference", reference, q, {bm, p.heads, nkm}, "[maps, heads, mapped keys]");
  if (probes.has_value() && probes->defined()) {
    check_accumulator(
        op, "probes", *probes, q, {bm, p.heads, p.probe_count(), nkm}, "[maps, heads, probes, mapped keys]");
  } else {
    TORCH_CHECK_VALUE(
        p.probe_count() == 0 || bm == 0, op, ": probe_index has ", p.probe_count(),
        " entries but no probes accumulator was given; pass probes as a float32 tensor of shape [",
        bm, ", ", p.heads, ", ", p.probe_count(), ", ", nkm, "].");
  }
  if (share.has_value() && share->defined()) {
    check_accumulator(op, "share", *share, q, {bm, p.heads, nqm}, "[maps, heads, mapped queries]");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_map_accumulators(
    const AttentionMapsProblem& p, const at::Tensor& q) {
  const auto options = q.options().dtype(at::kFloat);
  const int64_t bm = p.map_count();
  return {
      at::zeros({bm, p.heads, p.num_map_queries}, options),
      at::zeros({bm, p.heads, p.num_map_keys}, options),
      at::zeros({bm, p.heads, p.probe_count(), p.num_map_keys}, options),
      at::zeros({bm, p.heads, p.num_map_queries}, options)};
}

}  // namespace i2am_fast
