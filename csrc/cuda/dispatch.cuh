// Compile-time dispatch of the CUDA kernels: turns a run-time (ElementType, padded width) into
// template arguments, over the two lists in attention_with_maps_kernels.cuh
// (I2AM_CUDA_ELEMENT_TYPES and kPaddedWidths). Adding an element type or a width there is
// all it takes to compile and dispatch every kernel for it.
//
//   I2AM_ELEMENT_TYPE_SWITCH(dtype, T, fallback, [&] { return f<T>(...); })
//   I2AM_PADDED_WIDTH_SWITCH(width, DP, fallback, [&] { return f<DP>(...); })
//   I2AM_KERNEL_SWITCH(dtype, width, T, DP, fallback, [&] { return f<T, DP>(...); })
//
// Each expands to an expression: the value the lambda returns for the listed type / width, or
// `fallback` (whose type is the result type) when `dtype` / `width` is not listed. The lambda
// sees T as a type alias and DP as a constant expression.
//
// Host code only (the launch functions); needs the CUDA element types, so it is included by
// the .cu and not by the torch glue.
#pragma once

#include "attention_with_maps_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <type_traits>
#include <utility>

namespace i2am_fast {
namespace cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

namespace dispatch_detail {

constexpr bool widths_ascending_multiples_of_16() {
  for (int i = 0; i < kPaddedWidthCount; ++i) {
    if (kPaddedWidths[i] % 16 != 0 || kPaddedWidths[i] < 16 || (i > 0 && kPaddedWidths[i] <= kPaddedWidths[i - 1])) {
      return false;
    }
  }
  return true;
}
static_assert(widths_ascending_multiples_of_16(), "kPaddedWidths: ascending multiples of 16");

template <typename R, typename F, std::size_t... I>
R visit_padded_width(int width, R fallback, F& f, std::index_sequence<I...>) {
  R result = fallback;
  // Tries the listed widths in order; || stops at the one that matches.
  static_cast<void>(
      ((width == kPaddedWidths[I] && (result = f(std::integral_constant<int, kPaddedWidths[I]>()), true)) || ...));
  return result;
}

}  // namespace dispatch_detail

// f(TypeTag<T>()) for the CUDA element type T of `dtype`, or `fallback`.
template <typename R, typename F>
R visit_element_type(ElementType dtype, R fallback, F&& f) {
  switch (dtype) {
#define I2AM_ELEMENT_TYPE_CASE(enumerator, type, torch_type, name) \
  case ElementType::enumerator:                                    \
    return f(TypeTag<type>());
    I2AM_CUDA_ELEMENT_TYPES(I2AM_ELEMENT_TYPE_CASE)
#undef I2AM_ELEMENT_TYPE_CASE
  }
  return fallback;
}

// f(std::integral_constant<int, DP>()) for the listed width DP equal to `width`, or `fallback`.
template <typename R, typename F>
R visit_padded_width(int width, R fallback, F&& f) {
  return dispatch_detail::visit_padded_width(width, fallback, f, std::make_index_sequence<kPaddedWidthCount>());
}

}  // namespace cuda
}  // namespace i2am_fast

#define I2AM_ELEMENT_TYPE_SWITCH(DTYPE, TYPE, FALLBACK, ...)                                   \
  ::i2am_fast::cuda::visit_element_type((DTYPE), (FALLBACK), [&](auto i2am_type_tag_) {        \
    using TYPE = typename decltype(i2am_type_tag_)::type;                                      \
    return __VA_ARGS__();                                                                      \
  })

#define I2AM_PADDED_WIDTH_SWITCH(WIDTH, NAME, FALLBACK, ...)                                   \
  ::i2am_fast::cuda::visit_padded_width((WIDTH), (FALLBACK), [&](auto i2am_width_tag_) {       \
    static constexpr int NAME = decltype(i2am_width_tag_)::value;                              \
    return __VA_ARGS__();                                                                      \
  })

#define I2AM_KERNEL_SWITCH(DTYPE, WIDTH, TYPE, NAME, FALLBACK, ...) \
  I2AM_ELEMENT_TYPE_SWITCH(DTYPE, TYPE, FALLBACK, [&] { return I2AM_PADDED_WIDTH_SWITCH(WIDTH, NAME, FALLBACK, __VA_ARGS__); })
