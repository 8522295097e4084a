// alpha_combine: the parameter structs its op driver (csrc/alpha_combine.cpp) fills and its
// backends' kernels read, and those kernels' entry points. Free of ATen, so the
// .cu files stay light to compile.
#pragma once

#include "kernel_common.h"

namespace alphanet {

// out(c, j) = source(t_c, j) + sum_i alphas[c, i] / ||alphas[c]||_1 * source(n_ci, j)
// where source(line, j) = source[line * line_stride + j * elem_stride].
struct CombineParams {
  DType dtype;                 // of source and out
  const void* source;
  int64_t line_stride, elem_stride, num_lines, elems;
  const int64_t* targets;      // [num_out]
  const int64_t* neighbors;    // [num_out, k], contiguous
  const void* alphas;          // [num_out, k] of acc_t, contiguous
  int64_t num_out, k;
  void* out;
  int64_t out_line_stride, out_elem_stride;
  // CUDA only, where the output's lines are contiguous (logit columns): each
  // class's lines and normalised coefficients, written by a first kernel slot
  // by slot, so that a warp's 32 classes read 32 consecutive values in every
  // pass over the logit rows instead of 32 strided rows of neighbors and alphas.
  int32_t* column_lines = nullptr;  // [k + 1, num_out]: the target, then the neighbours; num_lines outside the source
  void* column_weights = nullptr;   // [k, num_out] of acc_t: alphas[c, i] / ||alphas[c]||_1
};

// alpha_combine's value checks through the CUDA kernels (combine's indices and
// coefficients; one pass, one device sync). The Python wrapper runs them before
// a call; the op itself does not, as training loops call it every step.
struct CombineCheckParams {
  CombineParams combine;
  CombineValueSummary* summary;  // one, in the combine's memory
};

// The CUDA kernel of grad_alphas holds a class's k gradients in shared memory.
constexpr int64_t kMaxCudaGradNeighbors = 4096;

struct CombineBackwardParams {
  CombineParams forward;       // out unused
  const void* grad_out;        // same layout as forward.out
  void* grad_alphas;           // [num_out, k] of acc_t, contiguous
  void* grad_source;           // nullptr if not needed; acc_t, laid out like source but contiguous
  int64_t grad_line_stride, grad_elem_stride;
  // CUDA only, for a deterministic gather instead of scattered atomics: for each
  // source line, the (c * (k + 1) + slot) entries that read it, slot 0 the target.
  const int64_t* line_offsets;  // [num_lines + 1]
  const int64_t* line_entries;  // [num_out * (k + 1)]
  // CUDA only, for grad_alphas when the output's lines are contiguous (logit
  // columns): each class's k dot products summed over chunks of the elements
  // first, then over the chunks in order. nullptr: one block per class instead.
  void* alpha_partials;         // [alpha_chunks, k, num_out] of acc_t
  int64_t alpha_chunks;
};

// Chunks of the elements for alpha_partials: a kTargetAlphaChunks-th of them
// each, within [kMinAlphaChunkElems, kAlphaChunkElems] elements (so a training
// batch's 256 logit rows make 16 chunks, not 4, and its blocks fill a GPU);
// at most kMaxAlphaChunks of them. At most 32 elements a chunk, because a
// chunk of iNaturalist's 8,142-wide logit rows is one block: 24,426 rows in
// chunks of 64 made 382 blocks for the 264 a 132-multiprocessor card runs at
// once, which left most of it idle for the second wave; chunks of 32 make 764.
constexpr int64_t kAlphaChunkElems = 32, kMinAlphaChunkElems = 16, kTargetAlphaChunks = 64, kMaxAlphaChunks = 1024;

namespace cpu {
void alpha_combine(const CombineParams& p);
void alpha_combine_backward(const CombineBackwardParams& p);
void alpha_combine_checks(const CombineCheckParams& p);
}  // namespace cpu

namespace cuda {
void alpha_combine(const CombineParams& p);
void alpha_combine_backward(const CombineBackwardParams& p);
void alpha_combine_checks(const CombineCheckParams& p);
}  // namespace cuda

}  // namespace alphanet
