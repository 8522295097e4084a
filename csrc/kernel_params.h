// Raw-pointer interface between the device-generic op drivers (csrc/<op>.cpp,
// which validate and allocate with ATen) and the per-backend kernels
// (csrc/cpu/*.cpp, csrc/cuda/*.cu). Keeping ATen out of this header keeps the
// .cu files light to compile.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "device_functions.h"

namespace alphanet {

enum class DType { Half, BFloat16, Float, Double };

// float accumulation for 16/32-bit inputs, double for double.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename F>
void dispatch_input_types(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Half: f(c10::Half{}); break;
    case DType::BFloat16: f(c10::BFloat16{}); break;
    case DType::Float: f(float{}); break;
    case DType::Double: f(double{}); break;
  }
}

template <typename F>
void dispatch_acc_types(DType dtype, F&& f) {
  if (dtype == DType::Double) f(double{}); else f(float{});
}

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

// knn: fold one tile of query-key dot products into every query's running
// candidate list. A candidate's ranking value is offset[j] + scale[j] * dot.
struct SelectParams {
  DType dtype;                       // Float or Double: the dtype of the ranking values (and of dots, unless cross)
  const void* dots;                  // [tile_rows, dots_stride]
  int64_t tile_rows, tile_cols;      // tile_cols < 2^31 (the CUDA kernel counts columns in int)
  int64_t dots_stride;               // >= tile_cols
  const void* key_offset;            // [tile_cols]
  const void* key_scale;             // [tile_cols]
  // CUDA only, int8 screening (Double): dots and cross are int32 products of
  // quantised rows (hi.hi and hi.lo + lo.hi, see QuantizeParams) and the
  // ranking value is offset[j] + scale[j] * row_scale[row] * (254 dots + cross).
  const int32_t* cross;              // nullptr: dots are ranking dot products
  const double* row_scale;           // [tile_rows]
  int64_t key_begin;                 // global key index of tile column 0
  void* values;                      // [tile_rows, candidates], sorted per row
  int64_t* indices;                  // [tile_rows, candidates]
  int candidates;                    // at most kMaxCandidates
  bool first_tile;                   // the lists start empty: values and indices are not read
};
constexpr int kMaxCandidates = 64;

// knn on CUDA, int8 screening. A row v is first moved to the frame where the
// ranking is done: t = v / max(|v|, 1e-12) - center for cosine, v - center for
// euclidean (center: about the keys' mean, so the codes spend their bits on
// what tells rows apart, not on a common offset). Then t = s (hi + lo / 254) + e
// with s = max|t| / 127 and hi, lo int8 (s = 1 for a zero row): products of
// codes in int32 (tensor cores) give dot products to about 1e-4 of |t_q| |t_k|,
// with a proven bound. A row of codes is [hi | lo] (queries) or [lo | hi]
// (keys), each half padded_dims long (zeros past dims).
// Per row: s, |t|, |s (hi + lo / 254)|, |e|, |lo| and t . center.
enum QuantStat { kQuantScale, kQuantNorm, kQuantCodedNorm, kQuantErrorNorm, kQuantLowNorm, kQuantCenterDot };
constexpr int kQuantStats = 6;
constexpr int64_t kMaxQuantDims = 65536;  // padded_dims: keeps 2 * 127^2 * padded_dims within int32
struct QuantizeParams {
  DType dtype;                 // of rows (unit column stride)
  const void* rows;
  int64_t row_stride, num_rows, dims, padded_dims;
  bool normalize;              // cosine: rows scaled to unit norm before centering
  const double* center;        // [dims]
  bool low_first;              // keys' layout
  int8_t* codes;               // [num_rows, 2 * padded_dims], contiguous
  double* stats;               // stats[stat * stats_stride + row]
  int64_t stats_stride;
};

// knn: exact float64 distance from every query to each of its candidate keys.
struct RecheckParams {
  DType dtype;                 // of queries and keys (unit column stride)
  const void* queries;
  const void* keys;
  int64_t query_stride, key_stride, dims;
  const int64_t* indices;      // [num_queries, candidates]
  int64_t num_queries, candidates;
  bool cosine;
  double* distances;           // [num_queries, candidates]
};

// knn: each query's k best candidates by (exact distance, key index), best first.
struct FinishParams {
  const double* distances;     // [num_queries, candidates], from the recheck
  const int64_t* indices;      // [num_queries, candidates]
  int64_t num_queries, candidates, k;  // k <= candidates
  double* best_distances;      // [num_queries, k]
  int64_t* best_indices;       // [num_queries, k]
};

// knn, whole on the CPU: int16 screening with a proven error bound, then the
// float64 recheck of every key the bound cannot rule out.
struct ScreenedKnnParams {
  DType dtype;                 // of queries and keys (unit column stride)
  const void* queries;
  const void* keys;
  int64_t query_stride, key_stride, num_queries, num_keys, dims;
  int64_t k;                   // in [1, num_keys]
  bool cosine;
  const double* center;        // [dims]: the ranking frame's origin (rows are unit-normalised first for cosine)
  void* distances;             // [num_queries, k] of acc_t, contiguous
  int64_t* indices;            // [num_queries, k], contiguous
};

// _coefficient_grads on the CPU: products with the coefficient networks' input,
// packed once per fit as panels [num_panels, padded_dims, kInputPanel] of its
// columns (panel p, row d, slot j holds inputs_t[d, p * kInputPanel + j]; zeros
// past dims and num_few). Float32; `columns` a multiple of 16.
constexpr int kInputPanel = 6;
struct InputProductParams {
  const float* panels;
  int64_t num_panels, padded_dims, dims, num_few;
  const float* right;   // forward: [dims, columns]; backward: [num_few, columns]; contiguous
  int64_t columns;
  float* out;           // forward: [num_panels * kInputPanel, columns]; backward: [padded_dims, columns]
};

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
void class_sums(const ClassSumsParams& p);
void knn_select(const SelectParams& p);
void knn_recheck(const RecheckParams& p);
void knn_finish(const FinishParams& p);
bool knn_screening_supported();
void knn_screened(const ScreenedKnnParams& p);
int64_t knn_screened_candidates();
void alpha_combine(const CombineParams& p);
void alpha_combine_backward(const CombineBackwardParams& p);
void alpha_combine_checks(const CombineCheckParams& p);
bool input_products_supported();
void input_product_forward(const InputProductParams& p);   // out = inputs_t^T @ right
void input_product_backward(const InputProductParams& p);  // out = inputs_t @ right
}  // namespace cpu

namespace cuda {
void class_sums(const ClassSumsParams& p);
void sort_labels(const LabelSortParams& p);
void class_segments(const ClassSegmentsParams& p);
void knn_quantize(const QuantizeParams& p);
void knn_select(const SelectParams& p);
void knn_recheck(const RecheckParams& p);
void knn_finish(const FinishParams& p);
void alpha_combine(const CombineParams& p);
void alpha_combine_backward(const CombineBackwardParams& p);
void alpha_combine_checks(const CombineCheckParams& p);
}  // namespace cuda

// The CPU build's CUDA emulator (csrc/emulation), a test facility: while it is
// on, ops on CPU tensors run the CUDA kernels and the CUDA code paths.
namespace emulation {
bool enabled();
void configure(bool on, uint64_t schedule_seed);  // seed 0: threads run in order
}  // namespace emulation

}  // namespace alphanet
