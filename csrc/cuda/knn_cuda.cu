#include <algorithm>
#include <limits>

#include "../device_functions.h"
#include "../kernel_params.h"
#include "launch.cuh"

namespace alphanet::cuda {
namespace {

constexpr int kWarp = 32;

// Fused ranking and selection. A block of kFusedThreads threads takes
// kTileQueries queries and walks its split of the keys kTileKeys at a time; a
// thread (row, col) of the 16 x 16 thread grid accumulates the dot products of
// queries row + 16 i and keys col + 16 j (i, j < 4) in registers, over depth
// chunks of kTileDepth staged in shared memory. Values that beat a query's
// current last candidate go to that query's buffer; then thread q < kTileQueries
// inserts its query's buffer into the list it keeps. The order of a buffer
// varies with thread timing, but the k best under `precedes` do not.
constexpr int kTileQueries = 64, kTileKeys = 64, kTileDepth = 16, kFusedThreads = 256;
constexpr int kGridSide = 16, kPerThread = kTileQueries / kGridSide;
static_assert(kGridSide * kGridSide == kFusedThreads && kTileKeys == kTileQueries, "square thread grid");
static_assert(kTileKeys <= 256, "buffered keys are stored as their offset in the tile (one byte)");

template <typename T, int kMax>
__global__ void fused_knn_kernel(FusedKnnParams p) {
  // +1: a warp storing 16 depths x 2 rows hits distinct banks
  __shared__ float query_tile[kTileDepth][kTileQueries + 1];
  __shared__ float key_tile[kTileDepth][kTileKeys + 1];
  __shared__ float buffer_values[kTileQueries][kTileKeys];
  __shared__ unsigned char buffer_keys[kTileQueries][kTileKeys];
  __shared__ int buffer_counts[kTileQueries];
  __shared__ float last_values[kTileQueries];
  __shared__ int64_t last_indices[kTileQueries];

  const T* queries = static_cast<const T*>(p.queries);
  const T* keys = static_cast<const T*>(p.keys);
  const int thread = threadIdx.x, grid_row = thread / kGridSide, grid_col = thread % kGridSide;
  const int64_t query_begin = static_cast<int64_t>(blockIdx.x) * kTileQueries;
  const int64_t key_begin = static_cast<int64_t>(blockIdx.y) * p.keys_per_split;
  const int64_t key_end = std::min(p.num_keys, key_begin + p.keys_per_split);
  const int candidates = p.candidates;

  float list_values[kMax];  // thread q < kTileQueries: query query_begin + q's candidates, best first
  int64_t list_indices[kMax];
  if (thread < kTileQueries) {
    for (int c = 0; c < candidates; ++c) {
      list_values[c] = std::numeric_limits<float>::infinity();
      list_indices[c] = std::numeric_limits<int64_t>::max();
    }
    buffer_counts[thread] = 0;
    last_values[thread] = list_values[candidates - 1];
    last_indices[thread] = list_indices[candidates - 1];
  }
  __syncthreads();

  for (int64_t tile = key_begin; tile < key_end; tile += kTileKeys) {
    float dots[kPerThread][kPerThread] = {};
    for (int64_t depth = 0; depth < p.dims; depth += kTileDepth) {
      for (int e = thread; e < kTileQueries * kTileDepth; e += kFusedThreads) {
        const int r = e / kTileDepth, d = e % kTileDepth;
        const bool in_depth = depth + d < p.dims;
        const int64_t query = query_begin + r, key = tile + r;
        query_tile[d][r] =
            in_depth && query < p.num_queries ? static_cast<float>(queries[query * p.query_stride + depth + d]) : 0.f;
        key_tile[d][r] = in_depth && key < key_end ? static_cast<float>(keys[key * p.key_stride + depth + d]) : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int d = 0; d < kTileDepth; ++d) {
        float a[kPerThread], b[kPerThread];
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
          a[i] = query_tile[d][grid_row + kGridSide * i];
          b[i] = key_tile[d][grid_col + kGridSide * i];
        }
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) dots[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int r = grid_row + kGridSide * i;
      if (query_begin + r >= p.num_queries) continue;
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int offset = grid_col + kGridSide * j;
        const int64_t key = tile + offset;
        if (key >= key_end) continue;
        const float value = p.key_offset[key] + p.key_scale[key] * dots[i][j];
        if (precedes(value, key, last_values[r], last_indices[r])) {
          const int slot = atomicAdd(&buffer_counts[r], 1);
          buffer_values[r][slot] = value;
          buffer_keys[r][slot] = static_cast<unsigned char>(offset);
        }
      }
    }
    __syncthreads();
    if (thread < kTileQueries && buffer_counts[thread] > 0) {
      for (int s = 0; s < buffer_counts[thread]; ++s) {
        topk_insert(list_values, list_indices, candidates, buffer_values[thread][s], tile + buffer_keys[thread][s]);
      }
      buffer_counts[thread] = 0;
      last_values[thread] = list_values[candidates - 1];
      last_indices[thread] = list_indices[candidates - 1];
    }
    __syncthreads();
  }
  if (thread < kTileQueries && query_begin + thread < p.num_queries) {
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

template <int kMax>
void launch_fused(const FusedKnnParams& p) {
  const int64_t splits = (p.num_keys + p.keys_per_split - 1) / p.keys_per_split;
  const dim3 grid(static_cast<unsigned int>((p.num_queries + kTileQueries - 1) / kTileQueries),
                  static_cast<unsigned int>(splits));
  dispatch_input_types(p.dtype, [&](auto tag) { launch(fused_knn_kernel<decltype(tag), kMax>, grid, kFusedThreads, 0, p); });
  launch(merge_splits_kernel<kMax>, blocks_for(p.num_queries), kThreads, 0, p, splits);
}

// One warp per query row: each lane keeps the best candidates of its strided
// share of the tile's columns, the 32 lists are merged pairwise in shared
// memory, and lane 0 merges the result into the row's running list.
template <typename V, int kMax>
__global__ void select_kernel(const V* __restrict__ dots, int64_t tile_cols, const V* __restrict__ offset,
                              const V* __restrict__ scale, int64_t key_begin, V* __restrict__ values,
                              int64_t* __restrict__ indices, int candidates) {
  __shared__ V shared_values[kWarp * kMax];
  __shared__ int64_t shared_indices[kWarp * kMax];
  const int lane = threadIdx.x;
  const int64_t row = blockIdx.x;
  V* my_values = shared_values + lane * kMax;
  int64_t* my_indices = shared_indices + lane * kMax;
  for (int i = 0; i < candidates; ++i) {
    my_values[i] = std::numeric_limits<V>::infinity();
    my_indices[i] = std::numeric_limits<int64_t>::max();
  }
  const V* dot_row = dots + row * tile_cols;
  for (int64_t col = lane; col < tile_cols; col += kWarp) {
    topk_insert(my_values, my_indices, candidates, offset[col] + scale[col] * dot_row[col], key_begin + col);
  }
  __syncwarp();
  V merged_values[kMax];
  int64_t merged_indices[kMax];
  for (int stride = 1; stride < kWarp; stride *= 2) {
    if (lane % (2 * stride) == 0) {
      topk_merge(my_values, my_indices, my_values + stride * kMax, my_indices + stride * kMax, candidates,
                 merged_values, merged_indices);
      for (int i = 0; i < candidates; ++i) {
        my_values[i] = merged_values[i];
        my_indices[i] = merged_indices[i];
      }
    }
    __syncwarp();
  }
  if (lane == 0) {
    V* row_values = values + row * candidates;
    int64_t* row_indices = indices + row * candidates;
    topk_merge(row_values, row_indices, my_values, my_indices, candidates, merged_values, merged_indices);
    for (int i = 0; i < candidates; ++i) {
      row_values[i] = merged_values[i];
      row_indices[i] = merged_indices[i];
    }
  }
}

template <typename V, int kMax>
void launch_select(const SelectParams& p) {
  launch(select_kernel<V, kMax>, static_cast<unsigned int>(p.tile_rows), kWarp, 0, static_cast<const V*>(p.dots),
         p.tile_cols, static_cast<const V*>(p.key_offset), static_cast<const V*>(p.key_scale), p.key_begin,
         static_cast<V*>(p.values), p.indices, p.candidates);
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

}  // namespace

void knn_recheck(const RecheckParams& p) {
  const int64_t pairs = p.num_queries * p.candidates;
  if (pairs == 0) return;
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t threads = pairs * kWarp;
    launch(recheck_kernel<T>, static_cast<unsigned int>((threads + kThreads - 1) / kThreads), kThreads, 0, p);
  });
}

int64_t knn_fused_keys_per_split(int64_t num_queries, int64_t num_keys) {
  const int64_t query_tiles = (num_queries + kTileQueries - 1) / kTileQueries;
  const int64_t key_tiles = (num_keys + kTileKeys - 1) / kTileKeys;
  const int64_t wanted = (4 * static_cast<int64_t>(multiprocessors()) + query_tiles - 1) / query_tiles;
  const int64_t splits = std::max<int64_t>(1, std::min({wanted, key_tiles, int64_t{65535}}));
  return (key_tiles + splits - 1) / splits * kTileKeys;
}

void knn_fused(const FusedKnnParams& p) {
  if (p.num_queries == 0 || p.num_keys == 0) return;
  if (p.candidates <= 16) {
    launch_fused<16>(p);
  } else if (p.candidates <= 32) {
    launch_fused<32>(p);
  } else {
    launch_fused<64>(p);
  }
}

void knn_select(const SelectParams& p) {
  if (p.tile_rows == 0 || p.tile_cols == 0) return;
  dispatch_acc_types(p.dtype, [&](auto tag) {
    using V = decltype(tag);
    if (p.candidates <= 16) {
      launch_select<V, 16>(p);
    } else if (p.candidates <= 32) {
      launch_select<V, 32>(p);
    } else {
      static_assert(kMaxCandidates == 64, "update the kernel instantiations");
      launch_select<V, 64>(p);
    }
  });
}

}  // namespace alphanet::cuda
