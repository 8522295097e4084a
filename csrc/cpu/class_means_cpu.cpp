#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../kernel_params.h"

namespace alphanet::cpu {

// A counting sort groups the rows by class (keeping row order within a class);
// tasks then own contiguous class ranges of about equal row counts and add each
// class's rows, whole, into its sum row while that row sits in cache. So x is
// read once, the [C, d] sums are written once, no two tasks share a sum, and
// each (class, column) is summed in row order whatever the thread count: no
// atomics, bit-reproducible, and the same order as the CUDA kernel.
void class_sums(const ClassSumsParams& p) {
  std::vector<int64_t> offsets(p.num_classes + 1, 0);
  for (int64_t row = 0; row < p.rows; ++row) ++offsets[p.labels[row] + 1];
  for (int64_t c = 0; c < p.num_classes; ++c) offsets[c + 1] += offsets[c];
  std::vector<int64_t> sorted_rows(p.rows);
  {
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t row = 0; row < p.rows; ++row) sorted_rows[next[p.labels[row]]++] = row;
  }
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(p.num_classes, 8 * at::get_num_threads()));
  std::vector<int64_t> first_class(tasks + 1, p.num_classes);
  first_class[0] = 0;
  for (int64_t task = 1, c = 0; task < tasks; ++task) {
    while (c < p.num_classes && offsets[c] * tasks < task * p.rows) ++c;
    first_class[task] = c;
  }

  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(p.x);
    A* sums = static_cast<A*>(p.sums);
    const int64_t row_bytes = p.cols * sizeof(T);
    at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      const int64_t r_end = offsets[first_class[task_end]];
      for (int64_t c = first_class[task_begin]; c < first_class[task_end]; ++c) {
        A* sum_row = sums + c * p.cols;
        for (int64_t r = offsets[c]; r < offsets[c + 1]; ++r) {
          if (r + 1 < r_end) {  // the next row is a random jump: fetch it while this one is added
            const char* ahead = reinterpret_cast<const char*>(x + sorted_rows[r + 1] * p.row_stride);
            for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(ahead + b);
          }
          const T* x_row = x + sorted_rows[r] * p.row_stride;
          for (int64_t col = 0; col < p.cols; ++col) sum_row[col] += static_cast<A>(x_row[col]);
        }
      }
    });
  });
}

}  // namespace alphanet::cpu
