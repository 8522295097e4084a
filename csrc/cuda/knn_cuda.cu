#include <algorithm>
#include <limits>
#include <type_traits>

#include "../device_functions.h"
#include "../kernel_params.h"
#include "launch.cuh"

namespace alphanet::cuda {
namespace {

constexpr int kWarp = 32;

// Fused ranking and selection. A block of kFusedThreads threads takes kTile
// queries and walks its split of the keys kTile at a time. Thread (row, col) of
// the 16 x 16 thread grid accumulates, in registers, the 8 x 8 dot products of
// queries {4 row + i, kTile / 2 + 4 row + i} and keys {4 col + j, kTile / 2 + 4 col + j}
// (i, j < 4), over depth chunks of kTileDepth staged in shared memory (the next
// chunk's loads are in flight while the current one is used). Values that beat
// a query's current last candidate go to that query's buffer of kBuffer slots;
// thread q < kTile then inserts its query's buffer into the list it keeps, in
// rounds until every value of the tile has been offered. The order of a buffer
// varies with thread timing, but the k best under `precedes` do not.
constexpr int kTile = 128, kTileDepth = 8, kFusedThreads = 256, kGridSide = 16, kPerThread = 8, kBuffer = 32;
constexpr int kHalfTile = kTile / 2, kQuarter = kPerThread / 2;
constexpr int kLoads = kTile * kTileDepth / kFusedThreads;  // elements of each tile one thread stages
static_assert(kGridSide * kGridSide == kFusedThreads && kGridSide * kPerThread == kTile, "thread grid covers the tile");
static_assert(kTile <= 256, "buffered keys are stored as their offset in the tile (one byte)");
static_assert(kTile * kTileDepth % kFusedThreads == 0, "every thread stages the same number of elements");

// Rows of the staged tiles are padded by 4 floats: stores of a warp (4 rows x 8
// depths) then hit distinct banks, and rows stay 16-byte aligned for float4 reads.
constexpr int kStagedRow = kTile + 4;

template <typename T>
__device__ __forceinline__ void stage_loads(const T* rows, int64_t stride, int64_t first_row, int64_t row_end,
                                            int64_t depth, int64_t dims, float (&staged)[kLoads]) {
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int e = threadIdx.x + u * kFusedThreads, r = e / kTileDepth, d = e % kTileDepth;
    const int64_t row = first_row + r;
    staged[u] = row < row_end && depth + d < dims ? static_cast<float>(rows[row * stride + depth + d]) : 0.f;
  }
}

__device__ __forceinline__ void stage_stores(const float (&staged)[kLoads], float (*tile)[kStagedRow]) {
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int e = threadIdx.x + u * kFusedThreads;
    tile[e % kTileDepth][e / kTileDepth] = staged[u];
  }
}

__device__ __forceinline__ void unpack(float4 v, float* out) {
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}

// Row or column `i` (< kPerThread) of this thread's 8 x 8 block, as a tile offset.
__device__ __forceinline__ int tile_offset(int grid_index, int i) {
  return (i < kQuarter ? 0 : kHalfTile - kQuarter) + kQuarter * grid_index + i;
}

