// Row gathers and scatters for the token order of attention_with_maps.h: the CPU kernel reads
// queries and keys in that order and writes output rows back to their query positions.
#pragma once

#include <cstdint>

namespace i2am_fast::cpu {

// dst[r, :] = src[rows[r] * row_stride + (0 .. width)] for r < count, converted to dst_t;
// dst is contiguous [count, width], src rows have unit feature stride (row_stride may be 0).
template <typename src_t, typename dst_t>
void gather_rows(const src_t* src, int64_t row_stride, const int64_t* rows, int64_t count, int64_t width, dst_t* dst) {
  for (int64_t r = 0; r < count; ++r) {
    const src_t* from = src + rows[r] * row_stride;
    dst_t* to = dst + r * width;
    for (int64_t d = 0; d < width; ++d) {
      to[d] = static_cast<dst_t>(from[d]);
    }
  }
}

// dst[rows[r] * row_stride + (0 .. width)] = src[r, :] for r < count, converted to dst_t;
// src is contiguous [count, width].
template <typename src_t, typename dst_t>
void scatter_rows(const src_t* src, int64_t count, int64_t width, const int64_t* rows, dst_t* dst, int64_t row_stride) {
  for (int64_t r = 0; r < count; ++r) {
    const src_t* from = src + r * width;
    dst_t* to = dst + rows[r] * row_stride;
    for (int64_t d = 0; d < width; ++d) {
      to[d] = static_cast<dst_t>(from[d]);
    }
  }
}

}  // namespace i2am_fast::cpu
