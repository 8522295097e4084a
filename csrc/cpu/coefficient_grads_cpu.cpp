// The first layer of the coefficient networks on the CPU: its input is fixed for
// a whole fit, so it is packed once (see InputProductParams) and both products
// stream it without the per-call packing a BLAS does, which at iNaturalist size
// (a 222 MB input) took as long as the arithmetic.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

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
// of inputs_t[row0 + i, class] * b[class, 0:16].
ALPHANET_AVX2 void backward_tile(const InputProductParams& p, int64_t row0, int64_t panel_begin, int64_t panel_end,
                                 const float* b, float* c, bool zero) {
  const int64_t c_stride = p.columns;
  ALPHANET_FOR_ROWS(ALPHANET_LOAD)
  constexpr int64_t a_row = kInputPanel;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const float* block = p.panels + (panel * p.padded_dims + row0) * kInputPanel;  // [6 rows][6 classes]
    const int64_t classes = std::min<int64_t>(kInputPanel, p.num_few - panel * kInputPanel);
    for (int64_t j = 0; j < classes; ++j) {
      const float* a = block + j;
      const float* row = b + (panel * kInputPanel + j) * p.columns;
      const __m256 b0 = _mm256_loadu_ps(row), b1 = _mm256_loadu_ps(row + 8);
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

}  // namespace

bool input_products_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

void input_product_forward(const InputProductParams& p) {
  // out[panel * 6 + i, :] = sum_d panels[panel, d, i] * right[d, :], depth chunk by chunk.
  split(p.num_panels, [&](int64_t panel_begin, int64_t panel_end) {
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
    for (int64_t chunk = 0; chunk == 0 || chunk < p.num_panels; chunk += kPanelChunk) {
      const int64_t chunk_end = std::min(chunk + kPanelChunk, p.num_panels);
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        for (int64_t column = 0; column < p.columns; column += kTileColumns) {
          backward_tile(p, tile * kInputPanel, chunk, chunk_end, p.right + column,
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
