// kNN by float matmul tiles: each tile of query-key dot products (a library
// matmul) ranks the keys by offset + scale * <query, key>, the select kernel
// keeps each query's best candidates (k plus a margin), and the recheck
// computes their exact float64 distances, so the top-k is the exact one,
// ties to the lower key index. Any backend; the other strategies' fallback.
#include <algorithm>
#include <limits>

#include "knn_ranking.h"

namespace alphanet::knn {
namespace {

struct Tiles {
  int64_t queries, keys;
};

// On CUDA, a tile of dot products holds up to 2^26 values (256 MiB in float32):
// 16,384 keys at a time, and as many queries as fit (at least 4,096), so a
// problem of up to 2^26 pairs is one matmul.
Tiles tile_sizes(Backend backend, int64_t num_keys) {
  if (!cuda_paths(backend)) return {512, 4096};
  constexpr int64_t kTileValues = int64_t{1} << 26, kTileKeys = 16384;
  const int64_t keys = std::min(num_keys, kTileKeys);
  return {std::max<int64_t>(4096, kTileValues / keys), kTileKeys};
}

}  // namespace

at::Tensor unit_rows(const at::Tensor& rows) {
  return rows / at::linalg_vector_norm(rows, 2, {1}, true).clamp_min(kNormFloor);
}

// One matrix-vector product, so no copy of the keys (beyond 16-bit ones' upcast).
at::Tensor frame_center(const at::Tensor& keys, bool cosine) {
  const at::Tensor rows = keys.to(acc_type(keys.scalar_type()));
  const at::Tensor weights = cosine ? at::linalg_vector_norm(rows, 2, {1}).clamp_min(kNormFloor).reciprocal()
                                    : at::ones({rows.size(0)}, rows.options());
  return at::mv(rows.t(), weights).to(at::kDouble) / static_cast<double>(rows.size(0));
}

// Exact float64 distances from each query to its candidate keys.
static at::Tensor exact_distances(Backend backend, const at::Tensor& queries, const at::Tensor& keys,
                                  const at::Tensor& indices, bool cosine) {
  at::Tensor distances = at::empty(indices.sizes(), indices.options().dtype(at::kDouble));
  RecheckParams params{};
  const at::Tensor q = unit_column_stride(queries), x = unit_column_stride(keys);  // alive until the kernel ends
  set_rows(params, q, x);
  params.cosine = cosine;
  params.indices = indices.data_ptr<int64_t>();
  params.num_queries = indices.size(0);
  params.candidates = indices.size(1);
  params.distances = distances.data_ptr<double>();
  run_kernel(backend, &cpu::knn_recheck, ALPHANET_CUDA_KERNEL(knn_recheck), params);
  return distances;
}

std::tuple<at::Tensor, at::Tensor> ranking_terms(const at::Tensor& keys, bool cosine, at::ScalarType type) {
  const at::Tensor key_norms = at::linalg_vector_norm(keys, 2, {1}, false, type);
  if (cosine) return {at::zeros_like(key_norms), -key_norms.clamp_min(kNormFloor).reciprocal()};
  return {key_norms.square(), at::full_like(key_norms, -2.0)};
}

at::Tensor tile_candidates(Backend backend, const at::Tensor& queries, const at::Tensor& keys,
                           const at::Tensor& key_offset, const at::Tensor& key_scale, int64_t candidates) {
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
  const Tiles tiles = tile_sizes(backend, num_keys);
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
        params.dots_stride = k_len;
        params.key_offset = offset.data_ptr();
        params.key_scale = scale.data_ptr();
        params.key_begin = k_begin;
        params.values = tile_values.data_ptr();
        params.indices = tile_indices.data_ptr<int64_t>();
        params.candidates = static_cast<int>(candidates);
        params.first_tile = k_begin == 0;
        run_kernel(backend, &cpu::knn_select, ALPHANET_CUDA_KERNEL(knn_select), params);
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

// The recheck, then the finish kernel.
std::tuple<at::Tensor, at::Tensor> best_of_candidates(Backend backend, const at::Tensor& queries,
                                                      const at::Tensor& keys, const at::Tensor& indices, int64_t k,
                                                      bool cosine) {
  const at::Tensor distances = exact_distances(backend, queries, keys, indices, cosine);
  at::Tensor best_distances = at::empty({queries.size(0), k}, distances.options());
  at::Tensor best_indices = at::empty({queries.size(0), k}, indices.options());
  FinishParams params{};
  params.distances = distances.data_ptr<double>();
  params.indices = indices.data_ptr<int64_t>();
  params.num_queries = queries.size(0);
  params.candidates = indices.size(1);
  params.k = k;
  params.best_distances = best_distances.data_ptr<double>();
  params.best_indices = best_indices.data_ptr<int64_t>();
  run_kernel(backend, &cpu::knn_finish, ALPHANET_CUDA_KERNEL(knn_finish), params);
  return {best_distances, best_indices};
}

std::tuple<at::Tensor, at::Tensor> matmul_knn(Backend backend, const at::Tensor& queries, const at::Tensor& keys,
                                              int64_t k, int64_t candidates, bool cosine) {
  const auto [key_offset, key_scale] = ranking_terms(keys, cosine, acc_type(queries.scalar_type()));
  const at::Tensor indices = tile_candidates(backend, queries, keys, key_offset, key_scale, candidates);
  return best_of_candidates(backend, queries, keys, indices, k, cosine);
}

}  // namespace alphanet::knn
