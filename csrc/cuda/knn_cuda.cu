#include <limits>

#include "../device_functions.h"
#include "../kernel_params.h"
#include "launch.cuh"

namespace alphanet::cuda {
namespace {

constexpr int kWarp = 32;

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
