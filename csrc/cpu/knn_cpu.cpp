#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../device_functions.h"
#include "../knn_params.h"

namespace alphanet::cpu {

namespace {
std::atomic<int64_t> screened_candidates{0};  // keys the int16 screening kept and ranked in float64, since load
}  // namespace

int64_t knn_screened_candidates() { return screened_candidates; }

void knn_select(const SelectParams& p) {
  TORCH_CHECK(p.cross == nullptr, "knn: int8 screening runs on CUDA only");
  dispatch_acc_types(p.dtype, [&](auto tag) {
    using V = decltype(tag);
    const V* dots = static_cast<const V*>(p.dots);
    const V* offset = static_cast<const V*>(p.key_offset);
    const V* scale = static_cast<const V*>(p.key_scale);
    V* values = static_cast<V*>(p.values);
    at::parallel_for(0, p.tile_rows, 8, [&](int64_t row_begin, int64_t row_end) {
      for (int64_t row = row_begin; row < row_end; ++row) {
        const V* dot_row = dots + row * p.dots_stride;
        V* row_values = values + row * p.candidates;
        int64_t* row_indices = p.indices + row * p.candidates;
        if (p.first_tile) {
          std::fill_n(row_values, p.candidates, std::numeric_limits<V>::infinity());
          std::fill_n(row_indices, p.candidates, std::numeric_limits<int64_t>::max());
        }
        for (int64_t col = 0; col < p.tile_cols; ++col) {
          topk_insert(row_values, row_indices, p.candidates, offset[col] + scale[col] * dot_row[col],
                      p.key_begin + col);
        }
      }
    });
  });
}

void knn_finish(const FinishParams& p) {
  at::parallel_for(0, p.num_queries, 64, [&](int64_t query_begin, int64_t query_end) {
    for (int64_t q = query_begin; q < query_end; ++q) {
      best_of(p.distances + q * p.candidates, p.indices + q * p.candidates, p.candidates, p.k,
              p.best_distances + q * p.k, p.best_indices + q * p.k);
    }
  });
}

void knn_recheck(const RecheckParams& p) {
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* queries = static_cast<const T*>(p.queries);
    const T* keys = static_cast<const T*>(p.keys);
    at::parallel_for(0, p.num_queries, 4, [&](int64_t query_begin, int64_t query_end) {
      for (int64_t q = query_begin; q < query_end; ++q) {
        for (int64_t c = 0; c < p.candidates; ++c) {
          DistanceTerms terms;
          add_distance_terms(queries + q * p.query_stride, keys + p.indices[q * p.candidates + c] * p.key_stride, 0,
                             p.dims, 1, p.cosine, terms);
          p.distances[q * p.candidates + c] = finish_distance(terms, p.cosine);
        }
      }
    });
  });
}


// ---------------------------------------------------------------------------
// Screened exact kNN (x86-64 with AVX2).
//
// Every row v (a query or key; unit-normalised for cosine) is quantised to
// int16 as v = s * round(v / s) + e with s = max|v| / kQuantMax, and ||e|| is
// measured in float64. For a query q and key x the exact dot product then lies
// within ||q_hat|| ||e_x|| + ||e_q|| ||x|| <= (||q|| + ||e_q||) ||e_x|| + ||e_q|| ||x|| of s_q s_x <q_int, x_int>
// (Cauchy-Schwarz), and the integer product is exact. The ranking value
// r = offset(x) - f <q, x> (f = 2, offset ||x||^2 for euclidean; f = 1,
// offset 0 for cosine) therefore has a proven interval [lower, upper]. With T
// the k-th smallest upper bound seen, every true top-k key has lower <= T, so
// keeping exactly those keys and ranking them by float64 distance is exact.
// vpmaddwd does 16 multiply-adds per instruction, twice an fp32 FMA's 8.
// ---------------------------------------------------------------------------
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ALPHANET_SCREENED_KNN 1
#endif

