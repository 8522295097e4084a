#include <ATen/Parallel.h>

#include "../kernel_params.h"

namespace alphanet::cpu {

// Each thread owns a slab of columns and walks every row in order, so the sum
// of each (class, column) is formed in row order whatever the thread count:
// no atomics, no per-thread copies of the [C, d] sums, bit-reproducible.
void class_sums(const ClassSumsParams& p) {
  constexpr int64_t kColumnGrain = 64;
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(p.x);
    A* sums = static_cast<A*>(p.sums);
    at::parallel_for(0, p.cols, kColumnGrain, [&](int64_t col_begin, int64_t col_end) {
      for (int64_t row = 0; row < p.rows; ++row) {
        const T* x_row = x + row * p.row_stride;
        A* sum_row = sums + p.labels[row] * p.cols;
        for (int64_t col = col_begin; col < col_end; ++col) sum_row[col] += static_cast<A>(x_row[col]);
      }
    });
  });
}

}  // namespace alphanet::cpu
