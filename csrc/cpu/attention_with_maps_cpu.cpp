// CPU implementation of i2am_fast::attention_with_maps_accumulate (the functional op is zeros plus
// this one, registered once for every back end in ../attention_with_maps_composite.cpp).
//
// The score matrix S = q kᵀ scale of one (batch, head) is visited in tiles of kQueryBlock x
// kKeyBlock and never stored whole (docs/design.md, "The kernel"). Rows and columns are visited in
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
#include "../attention_with_maps.h"
#include "../tile_math.h"
#include "row_kernels.h"
#include "token_rows.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

namespace i2am_fast {
namespace {

constexpr int64_t kQueryBlock = 256;
constexpr int64_t kKeyBlock = 512;
// Work items (batch, head, query chunk) aimed for: enough to balance up to a few dozen threads.
constexpr int64_t kTargetItems = 64;
constexpr const char* kOpName = "attention_with_maps_accumulate";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs body(item, scratch) for item in [0, count) on at::parallel_for's threads, handing out
// items one at a time from a shared counter (the items differ a lot in cost: map entries pay
// for two passes). Each thread makes its own scratch once.
template <typename MakeScratch, typename Body>
void for_each_item(int64_t count, MakeScratch make_scratch, Body body) {
  if (count == 0) {
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(count, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's grad mode; the kernel records no graph.
    at::NoGradGuard no_grad;
    auto scratch = make_scratch();
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t item = next.fetch_add(1); item < count; item = next.fetch_add(1)) {
        body(item, scratch);
      }
    }
  });
}

// A 2-D view of a raw buffer, for at::mm.
at::Tensor matrix_view(void* data, int64_t rows, int64_t cols, int64_t row_stride, at::ScalarType dtype) {
  return at::from_blob(data, {rows, cols}, {row_stride, 1}, at::TensorOptions().dtype(dtype));
}

template <typename acc_t>
struct Scratch {
  at::Tensor q_tile;    // [kQueryBlock, D]   queries of one block, times scale
  at::Tensor s_tile;    // [kQueryBlock, kKeyBlock]  scores, then exponentials, in place
  at::Tensor out_tile;  // [kQueryBlock, Dv]  unnormalised output
  at::Tensor k_rows;    // [Nk, D]  keys of one (batch, head) in column order (when reordered)
  at::Tensor v_rows;    // [Nk, Dv] values likewise (pass 1 only)
  std::vector<acc_t> row_max, row_sum, row_weight, row_aux, row_share;  // [kQueryBlock]
  std::vector<acc_t> col_max, col_sum, col_exact, col_factor;  // [kKeyBlock]
  std::vector<unsigned char> col_is_exact;                  // [kKeyBlock]
};

template <typename scalar_t>
class AttentionWithMapsCpu {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  AttentionWithMapsCpu(
      const AttentionMapsProblem& p,
      const at::Tensor& q,
      const at::Tensor& k,
      const at::Tensor& v,
      at::Tensor& output,
      at::Tensor& generated,
      at::Tensor& reference,
      at::Tensor* probes,
      at::Tensor* share)
      : p_(p),
        q_(q),
        k_(k),
        v_(v),
        output_(output),
        generated_(generated),
        reference_(reference),
        probes_(probes),
        share_(share) {
    acc_dtype_ = c10::CppTypeToScalarType<acc_t>::value;
    query_blocks_ = ceil_div(p.num_queries, kQueryBlock);
    // Enough chunks per (batch, head) to keep many threads busy, few enough that the per-chunk
    // column state (3 x Nkm values per map chunk) stays small. The count depends on the problem
    // only, never on the thread count, so the order of every sum (and so every bit of the
    // maps) is the same whatever the machine's parallelism.
    const int64_t pairs = std::max<int64_t>(1, p.batch * p.heads);
    chunks_ = std::clamp<int64_t>(ceil_div(kTargetItems, pairs), 1, query_blocks_);
    blocks_per_chunk_ = ceil_div(query_blocks_, chunks_);
    chunks_ = ceil_div(query_blocks_, blocks_per_chunk_);
    nkm_ = p.num_map_keys;
    gathers_keys_ = std::any_of(p.keys_in_order.begin(), p.keys_in_order.end(), [](uint8_t in) { return !in; });

    const int64_t bm = p.map_count();
    const auto acc_options = at::TensorOptions().dtype(acc_dtype_);
    if (bm > 0) {
      row_stat_max_ = at::empty({bm, p.heads, p.pass2_rows}, acc_options);
      row_stat_inv_ = at::empty({bm, p.heads, p.pass2_rows}, acc_options);
      col_max_ = at::empty({bm, p.heads, chunks_, nkm_}, acc_options);
      col_sum_ = at::empty({bm, p.heads, chunks_, nkm_}, acc_options);
      reference_part_ = at::zeros({bm, p.heads, chunks_, nkm_}, acc_options);
    }
    // Which probe rows each query row feeds (a query may be probed more than once).
    probes_of_row_.resize(p.pass2_rows);
    for (int64_t slot = 0; slot < p.probe_count(); ++slot) {
      probes_of_row_[p.probe_row[slot]].push_back(slot);
    }
  }

