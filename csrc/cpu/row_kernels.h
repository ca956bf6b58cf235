// Row-level loops of the CPU attention-with-maps kernel: the only places where the CPU path
// touches every score, so the only code that has to vectorise well.
//
// Each function works on one row of a score tile (n contiguous values, n <= the key block).
// The float versions are compiled for several x86 instruction sets and picked at load time
// (GCC target_clones); the double versions serve the float64 path, which exists for checking
// rather than speed.
#pragma once

#include <cstdint>

namespace i2am_fast::cpu {

// Returns max_j s[j]; with col_max non-null also sets col_max[j] = max(col_max[j], s[j]).
float row_max(const float* __restrict s, int64_t n, float* __restrict col_max);
double row_max(const double* __restrict s, int64_t n, double* __restrict col_max);

// Pass-1 softmax row, in place: s[j] <- exp(s[j] - shift); returns the sum of the new values.
// With col_sum non-null also adds weight * s[j] to col_sum[j] (column statistics that reuse
// the row-shifted exponentials).
float exp_row_in_place(float* __restrict s, float shift, int64_t n, float weight, float* __restrict col_sum);
double exp_row_in_place(double* __restrict s, double shift, int64_t n, double weight, double* __restrict col_sum);

// Returns sum_j exp(s[j] - c[j]) * m[j]; the exact path for tiles where reuse is not safe
// (c: column maxima, m: their inverse sums).
float exp_diff_dot(const float* s, const float* c, const float* m, int64_t n);
double exp_diff_dot(const double* s, const double* c, const double* m, int64_t n);

// Pass-2 row, in place: s[j] <- p[j] = exp(s[j] - shift) * inv_sum (the key-axis softmax row,
// shift and inv_sum the row's max and 1 / sum); reference_part[j] += weight * p[j];
// *p_sum += sum_j p[j] (the row's reference share); returns sum_j exp(s[j] - shift) * u[j]
// (u null: returns 0).
float map_row_in_place(float* __restrict s, float shift, float inv_sum, int64_t n, const float* __restrict u, float weight, float* __restrict reference_part, float* p_sum);
double map_row_in_place(double* __restrict s, double shift, double inv_sum, int64_t n, const double* __restrict u, double weight, double* __restrict reference_part, double* p_sum);

// s[j] <- exp(s[j] - shift) * inv_sum: a key-axis softmax row that only probes need.
void softmax_row_in_place(float* __restrict s, float shift, float inv_sum, int64_t n);
void softmax_row_in_place(double* __restrict s, double shift, double inv_sum, int64_t n);

// y[j] = exp(a - c[j]) * m[j], the per-column factors e^(A - colmax) / colsum of the reuse path.
void exp_of_difference(float a, const float* __restrict c, const float* __restrict m, float* __restrict y, int64_t n);
void exp_of_difference(double a, const double* __restrict c, const double* __restrict m, double* __restrict y, int64_t n);

}  // namespace i2am_fast::cpu
