// class_means: the parameter structs its op driver (csrc/class_means.cpp) fills and its
// backends' kernels read, and those kernels' entry points. Free of ATen, so the
// .cu files stay light to compile.
#pragma once

#include "kernel_common.h"

namespace alphanet {

// sums[labels[i], :] += x[i, :] for every row i (x has unit column stride).
struct ClassSumsParams {
  DType dtype;
  const void* x;
  int64_t rows, cols, row_stride;
  const int64_t* labels;           // [rows], each in [0, num_classes)
  const int64_t* sorted_rows;      // CUDA only: row ids stably sorted by label
  const int64_t* segment_offsets;  // CUDA only: [num_classes + 1] offsets into sorted_rows
  int64_t num_classes;
  void* sums;                      // [num_classes, cols] of acc_t, contiguous
  // CUDA only: write each sum divided by its count (0 for an empty class) over
  // sums, rather than add to them; then also write `counts` and set *nonfinite
  // to 1 if a mean is NaN or inf.
  bool means;
  int64_t* counts;                 // [num_classes]
  double* nonfinite;
};

// The CUDA class means' rows in stable label order, by a radix sort of the
// keys label + 1, clamped to [0, num_classes + 1] (so a label out of range
// still sorts to an end, where the range check looks). With size_query, only
// *scratch_bytes is written: the scratch the sort needs.
struct LabelSortParams {
  const int64_t* labels;    // [rows]
  int64_t rows, num_classes;
  uint32_t* keys;           // [2 * rows]: the keys, then the sorted keys
  int64_t* row_ids;         // [2 * rows]: 0 .. rows - 1, then the rows in stable label order
  void* scratch;
  size_t* scratch_bytes;
  bool size_query;
};

// The CUDA class means' segments: from the sorted keys of LabelSortParams,
// segment_offsets[c] = the number of labels below c, for c in [0, num_classes];
// and label_ends[0], label_ends[1] = the lowest and highest label (clamped to
// [-1, num_classes]), label_ends[2] = 0.
struct ClassSegmentsParams {
  const uint32_t* sorted_keys;  // [rows], rows >= 1
  int64_t rows, num_classes;
  int64_t* segment_offsets;     // [num_classes + 1]
  double* label_ends;           // [3]
};

namespace cpu {
void class_sums(const ClassSumsParams& p);
}  // namespace cpu

namespace cuda {
void class_sums(const ClassSumsParams& p);
void sort_labels(const LabelSortParams& p);
void class_segments(const ClassSegmentsParams& p);
}  // namespace cuda

}  // namespace alphanet