template <typename T, int kMax>
__global__ void __launch_bounds__(kFusedThreads, 2) fused_knn_kernel(FusedKnnParams p) {
  __shared__ __align__(16) float query_tile[kTileDepth][kStagedRow];
  __shared__ __align__(16) float key_tile[kTileDepth][kStagedRow];
  __shared__ float buffer_values[kTile][kBuffer];
  __shared__ unsigned char buffer_keys[kTile][kBuffer];
  __shared__ int buffer_counts[kTile];
  __shared__ float last_values[kTile];
  __shared__ int64_t last_indices[kTile];

  const T* queries = static_cast<const T*>(p.queries);
  const T* keys = static_cast<const T*>(p.keys);
  const int thread = threadIdx.x, grid_row = thread / kGridSide, grid_col = thread % kGridSide;
  const int64_t query_begin = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t key_begin = static_cast<int64_t>(blockIdx.y) * p.keys_per_split;
  const int64_t key_end = std::min(p.num_keys, key_begin + p.keys_per_split);
  const int candidates = p.candidates;

  float list_values[kMax];  // thread q < kTile: query query_begin + q's candidates, best first
  int64_t list_indices[kMax];
  if (thread < kTile) {
    for (int c = 0; c < candidates; ++c) {
      list_values[c] = std::numeric_limits<float>::infinity();
      list_indices[c] = std::numeric_limits<int64_t>::max();
    }
    buffer_counts[thread] = 0;
    last_values[thread] = list_values[candidates - 1];
    last_indices[thread] = list_indices[candidates - 1];
  }

  for (int64_t tile = key_begin; tile < key_end; tile += kTile) {
    float dots[kPerThread][kPerThread] = {};
    float staged_queries[kLoads], staged_keys[kLoads];
    stage_loads(queries, p.query_stride, query_begin, p.num_queries, 0, p.dims, staged_queries);
    stage_loads(keys, p.key_stride, tile, key_end, 0, p.dims, staged_keys);
    stage_stores(staged_queries, query_tile);
    stage_stores(staged_keys, key_tile);
    __syncthreads();
    for (int64_t depth = 0; depth < p.dims; depth += kTileDepth) {
      const bool more = depth + kTileDepth < p.dims;
      if (more) {
        stage_loads(queries, p.query_stride, query_begin, p.num_queries, depth + kTileDepth, p.dims, staged_queries);
        stage_loads(keys, p.key_stride, tile, key_end, depth + kTileDepth, p.dims, staged_keys);
      }
      // Not unrolled, and at most 128 registers (2 blocks per multiprocessor):
      // unrolled, ptxas hoisted the shared loads of every step and took 183.
#pragma unroll 1
      for (int d = 0; d < kTileDepth; ++d) {
        float a[kPerThread], b[kPerThread];
        const float4* query_row = reinterpret_cast<const float4*>(query_tile[d]);
        const float4* key_row = reinterpret_cast<const float4*>(key_tile[d]);
        unpack(query_row[grid_row], a);
        unpack(query_row[kHalfTile / kQuarter + grid_row], a + kQuarter);
        unpack(key_row[grid_col], b);
        unpack(key_row[kHalfTile / kQuarter + grid_col], b + kQuarter);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) dots[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();
      if (more) {
        stage_stores(staged_queries, query_tile);
        stage_stores(staged_keys, key_tile);
        __syncthreads();
      }
    }

    // Offer every value to its query's buffer, flushing full buffers in rounds.
    uint64_t pending = 0;  // bit i * kPerThread + j: dots[i][j] not yet offered
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const bool inside = query_begin + tile_offset(grid_row, i) < p.num_queries && tile + tile_offset(grid_col, j) < key_end;
        if (inside) pending |= uint64_t{1} << (i * kPerThread + j);
      }
    }
    for (;;) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int r = tile_offset(grid_row, i);
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          const uint64_t bit = uint64_t{1} << (i * kPerThread + j);
          if (!(pending & bit)) continue;
          const int offset = tile_offset(grid_col, j);
          const int64_t key = tile + offset;
          const float value = p.key_offset[key] + p.key_scale[key] * dots[i][j];
          if (!precedes(value, key, last_values[r], last_indices[r])) {
            pending &= ~bit;
            continue;
          }
          const int slot = atomicAdd(&buffer_counts[r], 1);
          if (slot < kBuffer) {
            buffer_values[r][slot] = value;
            buffer_keys[r][slot] = static_cast<unsigned char>(offset);
            pending &= ~bit;
          }
        }
      }
      const bool again = __syncthreads_or(pending != 0);
      if (thread < kTile && buffer_counts[thread] > 0) {
        const int count = buffer_counts[thread] < kBuffer ? buffer_counts[thread] : kBuffer;
        for (int s = 0; s < count; ++s) {
          topk_insert(list_values, list_indices, candidates, buffer_values[thread][s], tile + buffer_keys[thread][s]);
        }
        buffer_counts[thread] = 0;
        last_values[thread] = list_values[candidates - 1];
        last_indices[thread] = list_indices[candidates - 1];
      }
      __syncthreads();
      if (!again) break;
    }
  }
  if (thread < kTile && query_begin + thread < p.num_queries) {
    const int64_t at = (static_cast<int64_t>(blockIdx.y) * p.num_queries + query_begin + thread) * candidates;
    for (int c = 0; c < candidates; ++c) {
      p.split_values[at + c] = list_values[c];
      p.split_indices[at + c] = list_indices[c];
    }
  }
}

// One thread per query: the best candidates over every split's list.
template <int kMax>
__global__ void merge_splits_kernel(FusedKnnParams p, int64_t splits) {
  const int64_t query = global_thread();
  if (query >= p.num_queries) return;
  const int candidates = p.candidates;
  float best_values[kMax], merged_values[kMax];
  int64_t best_indices[kMax], merged_indices[kMax];
  for (int c = 0; c < candidates; ++c) {
    best_values[c] = p.split_values[query * candidates + c];
    best_indices[c] = p.split_indices[query * candidates + c];
  }
  for (int64_t s = 1; s < splits; ++s) {
    const int64_t at = (s * p.num_queries + query) * candidates;
    topk_merge(best_values, best_indices, p.split_values + at, p.split_indices + at, candidates, merged_values,
               merged_indices);
    for (int c = 0; c < candidates; ++c) {
      best_values[c] = merged_values[c];
      best_indices[c] = merged_indices[c];
    }
  }
  for (int c = 0; c < candidates; ++c) p.indices[query * candidates + c] = best_indices[c];
}

