#include "row_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

// Several instruction-set versions of each float loop, chosen by the loader, so that one
// binary runs everywhere and still uses AVX-512 where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define I2AM_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define I2AM_CPU_MULTIVERSION
#endif

namespace i2am_fast::cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Explicit vectors of 16 floats (GCC/Clang vector extensions). The compiler maps them onto
// whatever the clone's instruction set has (one zmm register, two ymm, four xmm), so the
// vector code is written once. The lane structure also fixes the order of every sum, so all
// instruction sets add in the same order.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kLanes = 16;

// Forced inlining: these helpers must be compiled inside each clone, with the clone's
// instruction set, not called across clones with a different vector calling convention.
#define I2AM_VEC_INLINE inline __attribute__((always_inline))
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

I2AM_VEC_INLINE VecF splat(float x) { return VecF{} + x; }
I2AM_VEC_INLINE VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
I2AM_VEC_INLINE void store(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }
I2AM_VEC_INLINE VecF vmax(VecF a, VecF b) { return a < b ? b : a; }  // std::max's rule, lane-wise
I2AM_VEC_INLINE float reduce_sum(VecF v) {
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) {
    total += v[l];
  }
  return total;
}
I2AM_VEC_INLINE float reduce_max(VecF v) {
  float m = v[0];
  for (int64_t l = 1; l < kLanes; ++l) {
    m = std::max(m, v[l]);
  }
  return m;
}

// exp(x): Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2, then the degree-6 minimax
// polynomial of Cephes' expf (about 1 ulp). Returns 0 below -87.33 (where float would go
// subnormal; tile_math.h's error analysis counts such values as lost), +inf above 88.3, and
// propagates NaN. The same steps serve one float and a vector of them.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr int32_t kRoundMagicBits = 0x4B400000;
constexpr float kExpMin = -87.33654475f;
constexpr float kExpMax = 88.3f;
constexpr float kP0 = 1.9875691500e-4f;
constexpr float kP1 = 1.3981999507e-3f;
constexpr float kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f;
constexpr float kP4 = 1.6666665459e-1f;
constexpr float kP5 = 5.0000001201e-1f;

I2AM_VEC_INLINE VecF exp_vec(VecF x) {
  VecF xc = x < kExpMin ? splat(kExpMin) : x;  // a NaN lane compares false and stays NaN
  xc = xc > kExpMax ? splat(kExpMax) : xc;
  const VecF shifted = xc * kLog2e + kRoundMagic;
  const VecF n = shifted - kRoundMagic;
  const VecI exponent = ((VecI)shifted - kRoundMagicBits) + 127;
  VecF r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  VecF p = splat(kP0);
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r * r + r + 1.0f;
  const VecI two_n_bits = exponent << 23;
  VecF result = p * (VecF)two_n_bits;
  result = x < kExpMin ? splat(0.0f) : result;
  result = x > kExpMax ? splat(std::numeric_limits<float>::infinity()) : result;
  return result;
}

I2AM_VEC_INLINE float exp_scalar(float x) {
  // The tail of a row: same arithmetic as one vector lane.
  return exp_vec(splat(x))[0];
}
inline double exp_scalar(double x) { return std::exp(x); }

// ------------------------------- generic (scalar) versions ---------------------------------
// Used for double, and for float tails shorter than a vector.
template <typename T>
I2AM_VEC_INLINE T row_max_scalar(const T* __restrict s, int64_t n, T* __restrict col_max, T m) {
  for (int64_t j = 0; j < n; ++j) {
    m = std::max(m, s[j]);
    if (col_max != nullptr) {
      col_max[j] = std::max(col_max[j], s[j]);
    }
  }
  return m;
}

template <typename T>
I2AM_VEC_INLINE T exp_row_scalar(T* __restrict s, T shift, int64_t n, T weight, T* __restrict col_sum) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_scalar(s[j] - shift);
    s[j] = e;
    sum += e;
    if (col_sum != nullptr) {
      col_sum[j] += weight * e;
    }
  }
  return sum;
}

template <typename T>
I2AM_VEC_INLINE T exp_diff_dot_scalar(const T* __restrict s, const T* __restrict c, const T* __restrict m, int64_t n) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    sum += exp_scalar(s[j] - c[j]) * m[j];
  }
  return sum;
}

template <typename T>
I2AM_VEC_INLINE T map_row_scalar(
    T* __restrict s, T shift, T inv_sum, int64_t n, const T* __restrict u, T weight, T* __restrict reference_part,
    T* p_sum) {
  T dot = 0;
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_scalar(s[j] - shift);
    const T p = e * inv_sum;
    s[j] = p;
    sum += p;
    reference_part[j] += weight * p;
    if (u != nullptr) {
      dot += e * u[j];
    }
  }
  *p_sum += sum;
  return dot;
}

