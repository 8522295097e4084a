#include <atomic>
#include <cmath>

#include "knn_ranking.h"

namespace alphanet::knn {
namespace {

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

}  // namespace

bool int8_applies(Backend backend, int64_t dims, int64_t candidates, int64_t num_keys) {
  return cuda_paths(backend) && candidates < num_keys && candidates <= kMaxCandidates && dims > 0 &&
         round_up(dims, kCodeAlignment) <= kMaxQuantDims;
}

std::tuple<at::Tensor, at::Tensor> int8_knn(Backend backend, const at::Tensor& queries, const at::Tensor& keys,
                                            int64_t k, int64_t candidates, bool cosine) {
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
  auto [best_distances, best_indices] = best_of_candidates(backend, queries, keys, indices, k, cosine);

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
        tile_candidates(backend, ranked_subset, framed_keys, offset, at::full_like(offset, scale), candidates);
    auto [subset_distances, subset_best] = best_of_candidates(backend, subset, keys, subset_indices, k, cosine);
    best_distances.index_copy_(0, uncertain, subset_distances);
    best_indices.index_copy_(0, uncertain, subset_best);
  }
  return {best_distances, best_indices};
}

int64_t int8_rechecked_queries() { return rechecked_queries; }

}  // namespace alphanet::knn
