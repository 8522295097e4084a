// The kNN op's ranking strategies (csrc/knn/), shared by its dispatch (csrc/knn.cpp).
//
// Every strategy returns the exact float64 top-k, ties to the lower key index:
// each ranks the keys cheaply, keeps candidates, and rechecks them in float64.
//   matmul_ranking.cpp   float matmul tiles + select kernel, then the recheck
//                        (any backend; the fallback of the others)
//   int16_screening.cpp  the CPU's int16 screening with a proven bound (its
//                        kernel and proof: cpu/knn_cpu.cpp)
//   int8_screening.cpp   CUDA's int8 screening with a bound proven per query
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

#include "../knn_params.h"
#include "../op_utils.h"

namespace alphanet::knn {

constexpr const char* kOp = "knn";
// Extra candidates kept from the fast (matmul-expanded) ranking so the exact
// float64 recheck of the final list can repair rounding-level misorderings.
constexpr int64_t kExtraCandidates = 8;

at::Tensor unit_rows(const at::Tensor& rows);

// The origin of the screenings' ranking frame, [dims] float64: the keys' mean
// (of the unit rows, for cosine). Any origin keeps the result exact; this one
// keeps the bound tight where the rows share a large offset, as post-ReLU
// features and their class means do.
at::Tensor frame_center(const at::Tensor& keys, bool cosine);

// The fields the kernels' parameter structs share; q and x have unit column stride.
template <typename Params>
void set_rows(Params& params, const at::Tensor& q, const at::Tensor& x) {
  params.dtype = kernel_dtype(q.scalar_type());
  params.queries = q.data_ptr();
  params.keys = x.data_ptr();
  params.query_stride = q.stride(0);
  params.key_stride = x.stride(0);
  params.dims = q.size(1);
}

// ---- matmul_ranking.cpp
// Ranking value per (query, key): offset[key] + scale[key] * <query, key>,
// which orders keys like the true distance for a fixed query. In `type`.
std::tuple<at::Tensor, at::Tensor> ranking_terms(const at::Tensor& keys, bool cosine, at::ScalarType type);
// The best `candidates` keys of every query by ranking value, a tile of
// query-key dot products (a library matmul) at a time.
at::Tensor tile_candidates(Backend backend, const at::Tensor& queries, const at::Tensor& keys,
                           const at::Tensor& key_offset, const at::Tensor& key_scale, int64_t candidates);
// Each query's k best candidates by (exact float64 distance, key index).
std::tuple<at::Tensor, at::Tensor> best_of_candidates(Backend backend, const at::Tensor& queries,
                                                      const at::Tensor& keys, const at::Tensor& indices, int64_t k,
                                                      bool cosine);
// The whole strategy: tiles, then the recheck. Distances in float64.
std::tuple<at::Tensor, at::Tensor> matmul_knn(Backend backend, const at::Tensor& queries, const at::Tensor& keys,
                                              int64_t k, int64_t candidates, bool cosine);

// ---- int16_screening.cpp (CPU)
bool int16_screening_supported();
std::tuple<at::Tensor, at::Tensor> int16_knn(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                             bool cosine);

// ---- int8_screening.cpp (CUDA kernels, on a GPU or emulated)
// Whether the int8 screening can rank this problem (else matmul tiles do).
bool int8_applies(Backend backend, int64_t dims, int64_t candidates, int64_t num_keys);
// Raised when the library's int8 matmul refuses (a GPU or build without it):
// knn then ranks with float matmuls, as ranking='matmul' does. Running
// out of memory is not a refusal: it propagates.
struct Int8ProductsUnavailable {
  std::string reason;
};
std::tuple<at::Tensor, at::Tensor> int8_knn(Backend backend, const at::Tensor& queries, const at::Tensor& keys,
                                            int64_t k, int64_t candidates, bool cosine);
int64_t int8_rechecked_queries();

}  // namespace alphanet::knn
