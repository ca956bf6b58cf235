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

// Returns sum_j exp(s[j] - c[j]); the exact path for tiles where reuse is not safe.
float exp_diff_sum(const float* s, const float* c, int64_t n);
double exp_diff_sum(const double* s, const double* c, int64_t n);

// Pass-2 row, in place: s[j] <- e[j] = exp(s[j] - shift) (the key-axis softmax row);
// reference_part[j] += weight * e[j]; *e_sum += sum_j e[j] (the row's reference share);
// returns sum_j e[j] * u[j] (u null: returns 0).
float map_row_in_place(float* __restrict s, float shift, int64_t n, const float* __restrict u, float weight, float* __restrict reference_part, float* e_sum);
double map_row_in_place(double* __restrict s, double shift, int64_t n, const double* __restrict u, double weight, double* __restrict reference_part, double* e_sum);

// y[j] = exp(a - c[j]), the per-column factors e^(A - colLSE) of the reuse path.
void exp_of_difference(float a, const float* __restrict c, float* __restrict y, int64_t n);
void exp_of_difference(double a, const double* __restrict c, double* __restrict y, int64_t n);

}  // namespace i2am_fast::cpu
