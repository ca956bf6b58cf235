// The CPU kernel of attention_with_maps_accumulate: its work items, per-thread scratch and the
// class that runs the two passes over one call (attention_with_maps_cpu.cpp describes the
// algorithm). Pass 1 is defined in pass1.cpp, pass 2 in pass2.cpp, each instantiated there for
// the four input dtypes.
#pragma once

#include "../attention_with_maps.h"
#include "../tile_math.h"
#include "row_kernels.h"
#include "token_rows.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

namespace i2am_fast::cpu {

constexpr int64_t kQueryBlock = 256;
constexpr int64_t kKeyBlock = 512;
// Work items (batch, head, query chunk) aimed for: enough to balance up to a few dozen threads.
constexpr int64_t kTargetItems = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
inline at::Tensor matrix_view(void* data, int64_t rows, int64_t cols, int64_t row_stride, at::ScalarType dtype) {
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

  // Pass 1 of (batch entry b, head h, query chunk): pass1.cpp.
  void pass1(int64_t b, int64_t h, int64_t chunk, Scratch<acc_t>& s);

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

  // Merges the chunks' column statistics into (max, 1 / sum): pass1.cpp.
  void combine_column_statistics();

  // Pass 2 of (map slot, head h, query chunk): pass2.cpp.
  void pass2(int64_t slot, int64_t h, int64_t chunk, Scratch<acc_t>& s);
  void add_probe_row(int64_t slot, int64_t h, int64_t probe, int64_t b, int64_t k0, const acc_t* row, int64_t cols);
  // Adds the chunks' reference parts into the reference accumulator: pass2.cpp.
  void reduce_reference_parts();

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

// Pass 1 and pass 2 are compiled in their own files, for these input dtypes.
#define I2AM_FAST_FOR_EACH_CPU_DTYPE(MACRO) MACRO(float) MACRO(double) MACRO(c10::Half) MACRO(c10::BFloat16)

}  // namespace i2am_fast::cpu