// Calls f(fused kernel, merge kernel), instantiated for p's dtype and candidates.
template <typename F>
void with_fused_kernels(const FusedKnnParams& p, F&& f) {
  const auto for_max = [&](auto max_tag) {
    constexpr int kMax = decltype(max_tag)::value;
    dispatch_input_types(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, double>) f(fused_knn_kernel<T, kMax>, merge_splits_kernel<kMax>);
    });
  };
  if (p.candidates <= 16) {
    for_max(std::integral_constant<int, 16>{});
  } else if (p.candidates <= 32) {
    for_max(std::integral_constant<int, 32>{});
  } else {
    static_assert(kMaxCandidates == 64, "update the kernel instantiations");
    for_max(std::integral_constant<int, 64>{});
  }
}

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
// rows per block: the row's largest magnitude, then its codes and four sums of
// squares, each reduced by a butterfly of shuffles (lane 0's order is fixed,
// so the sums are deterministic; the maximum is the same in every lane).
constexpr int kQuantWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kQuantWarps * kWarp) quantize_kernel(QuantizeParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / kWarp;
  for (int64_t row = first; row < p.num_rows; row += static_cast<int64_t>(gridDim.x) * kQuantWarps) {
    const T* values = static_cast<const T*>(p.rows) + row * p.row_stride;
    double largest = 0.0;
    for (int64_t j = lane; j < p.dims; j += kWarp) largest = fmax(largest, fabs(static_cast<double>(values[j])));
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      largest = fmax(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
    }
    const double scale = largest > 0.0 ? largest / 127.0 : 1.0;
    int8_t* codes = p.codes + row * 2 * p.padded_dims;
    int8_t* high_codes = codes + (p.low_first ? p.padded_dims : 0);
    int8_t* low_codes = codes + (p.low_first ? 0 : p.padded_dims);
    double sums[4] = {0.0, 0.0, 0.0, 0.0};  // squares of v, s (hi + lo / 254), e and lo
    for (int64_t j = lane; j < p.padded_dims; j += kWarp) {
      double high = 0.0, low = 0.0;
      if (j < p.dims) {
        const double v = static_cast<double>(values[j]), scaled = v / scale;
        high = fmin(fmax(rint(scaled), -127.0), 127.0);
        low = fmin(fmax(rint((scaled - high) * 254.0), -127.0), 127.0);
        const double coded = scale * (high + low / 254.0), error = v - coded;
        sums[0] += v * v;
        sums[1] += coded * coded;
        sums[2] += error * error;
        sums[3] += low * low;
      }
      high_codes[j] = static_cast<int8_t>(high);
      low_codes[j] = static_cast<int8_t>(low);
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int s = 0; s < 4; ++s) sums[s] += __shfl_xor_sync(0xffffffffu, sums[s], offset);
    }
    if (lane == 0) {
      p.stats[kQuantScale * p.stats_stride + row] = scale;
      p.stats[kQuantNorm * p.stats_stride + row] = sqrt(sums[0]);
      p.stats[kQuantCodedNorm * p.stats_stride + row] = sqrt(sums[1]);
      p.stats[kQuantErrorNorm * p.stats_stride + row] = sqrt(sums[2]);
      p.stats[kQuantLowNorm * p.stats_stride + row] = sqrt(sums[3]);
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

int64_t knn_fused_keys_per_split(const FusedKnnParams& p) {
  int blocks_per_multiprocessor = 1;
  with_fused_kernels(p, [&](auto fused, auto) { blocks_per_multiprocessor = resident_blocks(fused, kFusedThreads); });
  const int64_t resident = static_cast<int64_t>(multiprocessors()) * std::max(1, blocks_per_multiprocessor);
  const int64_t query_tiles = (p.num_queries + kTile - 1) / kTile;
  const int64_t key_tiles = (p.num_keys + kTile - 1) / kTile;
  // Run time goes as (waves of resident blocks) x (key tiles per block): take
  // the split size that minimises it, the largest on ties (fewest splits).
  int64_t best_tiles = key_tiles, best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t tiles = key_tiles; tiles >= 1; --tiles) {
    const int64_t splits = (key_tiles + tiles - 1) / tiles;
    if (splits > 65535) break;
    const int64_t cost = (query_tiles * splits + resident - 1) / resident * tiles;
    if (cost < best_cost) {
      best_cost = cost;
      best_tiles = tiles;
    }
  }
  return best_tiles * kTile;
}

void knn_fused(const FusedKnnParams& p) {
  if (p.num_queries == 0 || p.num_keys == 0) return;
  const int64_t splits = (p.num_keys + p.keys_per_split - 1) / p.keys_per_split;
  const dim3 grid(static_cast<unsigned int>((p.num_queries + kTile - 1) / kTile), static_cast<unsigned int>(splits));
  with_fused_kernels(p, [&](auto fused, auto merge) {
    launch(fused, grid, kFusedThreads, 0, p);
    launch(merge, blocks_for(p.num_queries), kThreads, 0, p, splits);
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
