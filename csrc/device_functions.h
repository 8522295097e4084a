// Per-element algorithms shared by the CPU and CUDA kernels. Everything here is
// __host__ __device__ so the CPU build (and its tests) runs the exact code the
// GPU runs; only launch configuration and memory movement differ per backend.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define ALPHANET_HD __host__ __device__ __forceinline__
#else
#define ALPHANET_HD inline
#endif

namespace alphanet {

// Candidate order used everywhere: smaller value first, ties to the lower index.
template <typename V>
ALPHANET_HD bool precedes(V value_a, int64_t index_a, V value_b, int64_t index_b) {
  return value_a < value_b || (value_a == value_b && index_a < index_b);
}

// Places (value, index) in a sorted list whose slot `last` is free (or is
// given up), moving the entries it precedes one slot down.
template <typename V, typename I>
ALPHANET_HD void insert_sorted(V* values, int64_t* indices, I last, V value, int64_t index) {
  I pos = last;
  while (pos > 0 && precedes(value, index, values[pos - 1], indices[pos - 1])) {
    values[pos] = values[pos - 1];
    indices[pos] = indices[pos - 1];
    --pos;
  }
  values[pos] = value;
  indices[pos] = index;
}

// Insert (value, index) into a list of `k` candidates kept sorted by `precedes`.
// The list starts filled with (+inf, INT64_MAX) sentinels.
template <typename V>
ALPHANET_HD void topk_insert(V* values, int64_t* indices, int k, V value, int64_t index) {
  if (precedes(value, index, values[k - 1], indices[k - 1])) insert_sorted(values, indices, k - 1, value, index);
}

// The k best of `count` >= k pairs (values[c], indices[c]) under `precedes`,
// best first. Linear in `count` for input already close to that order (the
// knn recheck's candidates arrive in approximate-distance order).
template <typename V>
ALPHANET_HD void best_of(const V* values, const int64_t* indices, int64_t count, int64_t k, V* out_values,
                         int64_t* out_indices) {
  int64_t filled = 0;
  for (int64_t c = 0; c < count; ++c) {
    if (filled < k) {
      insert_sorted(out_values, out_indices, filled++, values[c], indices[c]);
    } else if (precedes(values[c], indices[c], out_values[k - 1], out_indices[k - 1])) {
      insert_sorted(out_values, out_indices, k - 1, values[c], indices[c]);
    }
  }
}

template <typename A>
ALPHANET_HD A abs_value(A v) { return v < A(0) ? -v : v; }

template <typename A>
ALPHANET_HD A sign_value(A v) { return v > A(0) ? A(1) : (v < A(0) ? A(-1) : A(0)); }

// ||alphas||_1 of one class's k coefficients.
template <typename A, typename T>
ALPHANET_HD A l1_norm(const T* alphas, int64_t stride, int k) {
  A norm = A(0);
  for (int i = 0; i < k; ++i) norm += abs_value(static_cast<A>(alphas[i * stride]));
  return norm;
}

// Gradient of the L1 normalisation a -> a / ||a||_1 for one class:
// given g_i = dL/d(normalised_i), returns dL/da_j = (g_j - sign(a_j) * sum_i normalised_i g_i) / ||a||_1.
template <typename A, typename T>
ALPHANET_HD A l1_normalized_grad(const T* alphas, int64_t stride, const A* grad_normalized, int k,
                                 int j, A norm) {
  A weighted = A(0);
  for (int i = 0; i < k; ++i) weighted += static_cast<A>(alphas[i * stride]) / norm * grad_normalized[i];
  return (grad_normalized[j] - sign_value(static_cast<A>(alphas[j * stride])) * weighted) / norm;
}

// What alpha_combine's value checks need, folded over any share of the classes
// and neighbour indices, then merged: the lowest and highest target and
// neighbour, and the counts of coefficient rows with a NaN or inf and of rows
// of zeros. Both backends fold the same way and report from the merged result.
struct CombineValueSummary {
  int64_t lowest_target, highest_target, lowest_neighbor, highest_neighbor, nonfinite_rows, zero_rows;
};

ALPHANET_HD CombineValueSummary empty_summary() {
  constexpr int64_t kLowest = INT64_MIN, kHighest = INT64_MAX;
  return {kHighest, kLowest, kHighest, kLowest, 0, 0};
}

ALPHANET_HD int64_t min_value(int64_t a, int64_t b) { return a < b ? a : b; }
ALPHANET_HD int64_t max_value(int64_t a, int64_t b) { return a > b ? a : b; }

ALPHANET_HD void merge_summary(CombineValueSummary& into, const CombineValueSummary& other) {
  into.lowest_target = min_value(into.lowest_target, other.lowest_target);
  into.highest_target = max_value(into.highest_target, other.highest_target);
  into.lowest_neighbor = min_value(into.lowest_neighbor, other.lowest_neighbor);
  into.highest_neighbor = max_value(into.highest_neighbor, other.highest_neighbor);
  into.nonfinite_rows += other.nonfinite_rows;
  into.zero_rows += other.zero_rows;
}

// Class c's target and coefficient row (k values).
template <typename A>
ALPHANET_HD void summarize_class(CombineValueSummary& summary, int64_t target, const A* alphas, int64_t k) {
  summary.lowest_target = min_value(summary.lowest_target, target);
  summary.highest_target = max_value(summary.highest_target, target);
  bool finite = true;
  A norm = A(0);
  for (int64_t i = 0; i < k; ++i) {
    const A magnitude = alphas[i] < A(0) ? -alphas[i] : alphas[i];
    finite = finite && magnitude <= std::numeric_limits<A>::max();  // false for NaN and inf
    norm += magnitude;
  }
  summary.nonfinite_rows += finite ? 0 : 1;
  summary.zero_rows += finite && !(norm > A(0)) ? 1 : 0;
}

ALPHANET_HD void summarize_neighbor(CombineValueSummary& summary, int64_t neighbor) {
  summary.lowest_neighbor = min_value(summary.lowest_neighbor, neighbor);
  summary.highest_neighbor = max_value(summary.highest_neighbor, neighbor);
}

// The class-sum order both backends follow: rows are taken four at a time,
// added pairwise, and each group is added to the running sum; a last partial
// group is added row by row. (Four rows in flight let the CPU keep four memory
// streams busy; the CUDA kernel uses the same order so results are identical.)
constexpr int kSumGroup = 4;

template <typename A, typename T>
ALPHANET_HD A add_row_group(A sum, T a, T b, T c, T d) {
  return sum + ((static_cast<A>(a) + static_cast<A>(b)) + (static_cast<A>(c) + static_cast<A>(d)));
}

// sum plus load(rows[r]) for r in [begin, end), in the order above: one class's
// segment of a label-sorted row order. load returns a row's term: one column's
// value, or a pack of columns' values as Lanes.
template <typename S, typename Load>
ALPHANET_HD S segment_sum_rows(S sum, const int64_t* rows, int64_t begin, int64_t end, Load load) {
  int64_t r = begin;
  for (; r + kSumGroup <= end; r += kSumGroup) {
    sum = add_row_group<S>(sum, load(rows[r]), load(rows[r + 1]), load(rows[r + 2]), load(rows[r + 3]));
  }
  for (; r < end; ++r) sum = sum + load(rows[r]);
  return sum;
}

// sum plus x[rows[r], col] for r in [begin, end), in segment_sum_rows's order.
template <typename A, typename T>
ALPHANET_HD A segment_sum(A sum, const T* x, int64_t row_stride, const int64_t* rows, int64_t begin,
                          int64_t end, int64_t col) {
  return segment_sum_rows(sum, rows, begin, end, [=](int64_t row) { return static_cast<A>(x[row * row_stride + col]); });
}

// N values added lane by lane: the columns of a pack, summed as one.
template <typename A, int N>
struct Lanes {
  A v[N];
};

template <typename A, int N>
ALPHANET_HD Lanes<A, N> operator+(Lanes<A, N> a, const Lanes<A, N>& b) {
  for (int u = 0; u < N; ++u) a.v[u] += b.v[u];
  return a;
}

// Float64 terms of an exact distance between two rows, over columns
// begin, begin + step, ... < end (a GPU lane takes a strided share).
ALPHANET_HD double to_double(double v) { return v; }
ALPHANET_HD double to_double(float v) { return v; }
template <typename T>  // c10::Half, c10::BFloat16: through float
ALPHANET_HD double to_double(T v) { return static_cast<float>(v); }

struct DistanceTerms {
  double squared_difference = 0, dot = 0, a_squared = 0, b_squared = 0;
};

// Four interleaved partial sums, combined pairwise: a single running sum would
// make the loop wait on the latency of every addition.
template <typename T>
ALPHANET_HD void add_distance_terms(const T* a, const T* b, int64_t begin, int64_t end, int64_t step, bool cosine,
                                    DistanceTerms& terms) {
  double first[4] = {0, 0, 0, 0}, second[4] = {0, 0, 0, 0}, third[4] = {0, 0, 0, 0};
  int64_t j = begin;
  if (cosine) {
    for (; j + 3 * step < end; j += 4 * step) {
      for (int u = 0; u < 4; ++u) {
        const double x = to_double(a[j + u * step]);
        const double y = to_double(b[j + u * step]);
        first[u] += x * y;
        second[u] += x * x;
        third[u] += y * y;
      }
    }
    for (; j < end; j += step) {
      const double x = to_double(a[j]);
      const double y = to_double(b[j]);
      first[0] += x * y;
      second[0] += x * x;
      third[0] += y * y;
    }
    terms.dot += (first[0] + first[1]) + (first[2] + first[3]);
    terms.a_squared += (second[0] + second[1]) + (second[2] + second[3]);
    terms.b_squared += (third[0] + third[1]) + (third[2] + third[3]);
  } else {
    for (; j + 3 * step < end; j += 4 * step) {
      for (int u = 0; u < 4; ++u) {
        const double diff = to_double(a[j + u * step]) - to_double(b[j + u * step]);
        first[u] += diff * diff;
      }
    }
    for (; j < end; j += step) {
      const double diff = to_double(a[j]) - to_double(b[j]);
      first[0] += diff * diff;
    }
    terms.squared_difference += (first[0] + first[1]) + (first[2] + first[3]);
  }
}

constexpr double kNormFloor = 1e-12;  // cosine's norm clamp

// Euclidean ||a - b|| or cosine 1 - cos(a, b) (norms clamped at kNormFloor).
ALPHANET_HD double finish_distance(const DistanceTerms& terms, bool cosine) {
  if (!cosine) return sqrt(terms.squared_difference);
  const double a_norm = sqrt(terms.a_squared), b_norm = sqrt(terms.b_squared);
  const double a_clamped = a_norm > kNormFloor ? a_norm : kNormFloor, b_clamped = b_norm > kNormFloor ? b_norm : kNormFloor;
  return 1.0 - terms.dot / (a_clamped * b_clamped);
}

}  // namespace alphanet
