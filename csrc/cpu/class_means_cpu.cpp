#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../class_means_params.h"
#include "../device_functions.h"
#include "row_loops.h"

namespace alphanet::cpu {

// A counting sort groups the rows by class (keeping row order within a class);
// tasks then own contiguous class ranges of about equal row counts and add each
// class's rows into its sum row while that row sits in cache, four rows at a
// time (segment_sum's order). So x is read once, the [C, d] sums are written
// once, no two tasks share a sum, and the summation order does not depend on
// the thread count: no atomics, bit-reproducible, the same as the CUDA kernel.
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
    at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t c = first_class[task_begin]; c < first_class[task_end]; ++c) {
        A* sum_row = sums + c * p.cols;
        int64_t r = offsets[c];
        for (; r + kSumGroup <= offsets[c + 1]; r += kSumGroup) {
          const T* a = x + sorted_rows[r] * p.row_stride;
          const T* b = x + sorted_rows[r + 1] * p.row_stride;
          const T* c2 = x + sorted_rows[r + 2] * p.row_stride;
          const T* d = x + sorted_rows[r + 3] * p.row_stride;
          add_four_rows(sum_row, a, b, c2, d, p.cols);
        }
        for (; r < offsets[c + 1]; ++r) add_row(sum_row, x + sorted_rows[r] * p.row_stride, p.cols);
      }
    });
  });
}

}  // namespace alphanet::cpu
