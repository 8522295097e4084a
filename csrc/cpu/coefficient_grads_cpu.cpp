// The first layer of the coefficient networks on the CPU: its input is fixed for
// a whole fit, so it is packed once (see InputProductParams) and both products
// stream it without the per-call packing a BLAS does, which at iNaturalist size
// (a 222 MB input) took as long as the arithmetic. Or the input is gathered:
// each panel is laid out from a table of rows as it is used, with the packed
// panel's values in the packed panel's places, so both give the same bits; the
// input is never held whole, for 1.15-1.3x the time of the whole step op (RESULTS.md).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "../coefficient_grads_params.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ALPHANET_INPUT_PRODUCTS 1
#endif

namespace alphanet::cpu {

#ifdef ALPHANET_INPUT_PRODUCTS
namespace {

constexpr int kTileColumns = 16;    // a 6 x 16 tile: 12 ymm accumulators
constexpr int64_t kDepthChunk = 1024;  // forward: rows of `right` (128 KB at 32 columns) kept in L2 across panels
constexpr int64_t kPanelChunk = 8;     // backward: panels of classes per pass; each is a memory stream, and
                                        // the hardware prefetchers follow only a few streams at once

#define ALPHANET_AVX2 __attribute__((target("avx2,fma")))

// A 6 x 16 output block lives in twelve named ymm accumulators (an array of
// them, indexed in loops, was kept in memory by GCC: a store after every FMA).
#define ALPHANET_FOR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define ALPHANET_LOAD(i)                                                     \
  __m256 acc##i##a = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * c_stride); \
  __m256 acc##i##b = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * c_stride + 8);
#define ALPHANET_STORE(i)                          \
  _mm256_storeu_ps(c + i * c_stride, acc##i##a); \
  _mm256_storeu_ps(c + i * c_stride + 8, acc##i##b);
// acc[i, :] += a[i * a_row] * (b0, b1)
#define ALPHANET_ADD_OUTER(i)                                 \
  {                                                           \
    const __m256 value = _mm256_broadcast_ss(a + i * a_row); \
    acc##i##a = _mm256_fmadd_ps(value, b0, acc##i##a);       \
    acc##i##b = _mm256_fmadd_ps(value, b1, acc##i##b);       \
  }

// c[6 x 16] = (zero ? 0 : c) + sum over depth steps of panel[step, :]^T (x) b[step, 0:16].
ALPHANET_AVX2 void forward_tile(const float* panel, const float* b, int64_t b_stride, int64_t steps, float* c,
                                int64_t c_stride, bool zero) {
  ALPHANET_FOR_ROWS(ALPHANET_LOAD)
  constexpr int64_t a_row = 1;
  for (int64_t step = 0; step < steps; ++step) {
    const float* a = panel + step * kInputPanel;
    const __m256 b0 = _mm256_loadu_ps(b + step * b_stride), b1 = _mm256_loadu_ps(b + step * b_stride + 8);
    ALPHANET_FOR_ROWS(ALPHANET_ADD_OUTER)
  }
  ALPHANET_FOR_ROWS(ALPHANET_STORE)
}

// c[6 x 16] = (zero ? 0 : c) + sum over the classes of panels [panel_begin, panel_end)
// of inputs_t[row0 + i, class] * b[class, 0:16]. Panel q's rows are read from
// panels + (q - panel_begin) * panel_stride + row * kInputPanel.
ALPHANET_AVX2 void backward_tile(const InputProductParams& p, const float* panels, int64_t panel_stride, int64_t row,
                                 int64_t panel_begin, int64_t panel_end, const float* b, float* c, bool zero) {
  const int64_t c_stride = p.columns;
  ALPHANET_FOR_ROWS(ALPHANET_LOAD)
  constexpr int64_t a_row = kInputPanel;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const float* block = panels + (panel - panel_begin) * panel_stride + row * kInputPanel;  // [6 rows][6 classes]
    const int64_t classes = std::min<int64_t>(kInputPanel, p.num_few - panel * kInputPanel);
    for (int64_t j = 0; j < classes; ++j) {
      const float* a = block + j;
      const float* row_b = b + (panel * kInputPanel + j) * p.columns;
      const __m256 b0 = _mm256_loadu_ps(row_b), b1 = _mm256_loadu_ps(row_b + 8);
      ALPHANET_FOR_ROWS(ALPHANET_ADD_OUTER)
    }
  }
  ALPHANET_FOR_ROWS(ALPHANET_STORE)
}

#undef ALPHANET_ADD_OUTER
#undef ALPHANET_STORE
#undef ALPHANET_LOAD
#undef ALPHANET_FOR_ROWS

// Contiguous shares of [0, total) per thread, so each output element has one
// owner and one summation order whatever the thread count.
template <typename F>
void split(int64_t total, const F& body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) body(total * t / threads, total * (t + 1) / threads);
  });
}

