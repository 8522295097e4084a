#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>

#include "knn_params.h"
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

// How keys are ranked before the exact float64 recheck, chosen by the op's
// `ranking` argument: "auto" (the CPU's int16 screening where the hardware has
// it, CUDA's int8 screening, else matmul tiles), "screening" (CPU int16),
// "int8" (CUDA int8) or "matmul" (float matmul tiles, on either backend).
enum class Ranking { Auto, Screening, Int8, Matmul };

Ranking parse_ranking(c10::string_view name, const at::Tensor& queries) {
  const std::string text(name);
  const bool cuda = uses_cuda_kernels(queries);
  if (text == "auto") return Ranking::Auto;
  if (text == "matmul") return Ranking::Matmul;
  if (text == "screening") {
    TORCH_CHECK(!cuda, kOp, ": ranking='screening' is the CPU's int16 screening; on CUDA use 'int8' or 'matmul'");
    TORCH_CHECK(cpu::knn_screening_supported(), kOp, ": ranking='screening' needs an x86-64 CPU with AVX2");
    return Ranking::Screening;
  }
  if (text == "int8") {
    TORCH_CHECK(cuda, kOp, ": ranking='int8' is CUDA's int8 screening; on the CPU use 'screening' or 'matmul'");
    return Ranking::Int8;
  }
  TORCH_CHECK(false, kOp, ": ranking must be 'auto', 'screening', 'int8' or 'matmul', got '", text, "'");
  return Ranking::Auto;
}

