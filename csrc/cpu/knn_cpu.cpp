#include <ATen/Parallel.h>

#include "../device_functions.h"
#include "../kernel_params.h"

namespace alphanet::cpu {

void knn_select(const SelectParams& p) {
  dispatch_acc_types(p.dtype, [&](auto tag) {
    using V = decltype(tag);
    const V* dots = static_cast<const V*>(p.dots);
    const V* offset = static_cast<const V*>(p.key_offset);
    const V* scale = static_cast<const V*>(p.key_scale);
    V* values = static_cast<V*>(p.values);
    at::parallel_for(0, p.tile_rows, 8, [&](int64_t row_begin, int64_t row_end) {
      for (int64_t row = row_begin; row < row_end; ++row) {
        const V* dot_row = dots + row * p.tile_cols;
        V* row_values = values + row * p.candidates;
        int64_t* row_indices = p.indices + row * p.candidates;
        for (int64_t col = 0; col < p.tile_cols; ++col) {
          topk_insert(row_values, row_indices, p.candidates, offset[col] + scale[col] * dot_row[col],
                      p.key_begin + col);
        }
      }
    });
  });
}

void knn_recheck(const RecheckParams& p) {
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* queries = static_cast<const T*>(p.queries);
    const T* keys = static_cast<const T*>(p.keys);
    at::parallel_for(0, p.num_queries, 4, [&](int64_t query_begin, int64_t query_end) {
      for (int64_t q = query_begin; q < query_end; ++q) {
        for (int64_t c = 0; c < p.candidates; ++c) {
          DistanceTerms terms;
          add_distance_terms(queries + q * p.query_stride, keys + p.indices[q * p.candidates + c] * p.key_stride, 0,
                             p.dims, 1, p.cosine, terms);
          p.distances[q * p.candidates + c] = finish_distance(terms, p.cosine);
        }
      }
    });
  });
}

}  // namespace alphanet::cpu