// target[t * 6 + j] = sources[j][t * steps[j]] for t < count (a multiple of 8): six
// rows read eight values at a time, written as 8 x 6 by a register transpose.
ALPHANET_AVX2 void transpose_rows(const float* const* sources, const int64_t* steps, int64_t count, float* target) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256i first_six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
  for (int64_t t = 0; t < count; t += 8, target += 8 * kInputPanel) {
    __m256 r[8];
    for (int j = 0; j < kInputPanel; ++j) r[j] = steps[j] ? _mm256_loadu_ps(sources[j] + t) : zero;
    r[6] = r[7] = zero;
    __m256 u[8], v[8];
    for (int j = 0; j < 8; j += 2) {
      u[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
      u[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 8; j += 4) {
      v[j] = _mm256_shuffle_ps(u[j], u[j + 2], 0x44);
      v[j + 1] = _mm256_shuffle_ps(u[j], u[j + 2], 0xEE);
      v[j + 2] = _mm256_shuffle_ps(u[j + 1], u[j + 3], 0x44);
      v[j + 3] = _mm256_shuffle_ps(u[j + 1], u[j + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {  // row i and row i + 4 of the transpose: value t + i and t + i + 4
      r[i] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x20);
      r[i + 4] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x31);
    }
    // each row's last two lanes (the padding rows' zeros) are overwritten by the next row
    for (int i = 0; i < 7; ++i) _mm256_storeu_ps(target + i * kInputPanel, r[i]);
    _mm256_maskstore_ps(target + 7 * kInputPanel, first_six, r[7]);
  }
}

// Rows [row_begin, row_end) of gathered panel `panel`, laid out as a packed panel's
// ([row][slot], zeros past dims and num_few): the same values in the same places, so
// the tiles sum them in the same order and a gathered input gives the packed one's bits.
void gather_panel(const InputProductParams& p, int64_t panel, int64_t row_begin, int64_t row_end, float* out) {
  const int64_t classes = std::min<int64_t>(kInputPanel, p.num_few - panel * kInputPanel);
  const int64_t last = std::min(row_end, p.dims);
  static const float zeros[1] = {0.0f};
  for (int64_t row = row_begin; row < last;) {  // a run of rows within one part: six sources, read in step
    const int64_t part = row / p.row_width, offset = row % p.row_width;
    const int64_t count = std::min(p.row_width - offset, last - row);
    const float* sources[kInputPanel];
    int64_t steps[kInputPanel];
    for (int64_t j = 0; j < kInputPanel; ++j) {
      const bool real = j < classes;
      sources[j] = real ? p.table + p.ids[(panel * kInputPanel + j) * p.parts + part] * p.row_width + offset : zeros;
      steps[j] = real ? 1 : 0;
    }
    float* target = out + (row - row_begin) * kInputPanel;
    const int64_t whole = count / 8 * 8;
    transpose_rows(sources, steps, whole, target);
    for (int64_t t = whole; t < count; ++t) {
      for (int64_t j = 0; j < kInputPanel; ++j) target[t * kInputPanel + j] = sources[j][t * steps[j]];
    }
    row += count;
  }
  std::fill(out + (std::max(last, row_begin) - row_begin) * kInputPanel, out + (row_end - row_begin) * kInputPanel,
            0.0f);
}

}  // namespace

bool input_products_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

void input_product_forward(const InputProductParams& p) {
  // out[panel * 6 + i, :] = sum_d panels[panel, d, i] * right[d, :], depth chunk by chunk.
  split(p.num_panels, [&](int64_t panel_begin, int64_t panel_end) {
    if (p.table != nullptr) {  // each panel laid out once, then all its depth chunks (the same sums, in order)
      std::vector<float> panel_rows(p.padded_dims * kInputPanel);
      for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
        gather_panel(p, panel, 0, p.padded_dims, panel_rows.data());
        for (int64_t depth = 0; depth == 0 || depth < p.dims; depth += kDepthChunk) {
          const int64_t steps = std::min(kDepthChunk, p.dims - depth);
          for (int64_t column = 0; column < p.columns; column += kTileColumns) {
            forward_tile(panel_rows.data() + depth * kInputPanel, p.right + depth * p.columns + column, p.columns,
                         steps, p.out + panel * kInputPanel * p.columns + column, p.columns, depth == 0);
          }
        }
      }
      return;
    }
    for (int64_t depth = 0; depth == 0 || depth < p.dims; depth += kDepthChunk) {
      const int64_t steps = std::min(kDepthChunk, p.dims - depth);
      for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
        for (int64_t column = 0; column < p.columns; column += kTileColumns) {
          forward_tile(p.panels + (panel * p.padded_dims + depth) * kInputPanel, p.right + depth * p.columns + column,
                       p.columns, steps, p.out + panel * kInputPanel * p.columns + column, p.columns, depth == 0);
        }
      }
    }
  });
}