  void run() {
    // Pass 1, every batch entry. Items ordered chunk-major so that map and plain entries
    // interleave across the counter.
    const int64_t pass1_items = chunks_ * p_.heads * p_.batch;
    for_each_item(pass1_items, [&] { return make_scratch(true); }, [&](int64_t item, Scratch<acc_t>& s) {
      const int64_t b = item % p_.batch;
      const int64_t h = (item / p_.batch) % p_.heads;
      const int64_t chunk = item / (p_.batch * p_.heads);
      pass1(b, h, chunk, s);
    });

    const int64_t bm = p_.map_count();
    if (bm == 0) {
      return;
    }
    combine_column_statistics();

    const int64_t pass2_items = chunks_ * p_.heads * bm;
    for_each_item(pass2_items, [&] { return make_scratch(false); }, [&](int64_t item, Scratch<acc_t>& s) {
      const int64_t slot = item % bm;
      const int64_t h = (item / bm) % p_.heads;
      const int64_t chunk = item / (bm * p_.heads);
      pass2(slot, h, chunk, s);
    });

    reduce_reference_parts();
  }

 private:
  Scratch<acc_t> make_scratch(bool with_values) const {
    Scratch<acc_t> s;
    const auto options = at::TensorOptions().dtype(acc_dtype_);
    s.q_tile = at::empty({kQueryBlock, p_.head_dim}, options);
    s.s_tile = at::empty({kQueryBlock, kKeyBlock}, options);
    s.out_tile = at::empty({kQueryBlock, p_.value_dim}, options);
    if (gathers_keys_) {
      s.k_rows = at::empty({p_.num_keys, p_.head_dim}, options);
      if (with_values) {
        s.v_rows = at::empty({p_.num_keys, p_.value_dim}, options);
      }
    }
    for (auto* row : {&s.row_max, &s.row_sum, &s.row_weight, &s.row_aux, &s.row_share}) {
      row->resize(kQueryBlock);
    }
    for (auto* col : {&s.col_max, &s.col_sum, &s.col_exact, &s.col_factor}) {
      col->resize(kKeyBlock);
    }
    s.col_is_exact.resize(kKeyBlock);
    return s;
  }

  // The first `count` columns' rows of x[b, h] (keys or values) as an [count, width] matrix in
  // acc_t. In key order: a view of the input when it already is acc_t, a converted copy
  // (O(Nk D) per item) for float16 / bfloat16. Reordered: gathered into `buffer`.
  at::Tensor key_rows(const at::Tensor& x, int64_t b, int64_t h, int64_t count, at::Tensor& buffer) const {
    at::Tensor m = x.select(0, b).select(0, h);
    if (p_.keys_in_order[b]) {
      return m.scalar_type() == acc_dtype_ ? m : m.to(acc_dtype_);
    }
    at::Tensor rows = buffer.narrow(0, 0, count);
    cpu::gather_rows(
        m.const_data_ptr<scalar_t>(), m.stride(0), p_.key_order_of(b), count, m.size(1), rows.data_ptr<acc_t>());
    return rows;
  }

