// The caller-owned float32 accumulators of attention_with_maps_accumulate: their checks, and the
// zero-filled ones the functional op passes.
#include "attention_with_maps.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace i2am_fast {
namespace {

// Overlap checks. The kernels add into every accumulator element from one thread at a time and
// read q, k, v while they write; two elements sharing memory would lose updates in races or
// corrupt inputs. The checks are exact: a cheap sufficient test first, and where it cannot
// decide, the element addresses themselves (bounded by kMaxEnumerated).
constexpr int64_t kMaxEnumerated = int64_t(1) << 26;

// Dimensions of size > 1 as (stride, size), by increasing stride.
std::vector<std::pair<int64_t, int64_t>> spread_dims(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) {
      dims.emplace_back(t.stride(d), t.size(d));
    }
  }
  std::sort(dims.begin(), dims.end());
  return dims;
}

// Byte offsets (from the storage's start) of every element, sorted.
std::vector<int64_t> element_offsets(const at::Tensor& t) {
  std::vector<int64_t> offsets{t.storage_offset() * static_cast<int64_t>(t.element_size())};
  for (const auto& [stride, size] : spread_dims(t)) {
    std::vector<int64_t> next;
    next.reserve(offsets.size() * size);
    for (int64_t i = 0; i < size; ++i) {
      for (const int64_t offset : offsets) {
        next.push_back(offset + i * stride * static_cast<int64_t>(t.element_size()));
      }
    }
    offsets.swap(next);
  }
  std::sort(offsets.begin(), offsets.end());
  return offsets;
}

// Byte span [first, last) of t within its storage.
std::pair<int64_t, int64_t> byte_span(const at::Tensor& t) {
  int64_t extent = 0;
  for (const auto& [stride, size] : spread_dims(t)) {
    extent += stride * (size - 1);
  }
  const int64_t begin = t.storage_offset() * static_cast<int64_t>(t.element_size());
  return {begin, begin + (extent + 1) * static_cast<int64_t>(t.element_size())};
}

// True when two elements of t share memory (or when that cannot be ruled out within
// kMaxEnumerated elements).
bool overlaps_itself(const at::Tensor& t) {
  if (t.numel() <= 1) {
    return false;
  }
  int64_t reach = 0;  // elements spanned by the dimensions so far, minus 1
  bool nested = true;
  for (const auto& [stride, size] : spread_dims(t)) {
    if (stride == 0) {
      return true;
    }
    nested = nested && stride > reach;
    reach += stride * (size - 1);
  }
  if (nested) {
    return false;
  }
  if (t.numel() > kMaxEnumerated) {
    return true;
  }
  const std::vector<int64_t> offsets = element_offsets(t);
  return std::adjacent_find(offsets.begin(), offsets.end()) != offsets.end();
}

// True when an element of a and an element of b share a byte (or when that cannot be ruled out).
bool overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) {
    return false;
  }
  const auto [a_begin, a_end] = byte_span(a);
  const auto [b_begin, b_end] = byte_span(b);
  if (a_end <= b_begin || b_end <= a_begin) {
    return false;
  }
  if (a.numel() + b.numel() > kMaxEnumerated) {
    return true;
  }
  const std::vector<int64_t> x = element_offsets(a);
  const std::vector<int64_t> y = element_offsets(b);
  const int64_t x_size = a.element_size();
  const int64_t y_size = b.element_size();
  size_t i = 0;
  size_t j = 0;
  while (i < x.size() && j < y.size()) {
    if (x[i] + x_size <= y[j]) {
      ++i;
    } else if (y[j] + y_size <= x[i]) {
      ++j;
    } else {
      return true;
    }
  }
  return false;
}

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

  std::vector<std::pair<const char*, const at::Tensor*>> accumulators{{"generated", &generated}, {"reference", &reference}};
  if (probes.has_value() && probes->defined()) {
    accumulators.emplace_back("probes", &*probes);
  }
  if (share.has_value() && share->defined()) {
    accumulators.emplace_back("share", &*share);
  }
  const std::pair<const char*, const at::Tensor*> inputs[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (size_t i = 0; i < accumulators.size(); ++i) {
    const auto& [name, acc] = accumulators[i];
    TORCH_CHECK_VALUE(
        !overlaps_itself(*acc), op, ": ", name, " has elements that share memory (an expanded, stride-0 or ",
        "otherwise overlapping view, strides ", acc->strides(), "); each accumulator element needs its own memory: ",
        "pass a tensor made by torch.zeros, or a .clone().");
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(
          !overlap(*acc, *accumulators[j].second), op, ": ", name, " overlaps ", accumulators[j].first,
          " in memory; each accumulator needs memory of its own.");
    }
    for (const auto& [input_name, input] : inputs) {
      TORCH_CHECK_VALUE(
          !overlap(*acc, *input), op, ": ", name, " overlaps ", input_name,
          " in memory; accumulators may not share memory with the inputs.");
    }
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
