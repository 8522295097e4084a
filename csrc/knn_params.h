// knn: the parameter structs its op driver (csrc/knn.cpp) fills and its
// backends' kernels read, and those kernels' entry points. Free of ATen, so the
// .cu files stay light to compile.
#pragma once

#include "kernel_common.h"

namespace alphanet {

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

namespace cpu {
void knn_select(const SelectParams& p);
void knn_recheck(const RecheckParams& p);
void knn_finish(const FinishParams& p);
bool knn_screening_supported();
void knn_screened(const ScreenedKnnParams& p);
int64_t knn_screened_candidates();
}  // namespace cpu

namespace cuda {
void knn_quantize(const QuantizeParams& p);
void knn_select(const SelectParams& p);
void knn_recheck(const RecheckParams& p);
void knn_finish(const FinishParams& p);
}  // namespace cuda

}  // namespace alphanet
