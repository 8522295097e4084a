#include <algorithm>
#include <limits>
#include <type_traits>

#include "../device_functions.h"
#include "../knn_params.h"
#include "launch.cuh"

namespace alphanet::cuda {
namespace {

// One warp per query row, kSelectWarps rows per block. The warp keeps the row's
// candidate list in shared memory, starting from the list of the earlier
// tiles, and a threshold: the list's last value. Lanes read the row's values
// in coalesced passes, kSelectUnroll passes' loads in flight at once; values
// that may precede the last candidate (value <= threshold) are appended to the
// warp's buffer (ballot, then each lane's rank among the kept ones). Before the
// buffer could overflow, lane 0 inserts it into the list and the threshold
// drops. Most values fail the threshold at once, so the pass is a read and a
// compare. Insertion order does not matter: the list is the `candidates` best
// under `precedes`, a total order.
constexpr int kSelectWarps = 8, kSelectUnroll = 4, kSelectBuffer = (kSelectUnroll + 1) * kWarp;

template <typename V>
__device__ void insert_buffered(V* list_values, int64_t* list_indices, int candidates, const V* buffer_values,
                                const int* buffer_columns, int pending, int64_t key_begin) {
  __syncwarp();
  if (threadIdx.x % kWarp == 0) {
    for (int slot = 0; slot < pending; ++slot) {
      topk_insert(list_values, list_indices, candidates, buffer_values[slot], key_begin + buffer_columns[slot]);
    }
  }
  __syncwarp();
}

// Ranking value of a tile column: from a float dot product, or (kCoded, V
// double) from the int8 screening's two code products (see SelectParams).
template <typename V, bool kCoded>
struct TileRow {
  const V* dots;
  const int32_t* hi_products;
  const int32_t* cross_products;
  double row_scale;

  __device__ TileRow(const SelectParams& p, int64_t row) {
    if constexpr (kCoded) {
      hi_products = static_cast<const int32_t*>(p.dots) + row * p.dots_stride;
      cross_products = p.cross + row * p.dots_stride;
      row_scale = p.row_scale[row];
    } else {
      dots = static_cast<const V*>(p.dots) + row * p.dots_stride;
    }
  }

  __device__ __forceinline__ V value(const V* offset, const V* scale, int column) const {
    if constexpr (kCoded) {
      const int64_t codes = 254 * static_cast<int64_t>(hi_products[column]) + cross_products[column];
      return offset[column] + scale[column] * (row_scale * static_cast<double>(codes));
    } else {
      return offset[column] + scale[column] * dots[column];
    }
  }
};

template <typename V, int kMax, bool kCoded>
__global__ void __launch_bounds__(kSelectWarps * kWarp) select_kernel(SelectParams p) {
  __shared__ V shared_values[kSelectWarps][kMax];
  __shared__ int64_t shared_indices[kSelectWarps][kMax];
  __shared__ V shared_buffer_values[kSelectWarps][kSelectBuffer];
  __shared__ int shared_buffer_columns[kSelectWarps][kSelectBuffer];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSelectWarps + warp;
  if (row >= p.tile_rows) return;  // whole warps only: the kernel has no block barrier
  const int candidates = p.candidates;
  V* list_values = shared_values[warp];
  int64_t* list_indices = shared_indices[warp];
  V* buffer_values = shared_buffer_values[warp];
  int* buffer_columns = shared_buffer_columns[warp];
  V* row_values = static_cast<V*>(p.values) + row * candidates;
  int64_t* row_indices = p.indices + row * candidates;
  for (int i = lane; i < candidates; i += kWarp) {
    list_values[i] = p.first_tile ? std::numeric_limits<V>::infinity() : row_values[i];
    list_indices[i] = p.first_tile ? std::numeric_limits<int64_t>::max() : row_indices[i];
  }
  __syncwarp();
  V threshold = list_values[candidates - 1];
  int pending = 0;
  const TileRow<V, kCoded> tile_row(p, row);
  const V* offset = static_cast<const V*>(p.key_offset);
  const V* scale = static_cast<const V*>(p.key_scale);
  const int columns = static_cast<int>(p.tile_cols);
  for (int base = 0; base < columns; base += kSelectUnroll * kWarp) {
    V value[kSelectUnroll];
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      const int column = base + u * kWarp + lane;
      value[u] = column < columns ? tile_row.value(offset, scale, column) : V(0);
    }
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      const int column = base + u * kWarp + lane;
      const bool keep = column < columns && !(value[u] > threshold);
      const unsigned int kept = __ballot_sync(0xffffffffu, keep);
      if (keep) {
        const int slot = pending + __popc(kept & ((1u << lane) - 1u));
        buffer_values[slot] = value[u];
        buffer_columns[slot] = column;
      }
      pending += __popc(kept);
    }
    if (pending > kSelectBuffer - kSelectUnroll * kWarp) {
      insert_buffered(list_values, list_indices, candidates, buffer_values, buffer_columns, pending, p.key_begin);
      threshold = list_values[candidates - 1];
      pending = 0;
    }
  }
  insert_buffered(list_values, list_indices, candidates, buffer_values, buffer_columns, pending, p.key_begin);
  for (int i = lane; i < candidates; i += kWarp) {
    row_values[i] = list_values[i];
    row_indices[i] = list_indices[i];
  }
}

