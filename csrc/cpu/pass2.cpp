// Pass 2 of the CPU kernel (kernel.h): rows [0, R2) x mapped columns of one (map slot, head,
// query chunk) give the reference parts, the share, the probe rows and the generated map; then
// the chunks' reference parts are added, in chunk order, into the reference accumulator.
#include "kernel.h"

namespace i2am_fast::cpu {

template <typename scalar_t>
void AttentionWithMapsCpu<scalar_t>::pass2(int64_t slot, int64_t h, int64_t chunk, Scratch<acc_t>& s) {
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


template <typename scalar_t>
void AttentionWithMapsCpu<scalar_t>::add_probe_row(int64_t slot, int64_t h, int64_t probe, int64_t b, int64_t k0, const acc_t* row, int64_t cols) {
  at::Tensor& acc = *probes_;
  float* dst = acc.data_ptr<float>() + slot * acc.stride(0) + h * acc.stride(1) + probe * acc.stride(2);
  const int64_t stride = acc.stride(3);
  const int64_t* key_slot = p_.key_slot_of(b) + k0;
  for (int64_t j = 0; j < cols; ++j) {
    dst[key_slot[j] * stride] += static_cast<float>(row[j]);
  }
}


// reference[slot, h, key_slot[j]] += (1 / Nqm) * sum over chunks (in chunk order) of the chunk parts.
template <typename scalar_t>
void AttentionWithMapsCpu<scalar_t>::reduce_reference_parts() {
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


#define I2AM_FAST_INSTANTIATE_PASS2(T)                                                              \
  template void AttentionWithMapsCpu<T>::pass2(int64_t, int64_t, int64_t, Scratch<at::opmath_type<T>>&); \
  template void AttentionWithMapsCpu<T>::reduce_reference_parts();
I2AM_FAST_FOR_EACH_CPU_DTYPE(I2AM_FAST_INSTANTIATE_PASS2)

}  // namespace i2am_fast::cpu
