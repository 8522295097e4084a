// The kNN op: schema, argument checks, the backend and the ranking strategy
// (csrc/knn/: matmul tiles, the CPU's int16 screening, CUDA's int8 screening).
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "knn/knn_ranking.h"

namespace alphanet {
namespace {

using knn::kOp;

// How keys are ranked before the exact float64 recheck, chosen by the op's
// `ranking` argument: "auto" (the CPU's int16 screening where the hardware has
// it, CUDA's int8 screening, else matmul tiles), "screening" (CPU int16),
// "int8" (CUDA int8) or "matmul" (float matmul tiles, on either backend).
enum class Ranking { Auto, Screening, Int8, Matmul };

Ranking parse_ranking(c10::string_view name, Backend backend) {
  const std::string text(name);
  const bool cuda = cuda_paths(backend);
  if (text == "auto") return Ranking::Auto;
  if (text == "matmul") return Ranking::Matmul;
  if (text == "screening") {
    TORCH_CHECK(!cuda, kOp, ": ranking='screening' is the CPU's int16 screening; on CUDA use 'int8' or 'matmul'");
    TORCH_CHECK(knn::int16_screening_supported(), kOp, ": ranking='screening' needs an x86-64 CPU with AVX2");
    return Ranking::Screening;
  }
  if (text == "int8") {
    TORCH_CHECK(cuda, kOp, ": ranking='int8' is CUDA's int8 screening; on the CPU use 'screening' or 'matmul'");
    return Ranking::Int8;
  }
  TORCH_CHECK(false, message(kOp, msg::knn_ranking, {{"value", text}}));
  return Ranking::Auto;
}

bool use_screening(Ranking ranking) {
  return ranking == Ranking::Screening || (ranking == Ranking::Auto && knn::int16_screening_supported());
}

std::tuple<at::Tensor, at::Tensor> knn_op(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                          c10::string_view metric, c10::string_view ranking_name) {
  check_float_matrix(queries, kOp, "queries");
  check_float_matrix(keys, kOp, "keys");
  check_backend(queries, kOp);
  check_same_device(queries, keys, kOp, "queries", "keys");
  TORCH_CHECK(queries.scalar_type() == keys.scalar_type(),
              message(kOp, msg::knn_dtypes, {{"queries", c10::str(queries.scalar_type())},
                                             {"keys", c10::str(keys.scalar_type())}}));
  TORCH_CHECK(queries.size(1) == keys.size(1), message(kOp, msg::knn_dims, {{"queries", std::to_string(queries.size(1))},
                                                                           {"keys", std::to_string(keys.size(1))}}));
  TORCH_CHECK(metric == "euclidean" || metric == "cosine",
              message(kOp, msg::knn_metric, {{"value", std::string(metric)}}));
  TORCH_CHECK(k >= 1, message(kOp, msg::knn_k_low, {{"value", std::to_string(k)}}));
  TORCH_CHECK(k <= keys.size(0),
              message(kOp, msg::knn_k_high, {{"k", std::to_string(k)}, {"keys", std::to_string(keys.size(0))}}));
  check_finite({{&queries, "queries"}, {&keys, "keys"}}, kOp);
  const Backend backend = backend_of(queries);
  const Ranking ranking = parse_ranking(ranking_name, backend);

  const at::OptionalDeviceGuard guard(at::device_of(queries));
  const bool cosine = metric == "cosine";
  const at::ScalarType value_type = acc_type(queries.scalar_type());
  const int64_t num_queries = queries.size(0), num_keys = keys.size(0);
  const auto value_options = queries.options().dtype(value_type);
  if (num_queries == 0) {
    return {at::empty({0, k}, value_options), at::empty({0, k}, queries.options().dtype(at::kLong))};
  }
  if (!cuda_paths(backend) && use_screening(ranking)) return knn::int16_knn(queries, keys, k, cosine);

  const int64_t candidates = std::min(num_keys, k + knn::kExtraCandidates);
  // CUDA ranks keys by int8 screening with a proven bound unless asked for float
  // matmul tiles in the input precision (ranking='matmul').
  if (ranking != Ranking::Matmul && knn::int8_applies(backend, queries.size(1), candidates, num_keys)) {
    try {
      auto [best_distances, best_indices] = knn::int8_knn(backend, queries, keys, k, candidates, cosine);
      return {best_distances.to(value_type), best_indices};
    } catch (const knn::Int8ProductsUnavailable& error) {
      TORCH_WARN(kOp, ": the int8 matmul is unavailable (", error.reason, "); ranking with float matmuls instead "
                 "(ranking='matmul' skips the attempt)");
    }
  }
  auto [best_distances, best_indices] = knn::matmul_knn(backend, queries, keys, k, candidates, cosine);
  return {best_distances.to(value_type), best_indices};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(alphanet, m) {
  m.def("knn(Tensor queries, Tensor keys, int k, str metric=\"euclidean\", str ranking=\"auto\") -> (Tensor, Tensor)");
  // Queries whose int8 ranking bound could not certify them, since the library
  // loaded (they were ranked again in float64): for tests and benchmarks.
  m.def("_knn_rechecked_queries() -> int", &knn::int8_rechecked_queries);
  // Keys the CPU's int16 screening could not rule out (ranked in float64), since load.
  m.def("_knn_screened_candidates() -> int", &cpu::knn_screened_candidates);
}

TORCH_LIBRARY_IMPL(alphanet, CPU, m) { m.impl("knn", &knn_op); }

#ifdef ALPHANET_WITH_CUDA
TORCH_LIBRARY_IMPL(alphanet, CUDA, m) { m.impl("knn", &knn_op); }
#endif

}  // namespace alphanet
