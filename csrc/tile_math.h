// Tile math shared by the CPU kernels and the CUDA kernels.
//
// Everything here is a small inline function on scalars, usable from host and device code, so
// that both back ends combine softmax statistics in exactly the same way. A softmax statistic is
// a pair (max, sum) standing for the value `sum * exp(max)`, i.e. log-sum-exp = max + log(sum);
// keeping the max separate is what lets tiles be merged without overflow.
//
// Precision (docs/design.md, "Numerical accuracy"): a softmax weight is formed as
// exp(S - max) * (1 / sum), never as exp(S - (max + log(sum))). Every exponential then takes the
// difference of two floats, which is correctly rounded, so its relative error is about
// |argument| * 2^-24 whatever the size of S. A pre-combined log-sum-exp carries an absolute
// rounding error of half an ulp of |max| (0.03 at |S| = 1e6 in float32), which becomes a relative
// error of exp(0.03) - 1 = 3% in every weight.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define I2AM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define I2AM_HOST_DEVICE inline
#endif

namespace i2am_fast {

// exp(x - shift) written so that shift = -inf (an empty statistic) gives 0 rather than NaN.
template <typename T>
I2AM_HOST_DEVICE T exp_shifted(T x, T shift) {
  return x == -INFINITY ? T(0) : ::exp(x - shift);
}

// The factor that rescales a running statistic kept relative to `old_max` so that it is kept
// relative to `new_max` (new_max >= old_max). The online-softmax correction `alpha`.
template <typename T>
I2AM_HOST_DEVICE T online_rescale(T old_max, T new_max) {
  return old_max == -INFINITY ? T(0) : ::exp(old_max - new_max);
}

// A softmax statistic: the value it stands for is sum * exp(max).
template <typename T>
struct SoftmaxStat {
  T max;
  T sum;
};

template <typename T>
I2AM_HOST_DEVICE SoftmaxStat<T> empty_stat() {
  return SoftmaxStat<T>{-INFINITY, T(0)};
}

// Merges two statistics: the result stands for the sum of what the two stand for.
// Order-independent up to rounding; callers that need determinism merge in a fixed order.
template <typename T>
I2AM_HOST_DEVICE SoftmaxStat<T> merge_stats(SoftmaxStat<T> a, SoftmaxStat<T> b) {
  const T m = a.max > b.max ? a.max : b.max;
  if (m == -INFINITY) {
    return empty_stat<T>();
  }
  return SoftmaxStat<T>{m, a.sum * online_rescale(a.max, m) + b.sum * online_rescale(b.max, m)};
}

// 1 / sum, or 0 for an empty statistic (all of its scores -inf): every weight
// exp(S - max) * inverse_sum is then 0 instead of NaN.
template <typename T>
I2AM_HOST_DEVICE T inverse_sum(SoftmaxStat<T> s) {
  return s.sum > T(0) ? T(1) / s.sum : T(0);
}

// log(sum * exp(max)); -inf for an empty statistic. For reporting and merging only: do not
// subtract it from a score (see "Precision" above).
template <typename T>
I2AM_HOST_DEVICE T log_sum_exp(SoftmaxStat<T> s) {
  return s.sum > T(0) ? s.max + ::log(s.sum) : T(-INFINITY);
}

// log(exp(a) + exp(b)) for two log-sum-exp values, without overflow.
template <typename T>
I2AM_HOST_DEVICE T combine_log_sum_exp(T a, T b) {
  const T m = a > b ? a : b;
  if (m == -INFINITY) {
    return m;
  }
  const T lo = a > b ? b : a;
  return m + ::log1p(::exp(lo - m));
}

// How far below a tile's reference maximum a value may lie before its exponential, taken
// relative to that reference, loses precision that matters. Reusing row-shifted exponentials
// for column statistics (and vice versa) multiplies e^(s - a) by e^(a - c); with
// a - c <= kReuseSpread every product that underflows in float32 (< e^-87) stands for a true
// value below e^(-87 + kReuseSpread) = e^-57 relative to the quantities being summed (each
// softmax sum is at least e^-kReuseSpread relative to its reference). Tiles where the spread is
// larger take the exact path with a second exponential.
constexpr float kReuseSpread = 30.0f;

}  // namespace i2am_fast