#ifdef ALPHANET_SCREENED_KNN
namespace {

constexpr int kPanelQueries = 6;      // micro-tile: 6 queries x 16 keys,
constexpr int kPanelKeys = 16;        // 12 int32 accumulators in ymm registers
constexpr int64_t kChunkSteps = 128;  // int16 pairs summed in int32 before widening:
constexpr int kQuantMax = 2896;       // 128 * 2 * 2896^2 < 2^31, so the int32 sums are exact
constexpr int64_t kQueryBlock = 96;   // queries packed per task (L2-resident at d = 2048)
constexpr int64_t kKeyTile = 4096;    // keys packed at a time, so memory stays bounded
constexpr double kRoundingSlack = 1e-9;  // covers float64 rounding in both the bound and the recheck

struct RowStats {
  double scale = 0, norm = 0, error_norm = 0, center_dot = 0;  // of the row in the frame
};

template <typename T>
__attribute__((target("avx2,fma"))) inline __m256d load4(const T* at) {
  if constexpr (std::is_same_v<T, double>) {
    return _mm256_loadu_pd(at);
  } else if constexpr (std::is_same_v<T, float>) {
    return _mm256_cvtps_pd(_mm_loadu_ps(at));
  } else {
    return _mm256_set_pd(to_double(at[3]), to_double(at[2]), to_double(at[1]), to_double(at[0]));
  }
}

__attribute__((target("avx2"))) inline double lane_sum(__m256d v) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, v);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

template <typename T>
__attribute__((target("avx2,fma"))) double squared_norm(const T* row, int64_t dims) {
  __m256d norm2 = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 4 <= dims; j += 4) {
    const __m256d v = load4(row + j);
    norm2 = _mm256_fmadd_pd(v, v, norm2);
  }
  double total = lane_sum(norm2);
  for (; j < dims; ++j) total += to_double(row[j]) * to_double(row[j]);
  return total;
}

// A row's statistics in the ranking frame: the row (unit-normalised for cosine)
// less `center`. Rounding in these is harmless: the quantisation error is
// measured afterwards, and the rest is far inside kRoundingSlack.
template <typename T>
__attribute__((target("avx2,fma"))) RowStats row_scale(const T* row, int64_t dims, bool cosine, const double* center,
                                                       double* normalize) {
  *normalize = cosine ? 1.0 / std::max(std::sqrt(squared_norm(row, dims)), kNormFloor) : 1.0;
  const __m256d sign = _mm256_set1_pd(-0.0), to_unit = _mm256_set1_pd(*normalize);
  __m256d norm2 = _mm256_setzero_pd(), max_abs = _mm256_setzero_pd(), center_dot = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 4 <= dims; j += 4) {
    const __m256d c = _mm256_loadu_pd(center + j);
    const __m256d v = _mm256_sub_pd(_mm256_mul_pd(load4(row + j), to_unit), c);
    norm2 = _mm256_fmadd_pd(v, v, norm2);
    center_dot = _mm256_fmadd_pd(v, c, center_dot);
    max_abs = _mm256_max_pd(max_abs, _mm256_andnot_pd(sign, v));
  }
  alignas(32) double highest[4];
  _mm256_store_pd(highest, max_abs);
  RowStats stats;
  double row_norm2 = lane_sum(norm2);
  stats.center_dot = lane_sum(center_dot);
  double row_max = std::max(std::max(highest[0], highest[1]), std::max(highest[2], highest[3]));
  for (; j < dims; ++j) {
    const double v = to_double(row[j]) * *normalize - center[j];
    row_norm2 += v * v;
    stats.center_dot += v * center[j];
    row_max = std::max(row_max, std::abs(v));
  }
  stats.norm = std::sqrt(row_norm2);
  stats.scale = row_max > 0 ? row_max / kQuantMax : 1.0;
  return stats;
}

