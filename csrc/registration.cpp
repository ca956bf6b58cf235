// The operator schemas, registered once for every back end, and the Python module that loads
// them. Back ends add their accumulate kernel with TORCH_LIBRARY_IMPL in their own files; the
// functional op is registered once for all of them (attention_with_maps_composite.cpp); the fake
// kernels for torch.compile are registered from Python (i2am_fast/ops/wrappers.py).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(i2am_fast, m) {
  // Attention output and the I²AM maps of one attention call, over the sub-block of generated
  // queries (map_queries) x reference keys (map_keys), with masked keys left out of everything
  // (docs/design.md). Returns (output, generated, reference, probes, share).
  m.def(
      "attention_with_maps(Tensor q, Tensor k, Tensor v, float? scale=None, Tensor? query_weights=None, "
      "Tensor? probe_index=None, int[]? map_batch=None, Tensor? map_queries=None, Tensor? map_keys=None, "
      "Tensor? key_padding_mask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same, adding the maps into caller-owned float32 accumulators (share only when given);
  // returns the output.
  m.def(
      "attention_with_maps_accumulate(Tensor q, Tensor k, Tensor v, Tensor(a!) generated, Tensor(b!) reference, "
      "Tensor(c!)? probes=None, Tensor(d!)? share=None, float? scale=None, Tensor? query_weights=None, "
      "Tensor? probe_index=None, int[]? map_batch=None, Tensor? map_queries=None, Tensor? map_keys=None, "
      "Tensor? key_padding_mask=None) -> Tensor");
}

// Importing i2am_fast._C runs the registrations above; the module itself has no functions.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "i2am_fast operator library (the operators live in torch.ops.i2am_fast)";
#ifdef I2AM_FAST_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