bool use_screening(Ranking ranking) {
  return ranking == Ranking::Screening || (ranking == Ranking::Auto && cpu::knn_screening_supported());
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

at::Tensor unit_rows(const at::Tensor& rows) {
  return rows / at::linalg_vector_norm(rows, 2, {1}, true).clamp_min(kNormFloor);
}

// The origin of the screenings' ranking frame, [dims] float64: the keys' mean
// (of the unit rows, for cosine). Any origin keeps the result exact; this one
// keeps the bound tight where the rows share a large offset, as post-ReLU
// features and their class means do.
// One matrix-vector product, so no copy of the keys (beyond 16-bit ones' upcast).
at::Tensor frame_center(const at::Tensor& keys, bool cosine) {
  const at::Tensor rows = keys.to(acc_type(keys.scalar_type()));
  const at::Tensor weights = cosine ? at::linalg_vector_norm(rows, 2, {1}).clamp_min(kNormFloor).reciprocal()
                                    : at::ones({rows.size(0)}, rows.options());
  return at::mv(rows.t(), weights).to(at::kDouble) / static_cast<double>(rows.size(0));
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
  const at::Tensor center = frame_center(keys, cosine);
  params.center = center.data_ptr<double>();
  params.num_queries = queries.size(0);
  params.num_keys = keys.size(0);
  params.k = k;
  params.distances = distances.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  cpu::knn_screened(params);
  return {distances, indices};
}

// Ranking value per (query, key): offset[key] + scale[key] * <query, key>,
// which orders keys like the true distance for a fixed query. In `type`.
std::tuple<at::Tensor, at::Tensor> ranking_terms(const at::Tensor& keys, bool cosine, at::ScalarType type) {
  const at::Tensor key_norms = at::linalg_vector_norm(keys, 2, {1}, false, type);
  if (cosine) return {at::zeros_like(key_norms), -key_norms.clamp_min(kNormFloor).reciprocal()};
  return {key_norms.square(), at::full_like(key_norms, -2.0)};
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
        params.dots_stride = k_len;
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

// Each query's k best candidates by (exact float64 distance, key index): the
// recheck, then the finish kernel. Distances in float64.
std::tuple<at::Tensor, at::Tensor> best_of_candidates(const at::Tensor& queries, const at::Tensor& keys,
                                                      const at::Tensor& indices, int64_t k, bool cosine) {
  const at::Tensor distances = exact_distances(queries, keys, indices, cosine);
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
  run_kernel(queries, &cpu::knn_finish, ALPHANET_CUDA_KERNEL(knn_finish), params);
  return {best_distances, best_indices};
}

// Int8 screening (CUDA): queries and keys as int8 codes (QuantizeParams), whose
// products in int32 on tensor cores (the library's int8 matmul) rank the keys
// to within a bound proven per query; the select kernel keeps each query's
// `candidates` best estimates. A query is certified when every key outside its
// list provably ranks after its k-th best rechecked candidate; the others are
// ranked again with float64 matmuls. The result is the exact float64 one.
constexpr int64_t kCodeAlignment = 16;     // code columns; the int8 matmul needs multiples of 8
constexpr int64_t kCodedKeyAlignment = 8;  // keys per product tile: a multiple of 8
constexpr int64_t kMinCodedQueries = 17;   // rows of an int8 matmul: more than 16
constexpr double kHighCodeScale = 254.0;   // lo counts in units of 1/254 of hi's step
constexpr double kBoundSlack = 1e-9;       // float64 rounding in the estimates, bounds and recheck

std::atomic<int64_t> rechecked_queries{0};  // queries the int8 bound could not certify, since load

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Codes of `rows` in the ranking frame (normalised for cosine, then less
// `center`), [lo | hi] for keys, with zero rows up to `padded_rows`; stats go to
// `stats`, a [kQuantStats, *] float64 view with unit row stride.
at::Tensor quantize(const at::Tensor& rows, bool cosine, const at::Tensor& center, int64_t padded_rows,
                    int64_t padded_dims, bool low_first, const at::Tensor& stats) {
  const at::Tensor r = unit_column_stride(rows);
  at::Tensor codes = at::empty({padded_rows, 2 * padded_dims}, rows.options().dtype(at::kChar));
  if (padded_rows > rows.size(0)) codes.narrow(0, rows.size(0), padded_rows - rows.size(0)).zero_();
  QuantizeParams params{};
  params.dtype = kernel_dtype(r.scalar_type());
  params.rows = r.data_ptr();
  params.row_stride = r.stride(0);
  params.num_rows = r.size(0);
  params.dims = r.size(1);
  params.padded_dims = padded_dims;
  params.normalize = cosine;
  params.center = center.data_ptr<double>();
  params.low_first = low_first;
  params.codes = codes.data_ptr<int8_t>();
  params.stats = stats.data_ptr<double>();
  params.stats_stride = stats.stride(0);
  run_cuda_kernel(ALPHANET_CUDA_KERNEL(knn_quantize), params);
  return codes;
}

// Raised when the library's int8 matmul refuses (a GPU or build without it):
// knn then ranks with float matmuls, as ranking='matmul' does. Running
// out of memory is not a refusal: it propagates.
struct Int8ProductsUnavailable {
  std::string reason;
};

at::Tensor int8_products(const at::Tensor& rows, const at::Tensor& columns) {
  try {
    return at::_int_mm(rows, columns);
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const std::exception& error) {
    const std::string what = error.what();
    throw Int8ProductsUnavailable{what.substr(0, what.find('\n'))};
  }
}

// Rows in the int8 screening's ranking frame, in float64 (quantize_kernel's, to
// rounding; equal rows stay equal, so ties stay ties).
at::Tensor framed(const at::Tensor& rows, bool cosine, const at::Tensor& center) {
  const at::Tensor doubled = rows.to(at::kDouble);
  return (cosine ? unit_rows(doubled) : doubled) - center;
}

// CUDA ranks keys by int8 screening with a proven bound (see int8_knn) unless
// asked for float matmul tiles in the input precision (ranking='matmul').
bool use_int8(const at::Tensor& queries, Ranking ranking, int64_t candidates, int64_t num_keys) {
  return uses_cuda_kernels(queries) && ranking != Ranking::Matmul &&
         candidates < num_keys && candidates <= kMaxCandidates && queries.size(1) > 0 &&
         round_up(queries.size(1), kCodeAlignment) <= kMaxQuantDims;
}

std::tuple<at::Tensor, at::Tensor> int8_knn(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                            int64_t candidates, bool cosine) {
  const int64_t num_queries = queries.size(0), num_keys = keys.size(0);
  const int64_t dims = round_up(queries.size(1), kCodeAlignment);
  const auto double_options = queries.options().dtype(at::kDouble);
  const at::Tensor center = frame_center(keys, cosine);

  const int64_t padded_keys = round_up(num_keys, kCodedKeyAlignment);
  const at::Tensor key_stats = at::empty({kQuantStats, num_keys}, double_options);
  const at::Tensor key_codes = quantize(keys, cosine, center, padded_keys, dims, /*low_first=*/true, key_stats);
  // Ranking value offset + scale * <t_q, t_key> in the frame: |t_key|^2 - 2 <t_q, t_key>
  // (|q - key|^2 less |t_q|^2), or -<t_q, t_key> - <center, t_key> (-cos less a
  // per-query constant). The select kernel gets scale * s_key / 254.
  const at::Tensor key_norms = key_stats[kQuantNorm];
  const double scale = cosine ? -1.0 : -2.0;
  const at::Tensor key_offset = cosine ? -key_stats[kQuantCenterDot] : key_norms.square();
  const at::Tensor code_scale = key_stats[kQuantScale] * (scale / kHighCodeScale);
  // |rank - estimate| <= |scale| (|e_q| |t_key| + |t_q coded| |e_key| + s_q s_key |lo_q| |lo_key| / 254^2),
  // bounded over all keys by three per-key maxima.
  const at::Tensor norm_term = std::abs(scale) * key_norms.max();
  const at::Tensor error_term = std::abs(scale) * key_stats[kQuantErrorNorm].max();
  const at::Tensor low_term =
      (std::abs(scale) / (kHighCodeScale * kHighCodeScale)) * (key_stats[kQuantScale] * key_stats[kQuantLowNorm]).max();
  const at::Tensor largest_offset = key_offset.abs().max();

  const at::Tensor query_stats = at::empty({kQuantStats, num_queries}, double_options);
  at::Tensor values = at::empty({num_queries, candidates}, double_options);
  at::Tensor indices = at::empty({num_queries, candidates}, queries.options().dtype(at::kLong));
  // Two int32 products per pair: a tile holds up to 2^25 pairs (256 MiB).
  const int64_t tile_keys = std::min<int64_t>(padded_keys, 8192);
  const int64_t tile_queries = std::max<int64_t>(4096, (int64_t{1} << 25) / tile_keys);
  for (int64_t q_begin = 0; q_begin < num_queries;) {
    // the last tile takes a remainder too short for the int8 matmul
    const int64_t left = num_queries - q_begin;
    const int64_t q_len = left < tile_queries + kMinCodedQueries ? left : tile_queries;
    const at::Tensor query_codes =
        quantize(queries.narrow(0, q_begin, q_len), cosine, center, std::max(q_len, kMinCodedQueries), dims,
                 /*low_first=*/false, query_stats.narrow(1, q_begin, q_len));
    const at::Tensor query_highs = query_codes.narrow(1, 0, dims);
    for (int64_t k_begin = 0; k_begin < padded_keys; k_begin += tile_keys) {
      const int64_t k_len = std::min(tile_keys, padded_keys - k_begin);
      const at::Tensor tile_codes = key_codes.narrow(0, k_begin, k_len);  // [lo | hi] rows
      const at::Tensor high_products = int8_products(query_highs, tile_codes.narrow(1, dims, dims).t());
      const at::Tensor cross_products = int8_products(query_codes, tile_codes.t());  // hi.lo + lo.hi
      SelectParams params{};
      params.dtype = DType::Double;
      params.dots = high_products.data_ptr<int32_t>();
      params.cross = cross_products.data_ptr<int32_t>();
      params.tile_rows = q_len;
      params.tile_cols = std::min(k_len, num_keys - k_begin);
      params.dots_stride = k_len;
      params.key_offset = key_offset.narrow(0, k_begin, params.tile_cols).data_ptr();
      params.key_scale = code_scale.narrow(0, k_begin, params.tile_cols).data_ptr();
      params.row_scale = query_stats[kQuantScale].narrow(0, q_begin, q_len).data_ptr<double>();
      params.key_begin = k_begin;
      params.values = values.narrow(0, q_begin, q_len).data_ptr();
      params.indices = indices.narrow(0, q_begin, q_len).data_ptr<int64_t>();
      params.candidates = static_cast<int>(candidates);
      params.first_tile = k_begin == 0;
      run_cuda_kernel(ALPHANET_CUDA_KERNEL(knn_select), params);
    }
    q_begin += q_len;
  }
  auto [best_distances, best_indices] = best_of_candidates(queries, keys, indices, k, cosine);

  // Certificate: a key outside the list has an estimate >= the list's last one,
  // so a rank >= that estimate minus the largest bound; it cannot be among the
  // k best if that exceeds the k-th best rechecked distance as a rank.
  const at::Tensor query_norms = query_stats[kQuantNorm];
  const at::Tensor bound = query_stats[kQuantErrorNorm] * norm_term + query_stats[kQuantCodedNorm] * error_term +
                           query_stats[kQuantScale] * query_stats[kQuantLowNorm] * low_term;
  const at::Tensor kth = best_distances.select(1, k - 1);
  at::Tensor kth_rank, magnitude;
  if (cosine) {  // rank = -cos + <q / |q|, center> = distance - 1 + <t_q, center> + |center|^2
    const at::Tensor query_constant = query_stats[kQuantCenterDot] + center.dot(center);
    kth_rank = kth - 1.0 + query_constant;
    magnitude = largest_offset + query_norms * norm_term + 1.0 + query_constant.abs();
  } else {  // rank = distance^2 - |t_q|^2
    kth_rank = kth.square() - query_norms.square();
    magnitude = largest_offset + query_norms * norm_term + query_norms.square();
  }
  const at::Tensor excluded_rank = values.select(1, candidates - 1) - bound - kBoundSlack * magnitude;
  const at::Tensor uncertain = at::nonzero(at::logical_not(excluded_rank > kth_rank)).squeeze(1);  // one sync
  if (uncertain.numel() > 0) {
    // float64 matmul ranking in the same frame, whose rounding scales with the
    // rows' spread rather than with a common offset
    rechecked_queries += uncertain.numel();
    const at::Tensor subset = queries.index_select(0, uncertain);
    const at::Tensor framed_keys = framed(keys, cosine, center);
    // Cosine ranks by -<q / |q|, t_key> (the rank above, as <t_q + center, t_key>):
    // a zero query's products are then exactly 0, so its exact ties stay ties
    // and go to the lower index, where -<t_q, t_key> - <center, t_key> rounds apart.
    const at::Tensor ranked_subset = cosine ? unit_rows(subset.to(at::kDouble)) : framed(subset, cosine, center);
    const at::Tensor offset = cosine ? at::zeros({num_keys}, double_options) : framed_keys.square().sum(1);
    const at::Tensor subset_indices =
        tile_candidates(ranked_subset, framed_keys, offset, at::full_like(offset, scale), candidates);
    auto [subset_distances, subset_best] = best_of_candidates(subset, keys, subset_indices, k, cosine);
    best_distances.index_copy_(0, uncertain, subset_distances);
    best_indices.index_copy_(0, uncertain, subset_best);
  }
  return {best_distances, best_indices};
}

std::tuple<at::Tensor, at::Tensor> knn(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                       c10::string_view metric, c10::string_view ranking_name) {
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
  const Ranking ranking = parse_ranking(ranking_name, queries);

  const at::OptionalDeviceGuard guard(at::device_of(queries));
  const bool cosine = metric == "cosine";
  const at::ScalarType value_type = acc_type(queries.scalar_type());
  const int64_t num_queries = queries.size(0), num_keys = keys.size(0);
  const auto value_options = queries.options().dtype(value_type);
  if (num_queries == 0) {
    return {at::empty({0, k}, value_options), at::empty({0, k}, queries.options().dtype(at::kLong))};
  }
  if (!uses_cuda_kernels(queries) && use_screening(ranking)) return screened_knn(queries, keys, k, cosine);

  const int64_t candidates = std::min(num_keys, k + kExtraCandidates);
  if (use_int8(queries, ranking, candidates, num_keys)) {
    try {
      auto [best_distances, best_indices] = int8_knn(queries, keys, k, candidates, cosine);
      return {best_distances.to(value_type), best_indices};
    } catch (const Int8ProductsUnavailable& error) {
      TORCH_WARN(kOp, ": the int8 matmul is unavailable (", error.reason, "); ranking with float matmuls instead "
                 "(ranking='matmul' skips the attempt)");
    }
  }
  const auto [key_offset, key_scale] = ranking_terms(keys, cosine, value_type);
  const at::Tensor indices = tile_candidates(queries, keys, key_offset, key_scale, candidates);
  auto [best_distances, best_indices] = best_of_candidates(queries, keys, indices, k, cosine);
  return {best_distances.to(value_type), best_indices};
}

int64_t knn_rechecked_queries() { return rechecked_queries; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(alphanet, m) {
  m.def("knn(Tensor queries, Tensor keys, int k, str metric=\"euclidean\", str ranking=\"auto\") -> (Tensor, Tensor)");
  // Queries whose int8 ranking bound could not certify them, since the library
  // loaded (they were ranked again in float64): for tests and benchmarks.
  m.def("_knn_rechecked_queries() -> int", &knn_rechecked_queries);
  // Keys the CPU's int16 screening could not rule out (ranked in float64), since load.
  m.def("_knn_screened_candidates() -> int", &cpu::knn_screened_candidates);
}

TORCH_LIBRARY_IMPL(alphanet, CPU, m) { m.impl("knn", &knn); }

#ifdef ALPHANET_WITH_CUDA
TORCH_LIBRARY_IMPL(alphanet, CUDA, m) { m.impl("knn", &knn); }
#endif

}  // namespace alphanet