template <typename V, int kMax, bool kCoded>
void launch_select(const SelectParams& p) {
  const int64_t blocks = (p.tile_rows + kSelectWarps - 1) / kSelectWarps;
  launch(select_kernel<V, kMax, kCoded>, static_cast<unsigned int>(blocks), kSelectWarps * kWarp, 0, p);
}

// Calls f(integral_constant<kMax>) for the smallest list size that holds p's candidates.
template <typename F>
void for_list_size(const SelectParams& p, F&& f) {
  if (p.candidates <= 16) {
    f(std::integral_constant<int, 16>{});
  } else if (p.candidates <= 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    static_assert(kMaxCandidates == 64, "update the kernel instantiations");
    f(std::integral_constant<int, 64>{});
  }
}

// The int8 screening codes of a row per warp (see QuantizeParams), kQuantWarps
// rows per block: the row's norm (cosine), its largest magnitude in the ranking
// frame, then its codes and five sums. Each reduction is a butterfly of
// shuffles, which leaves the same bits in every lane (each step adds the same
// two values, in swapped order), so the lanes agree on the norm and the scale.
constexpr int kQuantWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kQuantWarps * kWarp) quantize_kernel(QuantizeParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / kWarp;
  for (int64_t row = first; row < p.num_rows; row += static_cast<int64_t>(gridDim.x) * kQuantWarps) {
    const T* values = static_cast<const T*>(p.rows) + row * p.row_stride;
    double inverse_norm = 1.0;
    if (p.normalize) {
      double squares = 0.0;
      for (int64_t j = lane; j < p.dims; j += kWarp) {
        const double v = static_cast<double>(values[j]);
        squares += v * v;
      }
      const double norm = sqrt(warp_sum(squares));
      inverse_norm = 1.0 / (norm > kNormFloor ? norm : kNormFloor);
    }
    const auto framed = [&](int64_t j) { return static_cast<double>(values[j]) * inverse_norm - p.center[j]; };
    double largest = 0.0;
    for (int64_t j = lane; j < p.dims; j += kWarp) largest = fmax(largest, fabs(framed(j)));
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      largest = fmax(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
    }
    const double scale = largest > 0.0 ? largest / 127.0 : 1.0;
    int8_t* codes = p.codes + row * 2 * p.padded_dims;
    int8_t* high_codes = codes + (p.low_first ? p.padded_dims : 0);
    int8_t* low_codes = codes + (p.low_first ? 0 : p.padded_dims);
    double sums[5] = {0.0, 0.0, 0.0, 0.0, 0.0};  // t.t, coded.coded, e.e, lo.lo, t.center
    for (int64_t j = lane; j < p.padded_dims; j += kWarp) {
      double high = 0.0, low = 0.0;
      if (j < p.dims) {
        const double t = framed(j), scaled = t / scale;
        high = fmin(fmax(rint(scaled), -127.0), 127.0);
        low = fmin(fmax(rint((scaled - high) * 254.0), -127.0), 127.0);
        const double coded = scale * (high + low / 254.0), error = t - coded;
        sums[0] += t * t;
        sums[1] += coded * coded;
        sums[2] += error * error;
        sums[3] += low * low;
        sums[4] += t * p.center[j];
      }
      high_codes[j] = static_cast<int8_t>(high);
      low_codes[j] = static_cast<int8_t>(low);
    }
#pragma unroll
    for (int s = 0; s < 5; ++s) sums[s] = warp_sum(sums[s]);
    if (lane == 0) {
      p.stats[kQuantScale * p.stats_stride + row] = scale;
      p.stats[kQuantNorm * p.stats_stride + row] = sqrt(sums[0]);
      p.stats[kQuantCodedNorm * p.stats_stride + row] = sqrt(sums[1]);
      p.stats[kQuantErrorNorm * p.stats_stride + row] = sqrt(sums[2]);
      p.stats[kQuantLowNorm * p.stats_stride + row] = sqrt(sums[3]);
      p.stats[kQuantCenterDot * p.stats_stride + row] = sums[4];
    }
  }
}

