#include <ATen/Parallel.h>

#include <vector>

#include "../alpha_combine_params.h"
#include "../device_functions.h"
#include "row_loops.h"

namespace alphanet::cpu {
namespace {

// Normalised coefficients alphas[c] / ||alphas[c]||_1, row-major [num_out, k].
template <typename A>
std::vector<A> normalized_alphas(const CombineParams& p) {
  const A* alphas = static_cast<const A*>(p.alphas);
  std::vector<A> weights(p.num_out * p.k);
  for (int64_t c = 0; c < p.num_out; ++c) {
    A norm = l1_norm<A>(alphas + c * p.k, 1, p.k);
    for (int64_t i = 0; i < p.k; ++i) weights[c * p.k + i] = alphas[c * p.k + i] / norm;
  }
  return weights;
}

// sum_j a[j] * b[j] over unit-stride rows, in kLanes interleaved partial sums
// folded pairwise: one running sum would wait on every add's latency, and the
// compiler may not reorder a floating-point sum itself. The order is fixed,
// so the result does not depend on the thread count.
template <typename A, typename T>
ALPHANET_AVX2_CLONES A unit_stride_dot(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 16;
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<A>(a[j + l]) * static_cast<A>(b[j + l]);
  }
  for (int l = 0; j < n; ++j, ++l) lanes[l] += static_cast<A>(a[j]) * static_cast<A>(b[j]);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// Calls visit(c, line, weight) for the target (weight 1) then each neighbour of
// output line c: the one accumulation order every kernel here uses.
template <typename A, typename F>
inline void for_each_term(const CombineParams& p, const std::vector<A>& weights, int64_t c, F&& visit) {
  visit(p.targets[c], A(1));
  for (int64_t i = 0; i < p.k; ++i) visit(p.neighbors[c * p.k + i], weights[c * p.k + i]);
}

template <typename T>
void forward(const CombineParams& p) {
  using A = acc_t<T>;
  const T* source = static_cast<const T*>(p.source);
  T* out = static_cast<T*>(p.out);
  const std::vector<A> weights = normalized_alphas<A>(p);
  if (p.elem_stride == 1) {
    // Rows of the source (classifier rows): contiguous element loops.
    at::parallel_for(0, p.num_out, 1, [&](int64_t c_begin, int64_t c_end) {
      std::vector<A> acc(p.elems);
      for (int64_t c = c_begin; c < c_end; ++c) {
        std::fill(acc.begin(), acc.end(), A(0));
        for_each_term(p, weights, c, [&](int64_t line, A weight) {
          add_scaled_row(acc.data(), weight, source + line * p.line_stride, p.elems);
        });
        T* dst = out + c * p.out_line_stride;
        if (p.out_elem_stride == 1) {
          store_row(dst, acc.data(), p.elems);
        } else {
          for (int64_t j = 0; j < p.elems; ++j) dst[j * p.out_elem_stride] = static_cast<T>(acc[j]);
        }
      }
    });
  } else {
    // Columns of the source (logits): each element is a row, gathered in place.
    at::parallel_for(0, p.elems, 1, [&](int64_t j_begin, int64_t j_end) {
      for (int64_t j = j_begin; j < j_end; ++j) {
        const T* src = source + j * p.elem_stride;
        for (int64_t c = 0; c < p.num_out; ++c) {
          A acc = A(0);
          for_each_term(p, weights, c, [&](int64_t line, A weight) {
            acc += weight * static_cast<A>(src[line * p.line_stride]);
          });
          out[c * p.out_line_stride + j * p.out_elem_stride] = static_cast<T>(acc);
        }
      }
    });
  }
}

template <typename T>
void backward(const CombineBackwardParams& b) {
  using A = acc_t<T>;
  const CombineParams& p = b.forward;
  const T* source = static_cast<const T*>(p.source);
  const T* grad_out = static_cast<const T*>(b.grad_out);
  const A* alphas = static_cast<const A*>(p.alphas);
  auto grad_at = [&](int64_t c, int64_t j) {
    return static_cast<A>(grad_out[c * p.out_line_stride + j * p.out_elem_stride]);
  };

  if (b.grad_alphas != nullptr) {
    A* grad_alphas = static_cast<A*>(b.grad_alphas);
    // Each gradient of a normalised coefficient is a dot product over the elements.
    at::parallel_for(0, p.num_out, 1, [&](int64_t c_begin, int64_t c_end) {
      std::vector<A> dots((c_end - c_begin) * p.k, A(0));
      if (p.elem_stride == 1 && p.out_elem_stride == 1) {  // rows: unit strides, vectorisable
        for (int64_t c = c_begin; c < c_end; ++c) {
          const T* grad_row = grad_out + c * p.out_line_stride;
          for (int64_t i = 0; i < p.k; ++i) {
            const T* src = source + p.neighbors[c * p.k + i] * p.line_stride;
            dots[(c - c_begin) * p.k + i] = unit_stride_dot<A>(grad_row, src, p.elems);
          }
        }
      } else {
        // Columns: element j is a row of source and of grad_out. Walking those
        // rows once, in order, reads each from cache for all classes; a dot
        // product per class and neighbour would stride through all of memory.
        for (int64_t j = 0; j < p.elems; ++j) {
          const T* src = source + j * p.elem_stride;
          const T* grad_row = grad_out + j * p.out_elem_stride;
          for (int64_t c = c_begin; c < c_end; ++c) {
            const A g = static_cast<A>(grad_row[c * p.out_line_stride]);
            A* dot = dots.data() + (c - c_begin) * p.k;
            for (int64_t i = 0; i < p.k; ++i) dot[i] += g * static_cast<A>(src[p.neighbors[c * p.k + i] * p.line_stride]);
          }
        }
      }
      for (int64_t c = c_begin; c < c_end; ++c) {
        const A norm = l1_norm<A>(alphas + c * p.k, 1, p.k);
        const A* grad_normalized = dots.data() + (c - c_begin) * p.k;
        for (int64_t i = 0; i < p.k; ++i) {
          grad_alphas[c * p.k + i] = l1_normalized_grad<A>(alphas + c * p.k, 1, grad_normalized, p.k, i, norm);
        }
      }
    });
  }

  if (b.grad_source != nullptr) {
    A* grad_source = static_cast<A*>(b.grad_source);
    const std::vector<A> weights = normalized_alphas<A>(p);
    // Threads own disjoint element ranges; within one, classes are added in
    // order, so the result is race-free and independent of the thread count.
    at::parallel_for(0, p.elems, b.grad_elem_stride == 1 ? 64 : 1, [&](int64_t j_begin, int64_t j_end) {
      auto add_class = [&](int64_t c, int64_t j) {
        const A g = grad_at(c, j);
        for_each_term(p, weights, c, [&](int64_t line, A weight) {
          grad_source[line * b.grad_line_stride + j * b.grad_elem_stride] += weight * g;
        });
      };
      if (b.grad_elem_stride == 1 && p.out_elem_stride == 1) {
        // Rows: a line's elements are contiguous, so the element loop goes
        // innermost (vectorised); each element still takes its terms in order.
        for (int64_t c = 0; c < p.num_out; ++c) {
          const T* grad_row = grad_out + c * p.out_line_stride;
          for_each_term(p, weights, c, [&](int64_t line, A weight) {
            add_scaled_row(grad_source + line * b.grad_line_stride + j_begin, weight, grad_row + j_begin,
                           j_end - j_begin);
          });
        }
      } else if (b.grad_elem_stride == 1) {
        for (int64_t c = 0; c < p.num_out; ++c)
          for (int64_t j = j_begin; j < j_end; ++j) add_class(c, j);
      } else {
        for (int64_t j = j_begin; j < j_end; ++j)
          for (int64_t c = 0; c < p.num_out; ++c) add_class(c, j);
      }
    });
  }
}

}  // namespace

void alpha_combine(const CombineParams& p) {
  dispatch_input_types(p.dtype, [&](auto tag) { forward<decltype(tag)>(p); });
}

void alpha_combine_backward(const CombineBackwardParams& b) {
  dispatch_input_types(b.forward.dtype, [&](auto tag) { backward<decltype(tag)>(b); });
}

void alpha_combine_checks(const CombineCheckParams& c) {
  const CombineParams& p = c.combine;
  dispatch_acc_types(p.dtype, [&](auto tag) {
    using A = decltype(tag);
    const A* alphas = static_cast<const A*>(p.alphas);
    CombineValueSummary summary = empty_summary();
    for (int64_t i = 0; i < p.num_out; ++i) summarize_class(summary, p.targets[i], alphas + i * p.k, p.k);
    for (int64_t i = 0; i < p.num_out * p.k; ++i) summarize_neighbor(summary, p.neighbors[i]);
    *c.summary = summary;
  });
}

}  // namespace alphanet::cpu
