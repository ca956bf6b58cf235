// Pass 1 of the CPU kernel (kernel.h): every row x every unmasked column of one (batch entry,
// head, query chunk) gives the output and the row statistics; for map entries, the mapped rows x
// mapped columns also give the chunk's column statistics. Then the chunks' column statistics are
// merged.
#include "kernel.h"

namespace i2am_fast::cpu {

template <typename scalar_t>
void AttentionWithMapsCpu<scalar_t>::pass1(int64_t b, int64_t h, int64_t chunk, Scratch<acc_t>& s) {
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


// The column statistics over chunks, merged in chunk order, as (max, 1 / sum) in chunk 0's
// slots. A column that is -inf for every mapped query gets (+inf, 0): exp(S - max) * inv is
// then 0 on both of pass 2's paths, and it never fails the reuse test.
template <typename scalar_t>
void AttentionWithMapsCpu<scalar_t>::combine_column_statistics() {
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


#define I2AM_FAST_INSTANTIATE_PASS1(T)                                                              \
  template void AttentionWithMapsCpu<T>::pass1(int64_t, int64_t, int64_t, Scratch<at::opmath_type<T>>&); \
  template void AttentionWithMapsCpu<T>::combine_column_statistics();
I2AM_FAST_FOR_EACH_CPU_DTYPE(I2AM_FAST_INSTANTIATE_PASS1)

}  // namespace i2am_fast::cpu
