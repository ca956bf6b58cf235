// Kernels registered once for every back end.
//
// The functional op attention_with_maps is zero-filled accumulators plus
// attention_with_maps_accumulate, called through the dispatcher: each back end implements only
// the accumulating kernel, so the two ops cannot compute different things.
//
// attention_with_maps_accumulate writes into its accumulators in place, so, like torch's own
// in-place ops, it bumps their version counters (the ADInplaceOrView kernel below): a tensor that
// autograd saved and that the op then changed makes backward fail loudly instead of silently
// using the new values.
#include "attention_with_maps.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace i2am_fast {
namespace {

using OptionalTensor = std::optional<at::Tensor>;
using AccumulateSignature = at::Tensor(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    at::Tensor&,
    at::Tensor&,
    const OptionalTensor&,
    const OptionalTensor&,
    std::optional<double>,
    const OptionalTensor&,
    const OptionalTensor&,
    at::OptionalIntArrayRef,
    const OptionalTensor&,
    const OptionalTensor&,
    const OptionalTensor&);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_with_maps_composite(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    std::optional<double> scale,
    const OptionalTensor& query_weights,
    const OptionalTensor& probe_index,
    at::OptionalIntArrayRef map_batch,
    const OptionalTensor& map_queries,
    const OptionalTensor& map_keys,
    const OptionalTensor& key_padding_mask) {
  // The checks run here too, so that a bad call names this op rather than the accumulating
  // one, and so that the accumulators get their shapes from checked arguments.
  const AttentionMapsProblem problem = check_attention_with_maps_inputs(
      "attention_with_maps", q, k, v, scale, query_weights, probe_index, map_batch, map_queries, map_keys,
      key_padding_mask, /*allow_float64=*/q.device().is_cpu());
  auto [generated, reference, probes, share] = make_map_accumulators(problem, q);
  static const auto accumulate = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("i2am_fast::attention_with_maps_accumulate", "")
                                     .typed<AccumulateSignature>();
  at::Tensor output = accumulate.call(
      q, k, v, generated, reference, OptionalTensor(probes), OptionalTensor(share), scale, query_weights,
      probe_index, map_batch, map_queries, map_keys, key_padding_mask);
  return {output, generated, reference, probes, share};
}

void bump_version(const at::Tensor& t) {
  // Inference tensors have no version counter (and autograd cannot have saved them).
  if (t.defined() && !t.is_inference()) {
    t.unsafeGetTensorImpl()->bump_version();
  }
}

at::Tensor accumulate_bumping_versions(
    c10::DispatchKeySet keys,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    at::Tensor& generated,
    at::Tensor& reference,
    const OptionalTensor& probes,
    const OptionalTensor& share,
    std::optional<double> scale,
    const OptionalTensor& query_weights,
    const OptionalTensor& probe_index,
    at::OptionalIntArrayRef map_batch,
    const OptionalTensor& map_queries,
    const OptionalTensor& map_keys,
    const OptionalTensor& key_padding_mask) {
  static const auto accumulate = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("i2am_fast::attention_with_maps_accumulate", "")
                                     .typed<AccumulateSignature>();
  at::Tensor output;
  {
    c10::impl::ExcludeDispatchKeyGuard below(c10::DispatchKey::ADInplaceOrView);
    output = accumulate.redispatch(
        keys & c10::after_ADInplaceOrView_keyset, q, k, v, generated, reference, probes, share, scale, query_weights,
        probe_index, map_batch, map_queries, map_keys, key_padding_mask);
  }
  bump_version(generated);
  bump_version(reference);
  if (probes.has_value()) {
    bump_version(*probes);
  }
  if (share.has_value()) {
    bump_version(*share);
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(i2am_fast, CompositeExplicitAutograd, m) {
  m.impl("attention_with_maps", &attention_with_maps_composite);
}

TORCH_LIBRARY_IMPL(i2am_fast, ADInplaceOrView, m) {
  m.impl("attention_with_maps_accumulate", TORCH_FN(accumulate_bumping_versions));
}

}  // namespace i2am_fast
