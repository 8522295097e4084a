// Unit-stride row loops of the CPU kernels, compiled twice on x86-64 with GCC:
// for the baseline ISA the portable build targets (SSE2) and for AVX2, the copy
// chosen when the library loads from the CPU's features (target_clones). The
// AVX2 copy has no FMA, so both copies do the same operations in the same
// order: results are bit-identical whichever copy runs.
#pragma once

#include <cstdint>

#include "../device_functions.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ALPHANET_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ALPHANET_AVX2_CLONES
#endif

namespace alphanet::cpu {
namespace {  // each kernel file gets its own copies (no cross-file resolvers)

// sum[j] += a[j] + b[j] + c[j] + d[j] for n columns, in add_row_group's order.
template <typename A, typename T>
ALPHANET_AVX2_CLONES void add_four_rows(A* sum, const T* a, const T* b, const T* c, const T* d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) sum[j] = add_row_group<A>(sum[j], a[j], b[j], c[j], d[j]);
}

// sum[j] += row[j].
template <typename A, typename T>
ALPHANET_AVX2_CLONES void add_row(A* sum, const T* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) sum[j] += static_cast<A>(row[j]);
}

// acc[j] += weight * row[j].
template <typename A, typename T>
ALPHANET_AVX2_CLONES void add_scaled_row(A* acc, A weight, const T* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += weight * static_cast<A>(row[j]);
}

// out[j] = acc[j], converted to the output type.
template <typename T, typename A>
ALPHANET_AVX2_CLONES void store_row(T* out, const A* acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(acc[j]);
}

}  // namespace
}  // namespace alphanet::cpu