template <typename T>
I2AM_VEC_INLINE void softmax_row_scalar(T* __restrict s, T shift, T inv_sum, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_scalar(s[j] - shift) * inv_sum;
  }
}

template <typename T>
I2AM_VEC_INLINE void exp_of_difference_scalar(T a, const T* __restrict c, const T* __restrict m, T* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    y[j] = exp_scalar(a - c[j]) * m[j];
  }
}

}  // namespace

// --------------------------------- float: vector versions ----------------------------------

I2AM_CPU_MULTIVERSION float row_max(const float* __restrict s, int64_t n, float* __restrict col_max) {
  VecF m = splat(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const VecF x = load(s + j);
    m = vmax(m, x);
    if (col_max != nullptr) {
      store(col_max + j, vmax(load(col_max + j), x));
    }
  }
  return row_max_scalar(s + j, n - j, col_max == nullptr ? nullptr : col_max + j, reduce_max(m));
}

I2AM_CPU_MULTIVERSION float exp_row_in_place(
    float* __restrict s, float shift, int64_t n, float weight, float* __restrict col_sum) {
  VecF sum = splat(0.0f);
  int64_t j = 0;
  if (col_sum != nullptr) {
    for (; j + kLanes <= n; j += kLanes) {
      const VecF e = exp_vec(load(s + j) - shift);
      store(s + j, e);
      sum += e;
      store(col_sum + j, load(col_sum + j) + weight * e);
    }
  } else {
    for (; j + kLanes <= n; j += kLanes) {
      const VecF e = exp_vec(load(s + j) - shift);
      store(s + j, e);
      sum += e;
    }
  }
  return reduce_sum(sum) +
      exp_row_scalar(s + j, shift, n - j, weight, col_sum == nullptr ? nullptr : col_sum + j);
}

I2AM_CPU_MULTIVERSION float exp_diff_dot(
    const float* __restrict s, const float* __restrict c, const float* __restrict m, int64_t n) {
  VecF sum = splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    sum += exp_vec(load(s + j) - load(c + j)) * load(m + j);
  }
  return reduce_sum(sum) + exp_diff_dot_scalar(s + j, c + j, m + j, n - j);
}

I2AM_CPU_MULTIVERSION float map_row_in_place(
    float* __restrict s,
    float shift,
    float inv_sum,
    int64_t n,
    const float* __restrict u,
    float weight,
    float* __restrict reference_part,
    float* p_sum) {
  VecF dot = splat(0.0f);
  VecF sum = splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const VecF e = exp_vec(load(s + j) - shift);
    const VecF p = e * inv_sum;
    store(s + j, p);
    sum += p;
    store(reference_part + j, load(reference_part + j) + weight * p);
    if (u != nullptr) {
      dot += e * load(u + j);
    }
  }
  *p_sum += reduce_sum(sum);
  return reduce_sum(dot) +
      map_row_scalar(s + j, shift, inv_sum, n - j, u == nullptr ? nullptr : u + j, weight, reference_part + j, p_sum);
}

I2AM_CPU_MULTIVERSION void softmax_row_in_place(float* __restrict s, float shift, float inv_sum, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    store(s + j, exp_vec(load(s + j) - shift) * inv_sum);
  }
  softmax_row_scalar(s + j, shift, inv_sum, n - j);
}

I2AM_CPU_MULTIVERSION void exp_of_difference(
    float a, const float* __restrict c, const float* __restrict m, float* __restrict y, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    store(y + j, exp_vec(a - load(c + j)) * load(m + j));
  }
  exp_of_difference_scalar(a, c + j, m + j, y + j, n - j);
}

// ------------------------------- double: the float64 path --------------------------------

double row_max(const double* __restrict s, int64_t n, double* __restrict col_max) {
  return row_max_scalar(s, n, col_max, -std::numeric_limits<double>::infinity());
}
double exp_row_in_place(double* __restrict s, double shift, int64_t n, double weight, double* __restrict col_sum) {
  return exp_row_scalar(s, shift, n, weight, col_sum);
}
double exp_diff_dot(const double* __restrict s, const double* __restrict c, const double* __restrict m, int64_t n) {
  return exp_diff_dot_scalar(s, c, m, n);
}
double map_row_in_place(
    double* __restrict s,
    double shift,
    double inv_sum,
    int64_t n,
    const double* __restrict u,
    double weight,
    double* __restrict reference_part,
    double* p_sum) {
  return map_row_scalar(s, shift, inv_sum, n, u, weight, reference_part, p_sum);
}
void softmax_row_in_place(double* __restrict s, double shift, double inv_sum, int64_t n) {
  softmax_row_scalar(s, shift, inv_sum, n);
}
void exp_of_difference(double a, const double* __restrict c, const double* __restrict m, double* __restrict y, int64_t n) {
  exp_of_difference_scalar(a, c, m, y, n);
}

}  // namespace i2am_fast::cpu