// One warp per (query, candidate): lanes take strided columns, then a
// fixed butterfly reduction (deterministic) of the float64 terms.
template <typename T>
__global__ void recheck_kernel(RecheckParams p) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pair >= p.num_queries * p.candidates) return;
  const int64_t q = pair / p.candidates;
  const T* query = static_cast<const T*>(p.queries) + q * p.query_stride;
  const T* key = static_cast<const T*>(p.keys) + p.indices[pair] * p.key_stride;
  DistanceTerms terms;
  add_distance_terms(query, key, lane, p.dims, kWarp, p.cosine, terms);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    terms.squared_difference += __shfl_xor_sync(0xffffffffu, terms.squared_difference, offset);
    terms.dot += __shfl_xor_sync(0xffffffffu, terms.dot, offset);
    terms.a_squared += __shfl_xor_sync(0xffffffffu, terms.a_squared, offset);
    terms.b_squared += __shfl_xor_sync(0xffffffffu, terms.b_squared, offset);
  }
  if (lane == 0) p.distances[pair] = finish_distance(terms, p.cosine);
}

// One thread per query: its candidates (k + 8 in the tile path) put in order.
__global__ void finish_kernel(FinishParams p) {
  const int64_t q = global_thread();
  if (q >= p.num_queries) return;
  best_of(p.distances + q * p.candidates, p.indices + q * p.candidates, p.candidates, p.k,
          p.best_distances + q * p.k, p.best_indices + q * p.k);
}

}  // namespace

void knn_finish(const FinishParams& p) {
  if (p.num_queries == 0) return;
  launch(finish_kernel, blocks_for(p.num_queries, 64), 64, 0, p);
}

void knn_quantize(const QuantizeParams& p) {
  if (p.num_rows == 0) return;
  dispatch_input_types(p.dtype, [&](auto tag) {
    const int64_t blocks = std::min<int64_t>((p.num_rows + kQuantWarps - 1) / kQuantWarps, 1 << 20);
    launch(quantize_kernel<decltype(tag)>, static_cast<unsigned int>(blocks), kQuantWarps * kWarp, 0, p);
  });
}

void knn_recheck(const RecheckParams& p) {
  const int64_t pairs = p.num_queries * p.candidates;
  if (pairs == 0) return;
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t threads = pairs * kWarp;
    launch(recheck_kernel<T>, static_cast<unsigned int>((threads + kThreads - 1) / kThreads), kThreads, 0, p);
  });
}

void knn_select(const SelectParams& p) {
  if (p.tile_rows == 0 || p.tile_cols == 0) return;
  for_list_size(p, [&](auto list_size) {
    constexpr int kMax = decltype(list_size)::value;
    if (p.cross != nullptr) {
      launch_select<double, kMax, true>(p);  // p.dtype is Double
    } else {
      dispatch_acc_types(p.dtype, [&](auto tag) { launch_select<decltype(tag), kMax, false>(p); });
    }
  });
}

}  // namespace alphanet::cuda