  // q_tile[0:rows] = scale * q[b, h, query_order[r0 : r0 + rows]].
  void load_query_block(int64_t b, int64_t h, int64_t r0, int64_t rows, Scratch<acc_t>& s) const {
    at::Tensor dst = s.q_tile.narrow(0, 0, rows);
    const at::Tensor src = q_.select(0, b).select(0, h);
    if (p_.queries_in_order) {
      dst.copy_(src.narrow(0, r0, rows));  // converts float16/bfloat16 exactly
    } else {
      cpu::gather_rows(
          src.const_data_ptr<scalar_t>(), src.stride(0), p_.query_order.data() + r0, rows, p_.head_dim,
          dst.data_ptr<acc_t>());
    }
    dst.mul_(p_.scale);
  }

  at::Tensor scores(Scratch<acc_t>& s, int64_t rows, int64_t cols, const at::Tensor& keys, int64_t k0) const {
    at::Tensor tile = matrix_view(s.s_tile.data_ptr(), rows, cols, kKeyBlock, acc_dtype_);
    at::mm_out(tile, s.q_tile.narrow(0, 0, rows), keys.narrow(0, k0, cols).t());
    return tile;
  }

  void pass1(int64_t b, int64_t h, int64_t chunk, Scratch<acc_t>& s) {
    const int64_t slot = p_.map_slot[b];
    const bool maps = slot >= 0;
    const int64_t num_cols = p_.key_count[b];
    const int64_t map_cols_total = maps ? p_.map_key_count[b] : 0;
    const at::Tensor keys = key_rows(k_, b, h, num_cols, s.k_rows);
    const at::Tensor values = key_rows(v_, b, h, num_cols, s.v_rows);
    acc_t* chunk_col_max = nullptr;
    acc_t* chunk_col_sum = nullptr;
    if (maps) {
      chunk_col_max = col_max_.data_ptr<acc_t>() + ((slot * p_.heads + h) * chunks_ + chunk) * nkm_;
      chunk_col_sum = col_sum_.data_ptr<acc_t>() + ((slot * p_.heads + h) * chunks_ + chunk) * nkm_;
      std::fill(chunk_col_max, chunk_col_max + map_cols_total, -std::numeric_limits<acc_t>::infinity());
      std::fill(chunk_col_sum, chunk_col_sum + map_cols_total, acc_t(0));
    }
    acc_t* row_max = s.row_max.data();
    acc_t* row_sum = s.row_sum.data();
    acc_t* new_max = s.row_aux.data();
    acc_t* col_max = s.col_max.data();
    acc_t* col_sum = s.col_sum.data();
    const int64_t block_end = std::min(query_blocks_, (chunk + 1) * blocks_per_chunk_);
    for (int64_t qb = chunk * blocks_per_chunk_; qb < block_end; ++qb) {
      const int64_t q0 = qb * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, p_.num_queries - q0);
      // Rows [0, map_rows) of this block are mapped queries: they feed the column statistics.
      const int64_t map_rows = maps ? std::clamp<int64_t>(p_.num_map_queries - q0, 0, rows) : 0;
      load_query_block(b, h, q0, rows, s);
      std::fill(row_max, row_max + rows, -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum, row_sum + rows, acc_t(0));
      at::Tensor out = s.out_tile.narrow(0, 0, rows);
      out.zero_();
      acc_t* out_data = out.data_ptr<acc_t>();

      for (int64_t k0 = 0; k0 < num_cols; k0 += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, num_cols - k0);
        const int64_t map_cols = std::clamp<int64_t>(map_cols_total - k0, 0, cols);
        const bool tile_maps = map_rows > 0 && map_cols > 0;
        at::Tensor tile = scores(s, rows, cols, keys, k0);
        acc_t* st = tile.data_ptr<acc_t>();

        // Row maxima (and, for maps, column maxima over the mapped rows) of this tile. Column
        // statistics of unmapped columns (j >= map_cols) are computed and never read.
        if (tile_maps) {
          std::fill(col_max, col_max + cols, -std::numeric_limits<acc_t>::infinity());
        }
        acc_t tile_reference = -std::numeric_limits<acc_t>::infinity();
        for (int64_t i = 0; i < rows; ++i) {
          const acc_t m = cpu::row_max(st + i * kKeyBlock, cols, tile_maps && i < map_rows ? col_max : nullptr);
          new_max[i] = std::max(row_max[i], m);
          if (i < map_rows) {
            tile_reference = std::max(tile_reference, new_max[i]);
          }
        }

        // Column sums relative to the tile reference R = max over mapped rows of new_max[i],
        // reusing the row-shifted exponentials: exp(S - R) = exp(S - new_max_i) * exp(new_max_i - R).
        // Columns whose own maximum lies more than kReuseSpread below R are summed exactly
        // from the scores, before the scores are overwritten.
        if (tile_maps) {
          std::fill(col_sum, col_sum + cols, acc_t(0));
          bool any_exact = false;
          for (int64_t j = 0; j < map_cols; ++j) {
            s.col_is_exact[j] = tile_reference - col_max[j] > acc_t(kReuseSpread);
            any_exact = any_exact || s.col_is_exact[j];
          }
          if (any_exact) {
            for (int64_t j = 0; j < map_cols; ++j) {
              if (!s.col_is_exact[j]) {
                continue;
              }
              acc_t sum = 0;
              for (int64_t i = 0; i < map_rows; ++i) {
                sum += exp_shifted(st[i * kKeyBlock + j], col_max[j]);
              }
              s.col_exact[j] = sum;
            }
          }
          for (int64_t i = 0; i < map_rows; ++i) {
            s.row_weight[i] = exp_shifted(new_max[i], tile_reference);
          }
          for (int64_t i = 0; i < rows; ++i) {
            const bool mapped_row = i < map_rows;
            const acc_t alpha = online_rescale(row_max[i], new_max[i]);
            const acc_t tile_sum = exp_row(
                st + i * kKeyBlock, new_max[i], cols, mapped_row ? s.row_weight[i] : acc_t(0),
                mapped_row ? col_sum : nullptr);
            row_sum[i] = row_sum[i] * alpha + tile_sum;
            row_max[i] = new_max[i];
            scale_row(out_data + i * p_.value_dim, alpha);
          }
          // Merge this tile's column statistics into the chunk's.
          for (int64_t j = 0; j < map_cols; ++j) {
            const SoftmaxStat<acc_t> tile_stat = s.col_is_exact[j]
                ? SoftmaxStat<acc_t>{col_max[j], s.col_exact[j]}
                : SoftmaxStat<acc_t>{tile_reference, col_sum[j]};
            const SoftmaxStat<acc_t> merged =
                merge_stats(SoftmaxStat<acc_t>{chunk_col_max[k0 + j], chunk_col_sum[k0 + j]}, tile_stat);
            chunk_col_max[k0 + j] = merged.max;
            chunk_col_sum[k0 + j] = merged.sum;
          }
        } else {
          for (int64_t i = 0; i < rows; ++i) {
            const acc_t alpha = online_rescale(row_max[i], new_max[i]);
            const acc_t tile_sum = exp_row(st + i * kKeyBlock, new_max[i], cols, acc_t(0), nullptr);
            row_sum[i] = row_sum[i] * alpha + tile_sum;
            row_max[i] = new_max[i];
            scale_row(out_data + i * p_.value_dim, alpha);
          }
        }
        out.addmm_(tile, values.narrow(0, k0, cols));
      }