// Quantise features [begin, end) of a row in the frame (begin even): feature j
// goes to out[(j / 2) * pitch + j % 2]. Returns the sum of squared rounding errors.
template <typename T>
__attribute__((target("avx2,fma"))) double quantize_columns(const T* row, const double* center, int64_t begin,
                                                            int64_t end, double normalize, double scale, int16_t* out,
                                                            int64_t pitch) {
  const __m256d to_unit = _mm256_set1_pd(normalize), inverse_scale = _mm256_set1_pd(1.0 / scale);
  const __m256d step = _mm256_set1_pd(scale), limit = _mm256_set1_pd(kQuantMax);
  const __m256d negative_limit = _mm256_set1_pd(-kQuantMax);
  __m256d error2 = _mm256_setzero_pd();
  int64_t j = begin;
  for (; j + 4 <= end; j += 4) {
    const __m256d v = _mm256_sub_pd(_mm256_mul_pd(load4(row + j), to_unit), _mm256_loadu_pd(center + j));
    __m256d q = _mm256_round_pd(_mm256_mul_pd(v, inverse_scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_pd(_mm256_max_pd(q, negative_limit), limit);
    const __m256d residual = _mm256_fnmadd_pd(q, step, v);
    error2 = _mm256_fmadd_pd(residual, residual, error2);
    const __m128i pairs = _mm_packs_epi32(_mm256_cvtpd_epi32(q), _mm_setzero_si128());
    const int32_t first = _mm_cvtsi128_si32(pairs), second = _mm_extract_epi32(pairs, 1);
    std::memcpy(out + (j >> 1) * pitch, &first, sizeof(first));
    std::memcpy(out + ((j >> 1) + 1) * pitch, &second, sizeof(second));
  }
  double total = lane_sum(error2);
  for (; j < end; ++j) {
    const double v = to_double(row[j]) * normalize - center[j];
    const double q = std::min<double>(kQuantMax, std::max<double>(-kQuantMax, std::nearbyint(v / scale)));
    out[(j >> 1) * pitch + (j & 1)] = static_cast<int16_t>(q);
    total += (v - q * scale) * (v - q * scale);
  }
  return total;
}

// Pack rows [begin, begin + count) into panels of `panel` rows: panel p, step t
// holds (row, feature 2t, 2t + 1) at ((p * steps + t) * panel + row) * 2. Rows past
// `count` are zero, with zero statistics. A panel is quantised kPackColumns
// features at a time across its rows, so the interleaved stores stay in L1.
template <typename T>
void pack_rows(const T* x, int64_t stride, int64_t begin, int64_t count, int64_t dims, bool cosine,
               const double* center, int panel, int16_t* packed, RowStats* stats) {
  constexpr int64_t kPackColumns = 256;
  const int64_t steps = (dims + 1) / 2;
  const int64_t panels = (count + panel - 1) / panel;
  std::vector<double> normalize(panel), error2(panel);
  for (int64_t p = 0; p < panels; ++p) {
    int16_t* panel_out = packed + p * steps * panel * 2;
    const int64_t rows = std::min<int64_t>(panel, count - p * panel);
    for (int64_t r = 0; r < panel; ++r) {
      error2[r] = 0;
      if (r < rows) {
        stats[p * panel + r] = row_scale(x + (begin + p * panel + r) * stride, dims, cosine, center, &normalize[r]);
      } else {
        stats[p * panel + r] = RowStats{};
        for (int64_t t = 0; t < steps; ++t) panel_out[(t * panel + r) * 2] = panel_out[(t * panel + r) * 2 + 1] = 0;
      }
    }
    for (int64_t first = 0; first < dims; first += kPackColumns) {
      for (int64_t r = 0; r < rows; ++r) {
        error2[r] += quantize_columns(x + (begin + p * panel + r) * stride, center, first,
                                      std::min(dims, first + kPackColumns), normalize[r],
                                      stats[p * panel + r].scale, panel_out + r * 2, 2 * panel);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (dims & 1) panel_out[((dims >> 1) * panel + r) * 2 + 1] = 0;
      stats[p * panel + r].error_norm = std::sqrt(error2[r]);
    }
  }
}

#define ALPHANET_ROW_STEP(offset, acc0, acc1)                \
  "vpbroadcastd " #offset "(%[a]), %%ymm14\n\t"             \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"                  \
  "vpaddd %%ymm15, %%" #acc0 ", %%" #acc0 "\n\t"            \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"                  \
  "vpaddd %%ymm15, %%" #acc1 ", %%" #acc1 "\n\t"

// c[6 x 16] (+)= a_panel . b_panel over `steps` feature pairs, exactly (the
// int32 sums widen to float64, which holds every integer below 2^53). Written in
// assembly because compilers spill some of the 12 accumulators: AVX2 has no
// int16 multiply-accumulate, so each row needs a temporary, and the kernel uses
// all 16 ymm registers.
__attribute__((target("avx2"))) void panel_product(const int16_t* a, const int16_t* b, int64_t steps, double* c,
                                                   bool accumulate) {
  alignas(32) int32_t tile[kPanelQueries * kPanelKeys];
  __asm__ volatile(
      "vpxor %%xmm0, %%xmm0, %%xmm0\n\t"
      "vpxor %%xmm1, %%xmm1, %%xmm1\n\t"
      "vpxor %%xmm2, %%xmm2, %%xmm2\n\t"
      "vpxor %%xmm3, %%xmm3, %%xmm3\n\t"
      "vpxor %%xmm4, %%xmm4, %%xmm4\n\t"
      "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"
      "vpxor %%xmm6, %%xmm6, %%xmm6\n\t"
      "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"
      "vpxor %%xmm8, %%xmm8, %%xmm8\n\t"
      "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"
      "vpxor %%xmm10, %%xmm10, %%xmm10\n\t"
      "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"
      "test %[steps], %[steps]\n\t"
      "jz 2f\n\t"
      "1:\n\t"
      "vmovdqu (%[b]), %%ymm12\n\t"
      "vmovdqu 32(%[b]), %%ymm13\n\t"
      ALPHANET_ROW_STEP(0, ymm0, ymm1)
      ALPHANET_ROW_STEP(4, ymm2, ymm3)
      ALPHANET_ROW_STEP(8, ymm4, ymm5)
      ALPHANET_ROW_STEP(12, ymm6, ymm7)
      ALPHANET_ROW_STEP(16, ymm8, ymm9)
      ALPHANET_ROW_STEP(20, ymm10, ymm11)
      "add $24, %[a]\n\t"
      "add $64, %[b]\n\t"
      "dec %[steps]\n\t"
      "jnz 1b\n\t"
      "2:\n\t"
      "vmovdqa %%ymm0, 0(%[tile])\n\t"
      "vmovdqa %%ymm1, 32(%[tile])\n\t"
      "vmovdqa %%ymm2, 64(%[tile])\n\t"
      "vmovdqa %%ymm3, 96(%[tile])\n\t"
      "vmovdqa %%ymm4, 128(%[tile])\n\t"
      "vmovdqa %%ymm5, 160(%[tile])\n\t"
      "vmovdqa %%ymm6, 192(%[tile])\n\t"
      "vmovdqa %%ymm7, 224(%[tile])\n\t"
      "vmovdqa %%ymm8, 256(%[tile])\n\t"
      "vmovdqa %%ymm9, 288(%[tile])\n\t"
      "vmovdqa %%ymm10, 320(%[tile])\n\t"
      "vmovdqa %%ymm11, 352(%[tile])\n\t"
      "vzeroupper\n\t"
      : [a] "+r"(a), [b] "+r"(b), [steps] "+r"(steps)
      : [tile] "r"(tile)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
  for (int i = 0; i < kPanelQueries * kPanelKeys; i += 4) {
    __m256d sums = _mm256_cvtepi32_pd(_mm_load_si128(reinterpret_cast<const __m128i*>(tile + i)));
    if (accumulate) sums = _mm256_add_pd(_mm256_loadu_pd(c + i), sums);
    _mm256_storeu_pd(c + i, sums);
  }
}
#undef ALPHANET_ROW_STEP

// Per query: the keys whose lower bound is within the running threshold, and a
// max-heap of the k smallest upper bounds (its top is the threshold).
class QueryCandidates {
 public:
  void consider(double lower, double upper, int64_t key, int64_t k) {
    if (lower > threshold(k)) return;
    candidates_.push_back({lower, key});
    if (static_cast<int64_t>(uppers_.size()) < k) {
      uppers_.push_back(upper);
      std::push_heap(uppers_.begin(), uppers_.end());
    } else if (upper < uppers_.front()) {
      std::pop_heap(uppers_.begin(), uppers_.end());
      uppers_.back() = upper;
      std::push_heap(uppers_.begin(), uppers_.end());
    }
    if (candidates_.size() >= compact_at_) {
      drop_ruled_out(k);
      compact_at_ = std::max<size_t>(compact_at_, 2 * candidates_.size());
    }
  }

  double threshold(int64_t k) const {
    return static_cast<int64_t>(uppers_.size()) < k ? std::numeric_limits<double>::infinity() : uppers_.front();
  }

  const std::vector<std::pair<double, int64_t>>& remaining(int64_t k) {
    drop_ruled_out(k);
    return candidates_;
  }

 private:
  void drop_ruled_out(int64_t k) {
    const double limit = threshold(k);
    candidates_.erase(std::remove_if(candidates_.begin(), candidates_.end(),
                                     [limit](const auto& c) { return c.first > limit; }),
                      candidates_.end());
  }

  std::vector<std::pair<double, int64_t>> candidates_;
  std::vector<double> uppers_;
  size_t compact_at_ = 64;
};

// One tile of packed keys and, per key (zero past `count`), what the bounds need.
struct KeyTile {
  int64_t begin = 0, count = 0, panels = 0;
  std::vector<int16_t> packed;
  std::vector<RowStats> stats;
  std::vector<double> scale, norm, error_norm, offset, slack;

  template <typename T>
  void pack(const ScreenedKnnParams& p, int64_t first_key) {
    const int64_t steps = (p.dims + 1) / 2;
    begin = first_key;
    count = std::min(kKeyTile, p.num_keys - begin);
    panels = (count + kPanelKeys - 1) / kPanelKeys;
    const int64_t padded = panels * kPanelKeys;
    packed.resize(padded * steps * 2);
    stats.resize(padded);
    at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
      for (int64_t panel = first; panel < last; ++panel) {
        const int64_t row = panel * kPanelKeys;
        pack_rows(static_cast<const T*>(p.keys), p.key_stride, begin + row,
                  std::min<int64_t>(kPanelKeys, count - row), p.dims, p.cosine, p.center, kPanelKeys,
                  packed.data() + row * steps * 2, stats.data() + row);
      }
    });
    for (auto* column : {&scale, &norm, &error_norm, &offset, &slack}) column->resize(padded);
    for (int64_t j = 0; j < padded; ++j) {
      scale[j] = stats[j].scale;
      norm[j] = stats[j].norm;
      error_norm[j] = stats[j].error_norm;
      offset[j] = p.cosine ? -stats[j].center_dot : stats[j].norm * stats[j].norm;
      slack[j] = kRoundingSlack * (p.cosine ? 0.5 : offset[j]);
    }
  }
};

template <typename T>
void screen_block(const ScreenedKnnParams& p, const KeyTile& keys, int64_t q_begin, int64_t q_count,
                  std::vector<QueryCandidates>& states) {
  const int64_t steps = (p.dims + 1) / 2;
  const int64_t q_panels = (q_count + kPanelQueries - 1) / kPanelQueries;
  std::vector<int16_t> packed(q_panels * kPanelQueries * steps * 2);
  std::vector<RowStats> q_stats(q_panels * kPanelQueries);
  pack_rows(static_cast<const T*>(p.queries), p.query_stride, q_begin, q_count, p.dims, p.cosine, p.center,
            kPanelQueries, packed.data(), q_stats.data());
  std::vector<double> products(q_panels * kPanelQueries * kPanelKeys);
  const double factor = p.cosine ? 1.0 : 2.0;

  for (int64_t kp = 0; kp < keys.panels; ++kp) {
    const int16_t* key_panel = keys.packed.data() + kp * steps * kPanelKeys * 2;
    for (int64_t step = 0; step == 0 || step < steps; step += kChunkSteps) {
      const int64_t len = std::min(kChunkSteps, steps - step);
      for (int64_t qp = 0; qp < q_panels; ++qp) {
        panel_product(packed.data() + (qp * steps + step) * kPanelQueries * 2, key_panel + step * kPanelKeys * 2,
                      len, products.data() + qp * kPanelQueries * kPanelKeys, step > 0);
      }
    }
    const int64_t first = kp * kPanelKeys;
    const int64_t key_count = std::min<int64_t>(kPanelKeys, keys.count - first);
    const double* scale = keys.scale.data() + first;
    const double* norm = keys.norm.data() + first;
    const double* error_norm = keys.error_norm.data() + first;
    const double* offset = keys.offset.data() + first;
    const double* slack = keys.slack.data() + first;
    for (int64_t r = 0; r < q_count; ++r) {
      const RowStats& q = q_stats[r];
      const double q_scale = factor * q.scale;
      const double q_rounded_norm = q.norm + q.error_norm;  // bounds ||q_hat||
      const double q_slack = kRoundingSlack * (p.cosine ? 0.5 : q.norm * q.norm);
      const double* row_products = products.data() + r * kPanelKeys;
      double lower[kPanelKeys], upper[kPanelKeys];
      for (int j = 0; j < kPanelKeys; ++j) {  // vectorised
        const double estimate = offset[j] - q_scale * scale[j] * row_products[j];
        const double bound = factor * (q_rounded_norm * error_norm[j] + q.error_norm * norm[j]) + q_slack + slack[j];
        lower[j] = estimate - bound;
        upper[j] = estimate + bound;
      }
      QueryCandidates& state = states[q_begin + r];
      double limit = state.threshold(p.k);
      for (int64_t j = 0; j < key_count; ++j) {
        if (lower[j] > limit) continue;
        state.consider(lower[j], upper[j], keys.begin + first + j, p.k);
        limit = state.threshold(p.k);
      }
    }
  }
}

// Ranks the query's remaining candidates in float64; returns how many there were.
template <typename T>
int64_t finish_query(const ScreenedKnnParams& p, int64_t q, QueryCandidates& state) {
  using V = acc_t<T>;
  const T* queries = static_cast<const T*>(p.queries);
  const T* keys = static_cast<const T*>(p.keys);
  std::vector<std::pair<double, int64_t>> ranked;
  for (const auto& candidate : state.remaining(p.k)) {
    DistanceTerms terms;
    add_distance_terms(queries + q * p.query_stride, keys + candidate.second * p.key_stride, 0, p.dims, 1, p.cosine,
                       terms);
    ranked.push_back({finish_distance(terms, p.cosine), candidate.second});
  }
  std::partial_sort(ranked.begin(), ranked.begin() + p.k, ranked.end());
  V* distances = static_cast<V*>(p.distances) + q * p.k;
  for (int64_t i = 0; i < p.k; ++i) {
    distances[i] = static_cast<V>(ranked[i].first);
    p.indices[q * p.k + i] = ranked[i].second;
  }
  return static_cast<int64_t>(ranked.size());
}

}  // namespace

bool knn_screening_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

void knn_screened(const ScreenedKnnParams& p) {
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t threads = at::get_num_threads();
    // Small problems still give every thread a block.
    const int64_t per_thread = (p.num_queries + threads - 1) / threads;
    const int64_t block = std::clamp<int64_t>((per_thread + kPanelQueries - 1) / kPanelQueries * kPanelQueries,
                                              kPanelQueries, kQueryBlock);
    const int64_t num_blocks = (p.num_queries + block - 1) / block;
    std::vector<QueryCandidates> states(p.num_queries);
    KeyTile tile;
    for (int64_t first_key = 0; first_key < p.num_keys; first_key += kKeyTile) {
      tile.pack<T>(p, first_key);
      at::parallel_for(0, num_blocks, 1, [&](int64_t first, int64_t last) {
        for (int64_t b = first; b < last; ++b) {
          screen_block<T>(p, tile, b * block, std::min(block, p.num_queries - b * block), states);
        }
      });
    }
    at::parallel_for(0, p.num_queries, 16, [&](int64_t first, int64_t last) {
      int64_t ranked = 0;
      for (int64_t q = first; q < last; ++q) ranked += finish_query<T>(p, q, states[q]);
      screened_candidates += ranked;
    });
  });
}
#else
bool knn_screening_supported() { return false; }
void knn_screened(const ScreenedKnnParams&) { TORCH_CHECK(false, "knn: screened kNN needs x86-64 with AVX2"); }
#endif

}  // namespace alphanet::cpu