void input_product_backward(const InputProductParams& p) {
  // out[d, :] = sum_c inputs_t[d, c] * right[c, :], six rows at a time, kPanelChunk panels of classes at a time.
  split(p.padded_dims / kInputPanel, [&](int64_t tile_begin, int64_t tile_end) {
    // gathered: this thread's rows of a chunk's panels, laid out once per chunk
    const int64_t row_begin = tile_begin * kInputPanel, rows = (tile_end - tile_begin) * kInputPanel;
    std::vector<float> chunk_rows(p.table != nullptr ? kPanelChunk * rows * kInputPanel : 0);
    for (int64_t chunk = 0; chunk == 0 || chunk < p.num_panels; chunk += kPanelChunk) {
      const int64_t chunk_end = std::min(chunk + kPanelChunk, p.num_panels);
      const float* panels = p.table != nullptr ? nullptr : p.panels + chunk * p.padded_dims * kInputPanel;
      int64_t panel_stride = p.padded_dims * kInputPanel, first_row = 0;
      if (p.table != nullptr) {
        for (int64_t panel = chunk; panel < chunk_end; ++panel) {
          gather_panel(p, panel, row_begin, row_begin + rows, chunk_rows.data() + (panel - chunk) * rows * kInputPanel);
        }
        panels = chunk_rows.data();
        panel_stride = rows * kInputPanel;
        first_row = row_begin;
      }
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        for (int64_t column = 0; column < p.columns; column += kTileColumns) {
          backward_tile(p, panels, panel_stride, tile * kInputPanel - first_row, chunk, chunk_end, p.right + column,
                        p.out + tile * kInputPanel * p.columns + column, chunk == 0);
        }
      }
    }
  });
}

#else
bool input_products_supported() { return false; }
void input_product_forward(const InputProductParams&) { TORCH_CHECK(false, "packed inputs need x86-64 with AVX2"); }
void input_product_backward(const InputProductParams&) { TORCH_CHECK(false, "packed inputs need x86-64 with AVX2"); }
#endif

}  // namespace alphanet::cpu
