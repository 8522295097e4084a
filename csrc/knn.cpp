#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>

#include "op_utils.h"

namespace alphanet {
namespace {

constexpr const char* kOp = "knn";
// Extra candidates kept from the fast (matmul-expanded) ranking so the exact
// float64 recheck of the final list can repair rounding-level misorderings.
constexpr int64_t kExtraCandidates = 8;

struct Tiles {
  int64_t queries, keys;
};

// The CPU uses int16 screening where the hardware has it; ALPHANET_KNN_SCREENING=0
// selects the matmul-tile path below instead (the one CUDA runs).
bool use_screening() {
  const char* setting = std::getenv("ALPHANET_KNN_SCREENING");
  return cpu::knn_screening_supported() && !(setting && std::string(setting) == "0");
}

// On CUDA, a tile of dot products holds up to 2^26 values (256 MiB in float32):
// 16,384 keys at a time, and as many queries as fit (at least 4,096), so a
// problem of up to 2^26 pairs is one matmul.
Tiles tile_sizes(const at::Tensor& queries, int64_t num_keys) {
  if (!uses_cuda_kernels(queries)) return {512, 4096};
  constexpr int64_t kTileValues = int64_t{1} << 26, kTileKeys = 16384;
  const int64_t keys = std::min(num_keys, kTileKeys);
  return {std::max<int64_t>(4096, kTileValues / keys), kTileKeys};
}

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

// Exact float64 distances from each query to its candidate keys.
at::Tensor exact_distances(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& indices,
                           bool cosine) {
  at::Tensor distances = at::empty(indices.sizes(), indices.options().dtype(at::kDouble));
  RecheckParams params{};
  const at::Tensor q = unit_column_stride(queries), x = unit_column_stride(keys);  // alive until the kernel ends
  set_rows(params, q, x);
  params.cosine = cosine;
  params.indices = indices.data_ptr<int64_t>();
  params.num_queries = indices.size(0);
  params.candidates = indices.size(1);
  params.distances = distances.data_ptr<double>();
  run_kernel(queries, &cpu::knn_recheck, ALPHANET_CUDA_KERNEL(knn_recheck), params);
  return distances;
}

std::tuple<at::Tensor, at::Tensor> screened_knn(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                                bool cosine) {
  at::Tensor distances = at::empty({queries.size(0), k}, queries.options().dtype(acc_type(queries.scalar_type())));
  at::Tensor indices = at::empty({queries.size(0), k}, queries.options().dtype(at::kLong));
  ScreenedKnnParams params{};
  const at::Tensor q = unit_column_stride(queries), x = unit_column_stride(keys);
  set_rows(params, q, x);
  params.cosine = cosine;
  params.num_queries = queries.size(0);
  params.num_keys = keys.size(0);
  params.k = k;
  params.distances = distances.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  cpu::knn_screened(params);
  return {distances, indices};
}

// The best `candidates` keys of every query by ranking value, a tile of
// query-key dot products (a library matmul) at a time.
at::Tensor tile_candidates(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& key_offset,
                           const at::Tensor& key_scale, int64_t candidates) {
  const at::ScalarType value_type = key_offset.scalar_type();
  const auto value_options = queries.options().dtype(value_type);
  const int64_t num_queries = queries.size(0), num_keys = keys.size(0);
  at::Tensor values = at::empty({num_queries, candidates}, value_options);
  at::Tensor indices = at::empty({num_queries, candidates}, queries.options().dtype(at::kLong));
  // The select kernel starts the lists itself; the library top-k merges into them.
  const bool select = candidates <= kMaxCandidates;
  if (!select) {
    values.fill_(std::numeric_limits<double>::infinity());
    indices.fill_(std::numeric_limits<int64_t>::max());
  }
  const Tiles tiles = tile_sizes(queries, num_keys);
  for (int64_t q_begin = 0; q_begin < num_queries; q_begin += tiles.queries) {
    const int64_t q_len = std::min(tiles.queries, num_queries - q_begin);
    const at::Tensor query_tile = queries.narrow(0, q_begin, q_len).to(value_type);
    at::Tensor tile_values = values.narrow(0, q_begin, q_len);
    at::Tensor tile_indices = indices.narrow(0, q_begin, q_len);
    for (int64_t k_begin = 0; k_begin < num_keys; k_begin += tiles.keys) {
      const int64_t k_len = std::min(tiles.keys, num_keys - k_begin);
      const at::Tensor dots = at::mm(query_tile, keys.narrow(0, k_begin, k_len).to(value_type).t()).contiguous();
      const at::Tensor offset = key_offset.narrow(0, k_begin, k_len);
      const at::Tensor scale = key_scale.narrow(0, k_begin, k_len);
      if (select) {
        SelectParams params{};
        params.dtype = kernel_dtype(value_type);
        params.dots = dots.data_ptr();
        params.tile_rows = q_len;
        params.tile_cols = k_len;
        params.key_offset = offset.data_ptr();
        params.key_scale = scale.data_ptr();
        params.key_begin = k_begin;
        params.values = tile_values.data_ptr();
        params.indices = tile_indices.data_ptr<int64_t>();
        params.candidates = static_cast<int>(candidates);
        params.first_tile = k_begin == 0;
        run_kernel(queries, &cpu::knn_select, ALPHANET_CUDA_KERNEL(knn_select), params);
      } else {
        // Large k: library top-k over [running candidates | this tile].
        const at::Tensor merged_values = at::cat({tile_values, offset + scale * dots}, 1);
        const at::Tensor merged_indices =
            at::cat({tile_indices, at::arange(k_begin, k_begin + k_len, tile_indices.options()).expand({q_len, k_len})}, 1);
        auto [best, position] = merged_values.topk(candidates, 1, /*largest=*/false, /*sorted=*/true);
        tile_values.copy_(best);
        tile_indices.copy_(merged_indices.gather(1, position));
      }
    }
  }
  return indices;
}

#if defined(ALPHANET_WITH_CUDA) || defined(ALPHANET_CUDA_EMULATION)
// CUDA takes the tile path (library matmul, then the select kernel) unless
// ALPHANET_KNN_FUSED=1 asks for the fused kernel, which ranks and selects in one
// pass (float32 ranking values): on an H200 it was 1.1-2x slower than the tile
// path at every size benchmarked (benchmarks/RESULTS.md).
bool use_fused(const at::Tensor& queries, int64_t candidates) {
  const char* setting = std::getenv("ALPHANET_KNN_FUSED");
  return uses_cuda_kernels(queries) && queries.scalar_type() != at::kDouble && candidates <= kMaxCandidates &&
         setting && std::string(setting) == "1";
}

at::Tensor fused_candidates(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& key_offset,
                            const at::Tensor& key_scale, int64_t candidates) {
  const int64_t num_queries = queries.size(0), num_keys = keys.size(0);
  FusedKnnParams params{};
  const at::Tensor q = unit_column_stride(queries), x = unit_column_stride(keys);
  set_rows(params, q, x);
  params.num_queries = num_queries;
  params.num_keys = num_keys;
  params.key_offset = key_offset.data_ptr<float>();
  params.key_scale = key_scale.data_ptr<float>();
  params.candidates = static_cast<int>(candidates);
  params.keys_per_split = cuda::knn_fused_keys_per_split(params);
  const int64_t splits = (num_keys + params.keys_per_split - 1) / params.keys_per_split;
  const at::Tensor split_values = at::empty({splits, num_queries, candidates}, key_offset.options());
  const at::Tensor split_indices = at::empty({splits, num_queries, candidates}, queries.options().dtype(at::kLong));
  at::Tensor indices = at::empty({num_queries, candidates}, queries.options().dtype(at::kLong));
  params.split_values = split_values.data_ptr<float>();
  params.split_indices = split_indices.data_ptr<int64_t>();
  params.indices = indices.data_ptr<int64_t>();
  cuda::knn_fused(params);
  return indices;
}
#else
bool use_fused(const at::Tensor&, int64_t) { return false; }

at::Tensor fused_candidates(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "alphanet_ext was built without CUDA support");
}
#endif

std::tuple<at::Tensor, at::Tensor> knn(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                       c10::string_view metric) {
  check_float_matrix(queries, kOp, "queries");
  check_float_matrix(keys, kOp, "keys");
  check_backend(queries, kOp);
  check_same_device(queries, keys, kOp, "queries", "keys");
  TORCH_CHECK(queries.scalar_type() == keys.scalar_type(), kOp, ": queries are ", queries.scalar_type(),
              " but keys are ", keys.scalar_type());
  TORCH_CHECK(queries.size(1) == keys.size(1), kOp, ": queries have ", queries.size(1), " features but keys have ",
              keys.size(1));
  TORCH_CHECK(metric == "euclidean" || metric == "cosine", kOp, ": metric must be 'euclidean' or 'cosine', got '",
              std::string(metric), "'");
  TORCH_CHECK(k >= 1, kOp, ": k must be at least 1, got ", k);
  TORCH_CHECK(k <= keys.size(0), kOp, ": k (", k, ") is larger than the number of keys (", keys.size(0), ")");
  check_finite({{&queries, "queries"}, {&keys, "keys"}}, kOp);

  const at::OptionalDeviceGuard guard(at::device_of(queries));
  const bool cosine = metric == "cosine";
  const at::ScalarType value_type = acc_type(queries.scalar_type());
  const int64_t num_queries = queries.size(0), num_keys = keys.size(0);
  const auto value_options = queries.options().dtype(value_type);
  if (num_queries == 0) {
    return {at::empty({0, k}, value_options), at::empty({0, k}, queries.options().dtype(at::kLong))};
  }
  if (!uses_cuda_kernels(queries) && use_screening()) return screened_knn(queries, keys, k, cosine);

  // Ranking value per (query, key): offset[key] + scale[key] * <query, key>,
  // which orders keys like the true distance for a fixed query.
  const at::Tensor key_norms = at::linalg_vector_norm(keys, 2, {1}, false, value_type);
  const at::Tensor key_offset = cosine ? at::zeros_like(key_norms) : key_norms.square();
  const at::Tensor key_scale = cosine ? -key_norms.clamp_min(1e-12).reciprocal() : at::full_like(key_norms, -2.0);
  const int64_t candidates = std::min(num_keys, k + kExtraCandidates);
  const at::Tensor indices = use_fused(queries, candidates)
                                 ? fused_candidates(queries, keys, key_offset, key_scale, candidates)
                                 : tile_candidates(queries, keys, key_offset, key_scale, candidates);

  // Exact recheck, then the k best by (distance, index).
  const at::Tensor distances = exact_distances(queries, keys, indices, cosine);
  at::Tensor best_distances = at::empty({num_queries, k}, distances.options());
  at::Tensor best_indices = at::empty({num_queries, k}, indices.options());
  FinishParams params{};
  params.distances = distances.data_ptr<double>();
  params.indices = indices.data_ptr<int64_t>();
  params.num_queries = num_queries;
  params.candidates = candidates;
  params.k = k;
  params.best_distances = best_distances.data_ptr<double>();
  params.best_indices = best_indices.data_ptr<int64_t>();
  run_kernel(queries, &cpu::knn_finish, ALPHANET_CUDA_KERNEL(knn_finish), params);
  return {best_distances.to(value_type), best_indices};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(alphanet, m) {
  m.def("knn(Tensor queries, Tensor keys, int k, str metric=\"euclidean\") -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(alphanet, CPU, m) { m.impl("knn", &knn); }

#ifdef ALPHANET_WITH_CUDA
TORCH_LIBRARY_IMPL(alphanet, CUDA, m) { m.impl("knn", &knn); }
#endif

}  // namespace alphanet
