// The token order tables of one attention-with-maps call (attention_with_maps.h explains them):
// which query rows and key columns each pass sweeps, as prefixes of a reordered index space.
#include "attention_with_maps.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace i2am_fast {

void build_token_order(
    const char* op,
    AttentionMapsProblem& p,
    const std::optional<std::vector<int64_t>>& map_queries,
    const std::optional<std::vector<int64_t>>& map_keys,
    const std::optional<std::vector<uint8_t>>& key_mask) {
  const int64_t nq = p.num_queries;
  const int64_t nk = p.num_keys;

  // Queries: [mapped, in index order | probe queries outside the mapped set, ascending | rest].
  std::vector<uint8_t> placed(nq, 0);
  p.query_order.clear();
  p.query_order.reserve(nq);
  if (map_queries.has_value()) {
    for (const int64_t query : *map_queries) {
      p.query_order.push_back(query);
      placed[query] = 1;
    }
  } else {
    for (int64_t query = 0; query < nq; ++query) {
      p.query_order.push_back(query);
      placed[query] = 1;
    }
  }
  p.num_map_queries = static_cast<int64_t>(p.query_order.size());
  std::vector<int64_t> extra_probes;
  for (const int64_t query : p.probe_index) {
    if (!placed[query]) {
      extra_probes.push_back(query);
      placed[query] = 1;
    }
  }
  std::sort(extra_probes.begin(), extra_probes.end());
  p.query_order.insert(p.query_order.end(), extra_probes.begin(), extra_probes.end());
  p.pass2_rows = static_cast<int64_t>(p.query_order.size());
  for (int64_t query = 0; query < nq; ++query) {
    if (!placed[query]) {
      p.query_order.push_back(query);
    }
  }
  std::vector<int64_t> row_of_query(nq);
  p.queries_in_order = true;
  for (int64_t row = 0; row < nq; ++row) {
    row_of_query[p.query_order[row]] = row;
    p.queries_in_order = p.queries_in_order && p.query_order[row] == row;
  }
  p.probe_row.clear();
  for (const int64_t query : p.probe_index) {
    p.probe_row.push_back(row_of_query[query]);
  }

  // Keys, per batch entry: [unmasked mapped, in map_keys order | unmasked others, ascending].
  std::vector<int64_t> mapped_keys;
  if (map_keys.has_value()) {
    mapped_keys = *map_keys;
  } else {
    mapped_keys.resize(nk);
    for (int64_t key = 0; key < nk; ++key) {
      mapped_keys[key] = key;
    }
  }
  const int64_t nkm = static_cast<int64_t>(mapped_keys.size());
  std::vector<uint8_t> is_mapped(nk, 0);
  for (const int64_t key : mapped_keys) {
    is_mapped[key] = 1;
  }
  p.num_map_keys = nkm;
  p.key_order.assign(p.batch * nk, -1);
  p.key_slot.assign(p.batch * nkm, -1);
  p.key_count.assign(p.batch, 0);
  p.map_key_count.assign(p.batch, 0);
  p.keys_in_order.assign(p.batch, 0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const uint8_t* takes_part = key_mask.has_value() ? key_mask->data() + b * nk : nullptr;
    int64_t* order = p.key_order.data() + b * nk;
    int64_t* slot = p.key_slot.data() + b * nkm;
    int64_t count = 0;
    for (int64_t position = 0; position < nkm; ++position) {
      const int64_t key = mapped_keys[position];
      if (takes_part == nullptr || takes_part[key]) {
        slot[count] = position;
        order[count++] = key;
      }
    }
    p.map_key_count[b] = count;
    for (int64_t key = 0; key < nk; ++key) {
      if (!is_mapped[key] && (takes_part == nullptr || takes_part[key])) {
        order[count++] = key;
      }
    }
    TORCH_CHECK_VALUE(
        count > 0, op, ": key_padding_mask leaves no key of batch entry ", b,
        " taking part; every entry needs at least one True (True = the key takes part).");
    p.key_count[b] = count;
    bool in_order = count == nk;
    for (int64_t j = 0; in_order && j < nk; ++j) {
      in_order = order[j] == j;
    }
    p.keys_in_order[b] = in_order ? 1 : 0;
  }
}

}  // namespace i2am_fast
