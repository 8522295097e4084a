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

}  // namespace alphanet::cpu