      // Normalise and write the output rows (a row with sum 0 becomes NaN); keep the row
      // statistics of pass 2's rows as (max, 1 / sum).
      for (int64_t i = 0; i < rows; ++i) {
        scale_row(out_data + i * p_.value_dim, acc_t(1) / row_sum[i]);
      }
      write_output_rows(b, h, q0, rows, out);
      if (maps) {
        const int64_t offset = (slot * p_.heads + h) * p_.pass2_rows + q0;
        acc_t* stat_max = row_stat_max_.data_ptr<acc_t>() + offset;
        acc_t* stat_inv = row_stat_inv_.data_ptr<acc_t>() + offset;
        const int64_t kept = std::clamp<int64_t>(p_.pass2_rows - q0, 0, rows);
        for (int64_t i = 0; i < kept; ++i) {
          stat_max[i] = row_max[i];
          stat_inv[i] = inverse_sum(SoftmaxStat<acc_t>{row_max[i], row_sum[i]});
        }
      }
    }
  }

  void write_output_rows(int64_t b, int64_t h, int64_t r0, int64_t rows, const at::Tensor& out) {
    at::Tensor dst = output_.select(0, b).select(0, h);
    if (p_.queries_in_order) {
      dst.narrow(0, r0, rows).copy_(out);
    } else {
      cpu::scatter_rows(
          out.const_data_ptr<acc_t>(), rows, p_.value_dim, p_.query_order.data() + r0, dst.data_ptr<scalar_t>(),
          dst.stride(0));
    }
  }

  // Pass-1 exponentials of one tile row, in place (row_kernels.h, exp_row_in_place). A row
  // whose maximum so far is -inf has only -inf scores so far: its exponentials are 0 (the
  // row kernel would compute exp(-inf - -inf) = NaN).
  static acc_t exp_row(acc_t* row, acc_t shift, int64_t cols, acc_t weight, acc_t* col_sum) {
    if (shift == -std::numeric_limits<acc_t>::infinity()) {
      std::fill(row, row + cols, acc_t(0));
      return acc_t(0);
    }
    return cpu::exp_row_in_place(row, shift, cols, weight, col_sum);
  }

  void scale_row(acc_t* row, acc_t factor) const {
    for (int64_t d = 0; d < p_.value_dim; ++d) {
      row[d] *= factor;
    }
  }

  // The column statistics over chunks, merged in chunk order, as (max, 1 / sum) in chunk 0's
  // slots. A column that is -inf for every mapped query gets (+inf, 0): exp(S - max) * inv is
  // then 0 on both of pass 2's paths, and it never fails the reuse test.
  void combine_column_statistics() {
    const int64_t pairs = p_.map_count() * p_.heads;
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t columns = p_.map_key_count[p_.map_batch[pair / p_.heads]];
        acc_t* cmax = col_max_.data_ptr<acc_t>() + pair * chunks_ * nkm_;
        acc_t* csum = col_sum_.data_ptr<acc_t>() + pair * chunks_ * nkm_;
        for (int64_t key = 0; key < columns; ++key) {
          SoftmaxStat<acc_t> stat{cmax[key], csum[key]};
          for (int64_t chunk = 1; chunk < chunks_; ++chunk) {
            stat = merge_stats(stat, SoftmaxStat<acc_t>{cmax[chunk * nkm_ + key], csum[chunk * nkm_ + key]});
          }
          const bool empty = stat.sum <= acc_t(0);
          cmax[key] = empty ? std::numeric_limits<acc_t>::infinity() : stat.max;
          csum[key] = inverse_sum(stat);
        }
      }
    });
  }

  void pass2(int64_t slot, int64_t h, int64_t chunk, Scratch<acc_t>& s) {
    const int64_t b = p_.map_batch[slot];
    const int64_t num_cols = p_.map_key_count[b];
    const int64_t first_row = chunk * blocks_per_chunk_ * kQueryBlock;
    if (num_cols == 0 || first_row >= p_.pass2_rows) {
      return;  // no unmasked mapped key: every map of this entry stays 0; or no row of pass 2
    }
    const at::Tensor keys = key_rows(k_, b, h, num_cols, s.k_rows);
    const acc_t* col_max = col_max_.data_ptr<acc_t>() + (slot * p_.heads + h) * chunks_ * nkm_;
    const acc_t* col_inv = col_sum_.data_ptr<acc_t>() + (slot * p_.heads + h) * chunks_ * nkm_;
    const acc_t* row_max = row_stat_max_.data_ptr<acc_t>() + (slot * p_.heads + h) * p_.pass2_rows;
    const acc_t* row_inv = row_stat_inv_.data_ptr<acc_t>() + (slot * p_.heads + h) * p_.pass2_rows;
    acc_t* reference_part = reference_part_.data_ptr<acc_t>() + ((slot * p_.heads + h) * chunks_ + chunk) * nkm_;
    const float* weights = p_.query_weights.defined()
        ? p_.query_weights.const_data_ptr<float>() + b * p_.num_map_queries
        : nullptr;
    float* generated = generated_.data_ptr<float>() + slot * generated_.stride(0) + h * generated_.stride(1);
    const int64_t generated_stride = generated_.stride(2);

    // The query-axis softmax exp(S - colmax) / colsum, two ways:
    acc_t* g_reused = s.row_weight.data();  // sum_k exp(S - rowmax) * exp(A - colmax) / colsum, scaled by exp(rowmax - A) at the end
    acc_t* g_exact = s.row_aux.data();      // sum_k exp(S - colmax) / colsum over tiles that take the exact path
    acc_t* share = s.row_share.data();      // sum_k p
    acc_t* factor = s.col_factor.data();
    const int64_t block_end = std::min(query_blocks_, (chunk + 1) * blocks_per_chunk_);
    for (int64_t qb = chunk * blocks_per_chunk_; qb < block_end; ++qb) {
      const int64_t q0 = qb * kQueryBlock;
      if (q0 >= p_.pass2_rows) {
        break;
      }
      const int64_t rows = std::min(kQueryBlock, p_.pass2_rows - q0);
      // Rows [0, map_rows) are mapped queries; the others serve only probes.
      const int64_t map_rows = std::clamp<int64_t>(p_.num_map_queries - q0, 0, rows);
      load_query_block(b, h, q0, rows, s);
      std::fill(g_reused, g_reused + rows, acc_t(0));
      std::fill(g_exact, g_exact + rows, acc_t(0));
      std::fill(share, share + rows, acc_t(0));
      // A = max row maximum of the block's mapped rows:
      // exp(S - colmax) = exp(S - rowmax) * exp(rowmax - A) * exp(A - colmax).
      const acc_t block_reference = map_rows > 0 ? *std::max_element(row_max + q0, row_max + q0 + map_rows)
                                                 : -std::numeric_limits<acc_t>::infinity();

      for (int64_t k0 = 0; k0 < num_cols; k0 += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, num_cols - k0);
        at::Tensor tile = scores(s, rows, cols, keys, k0);
        acc_t* st = tile.data_ptr<acc_t>();
        const acc_t lowest_col_max = *std::min_element(col_max + k0, col_max + k0 + cols);
        const bool reuse = block_reference - lowest_col_max <= acc_t(kReuseSpread);
        if (reuse && map_rows > 0) {
          cpu::exp_of_difference(block_reference, col_max + k0, col_inv + k0, factor, cols);
        }
        for (int64_t i = 0; i < rows; ++i) {
          if (row_inv[q0 + i] == acc_t(0)) {
            continue;  // every score of this row is -inf: it adds 0 to every map
          }
          acc_t* row = st + i * kKeyBlock;
          if (i < map_rows) {
            if (!reuse) {
              g_exact[i] += cpu::exp_diff_dot(row, col_max + k0, col_inv + k0, cols);
            }
            const acc_t weight = weights == nullptr ? acc_t(1) : acc_t(weights[q0 + i]);
            g_reused[i] += cpu::map_row_in_place(
                row, row_max[q0 + i], row_inv[q0 + i], cols, reuse ? factor : nullptr, weight, reference_part + k0,
                share + i);
          } else {
            cpu::softmax_row_in_place(row, row_max[q0 + i], row_inv[q0 + i], cols);
          }
          for (const int64_t probe : probes_of_row_[q0 + i]) {
            add_probe_row(slot, h, probe, b, k0, row, cols);
          }
        }
      }
      const acc_t inv_keys = acc_t(1) / acc_t(num_cols);
      for (int64_t i = 0; i < map_rows; ++i) {
        const acc_t g = (exp_shifted(row_max[q0 + i], block_reference) * g_reused[i] + g_exact[i]) * inv_keys;
        generated[(q0 + i) * generated_stride] += static_cast<float>(g);
      }
      if (share_ != nullptr) {
        at::Tensor& acc = *share_;
        float* dst = acc.data_ptr<float>() + slot * acc.stride(0) + h * acc.stride(1);
        for (int64_t i = 0; i < map_rows; ++i) {
          dst[(q0 + i) * acc.stride(2)] += static_cast<float>(share[i]);
        }
      }
    }
  }

  void add_probe_row(int64_t slot, int64_t h, int64_t probe, int64_t b, int64_t k0, const acc_t* row, int64_t cols) {
    at::Tensor& acc = *probes_;
    float* dst = acc.data_ptr<float>() + slot * acc.stride(0) + h * acc.stride(1) + probe * acc.stride(2);
    const int64_t stride = acc.stride(3);
    const int64_t* key_slot = p_.key_slot_of(b) + k0;
    for (int64_t j = 0; j < cols; ++j) {
      dst[key_slot[j] * stride] += static_cast<float>(row[j]);
    }
  }

  // reference[slot, h, key_slot[j]] += (1 / Nqm) * sum over chunks (in chunk order) of the chunk parts.
  void reduce_reference_parts() {
    const int64_t pairs = p_.map_count() * p_.heads;
    const acc_t inv_queries = acc_t(1) / acc_t(p_.num_map_queries);
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t slot = pair / p_.heads;
        const int64_t h = pair % p_.heads;
        const int64_t b = p_.map_batch[slot];
        const int64_t columns = p_.map_key_count[b];
        const int64_t* key_slot = p_.key_slot_of(b);
        const acc_t* parts = reference_part_.data_ptr<acc_t>() + pair * chunks_ * nkm_;
        float* dst = reference_.data_ptr<float>() + slot * reference_.stride(0) + h * reference_.stride(1);
        const int64_t stride = reference_.stride(2);
        for (int64_t key = 0; key < columns; ++key) {
          acc_t total = 0;
          for (int64_t chunk = 0; chunk < chunks_; ++chunk) {
            total += parts[chunk * nkm_ + key];
          }
          dst[key_slot[key] * stride] += static_cast<float>(total * inv_queries);
        }
      }
    });
  }

  const AttentionMapsProblem& p_;
  const at::Tensor& q_;
  const at::Tensor& k_;
  const at::Tensor& v_;
  at::Tensor& output_;
  at::Tensor& generated_;
  at::Tensor& reference_;
  at::Tensor* probes_;
  at::Tensor* share_;
  at::ScalarType acc_dtype_;
  int64_t query_blocks_ = 0;
  int64_t chunks_ = 1;
  int64_t blocks_per_chunk_ = 1;
  int64_t nkm_ = 0;             // column-state stride: Nkm
  bool gathers_keys_ = false;   // some entry's keys are reordered (masked or mapped subset)
  at::Tensor row_stat_max_;    // [Bm, H, R2] row maxima
  at::Tensor row_stat_inv_;    // [Bm, H, R2] 1 / row sums (0 for a row whose scores are all -inf)
  at::Tensor col_max_;         // [Bm, H, chunks, Nkm]; after combining, chunk 0 holds the column max
  at::Tensor col_sum_;         // [Bm, H, chunks, Nkm]; after combining, chunk 0 holds 1 / column sum
  at::Tensor reference_part_;  // [Bm, H, chunks, Nkm]
  std::vector<std::vector<int64_t>> probes_of_row_;
};

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
    AttentionWithMapsCpu<scalar_t>(
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
