#include <cstdint>
#include <limits>

#include "../device_functions.h"
#include "../kernel_params.h"
#include "launch.cuh"
#include "pack.cuh"

namespace alphanet::cuda {
namespace {

// Reads source(line, j), or NaN for a line outside the source: the Python
// wrapper validates indices, and the kernel must never read out of bounds.
template <typename A, typename T>
__device__ __forceinline__ A load_line(const CombineParams& p, const T* source, int64_t line, int64_t j) {
  if (line < 0 || line >= p.num_lines) return std::numeric_limits<A>::quiet_NaN();
  return static_cast<A>(source[line * p.line_stride + j * p.elem_stride]);
}

// Output item -> (class c, element j), in the output's memory order.
__device__ __forceinline__ void split_item(int64_t item, int64_t num_out, int64_t elems, bool lines_fastest,
                                           int64_t* c, int64_t* j) {
  if (lines_fastest) {
    *c = item % num_out;
    *j = item / num_out;
  } else {
    *c = item / elems;
    *j = item % elems;
  }
}

// Pack `pack` of source line `line`, or NaNs for a line outside the source (as load_line).
template <typename A, typename T>
__device__ __forceinline__ void load_line_pack(const CombineParams& p, const T* source, int64_t line, int64_t pack,
                                               A (&values)[Pack<T>::kSize]) {
  if (line < 0 || line >= p.num_lines) {
#pragma unroll
    for (int u = 0; u < Pack<T>::kSize; ++u) values[u] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  load_pack(source + line * p.line_stride + pack * Pack<T>::kSize, values);
}

// forward_kernel for contiguous rows, a 16-byte pack per thread; the same
// arithmetic per element, in the same order.
template <typename T, typename A>
__global__ void forward_packed_kernel(CombineParams p) {
  constexpr int V = Pack<T>::kSize;
  const T* source = static_cast<const T*>(p.source);
  const A* alphas = static_cast<const A*>(p.alphas);
  T* out = static_cast<T*>(p.out);
  const int64_t packs = p.elems / V;
  for (int64_t item = global_thread(); item < p.num_out * packs; item += grid_threads()) {
    const int64_t c = item / packs, pack = item % packs;
    const A* row_alphas = alphas + c * p.k;
    const A norm = l1_norm<A>(row_alphas, 1, static_cast<int>(p.k));
    A acc[V], neighbor[V];
    load_line_pack(p, source, p.targets[c], pack, acc);
    for (int64_t i = 0; i < p.k; ++i) {
      load_line_pack(p, source, p.neighbors[c * p.k + i], pack, neighbor);
      const A weight = row_alphas[i] / norm;
#pragma unroll
      for (int u = 0; u < V; ++u) acc[u] += weight * neighbor[u];
    }
    Pack<T> result;
#pragma unroll
    for (int u = 0; u < V; ++u) result.values[u] = static_cast<T>(acc[u]);
    *reinterpret_cast<uint4*>(out + c * p.out_line_stride + pack * V) = *reinterpret_cast<const uint4*>(&result);
  }
}

// out(c, j), element by element; load(line) reads source(line, j) as load_line does.
template <typename T, typename A, typename Load>
__device__ __forceinline__ void combine_element(const CombineParams& p, int64_t c, int64_t j, Load load) {
  const A* row_alphas = static_cast<const A*>(p.alphas) + c * p.k;
  const A norm = l1_norm<A>(row_alphas, 1, static_cast<int>(p.k));
  A acc = load(p.targets[c]);
  for (int64_t i = 0; i < p.k; ++i) acc += row_alphas[i] / norm * load(p.neighbors[c * p.k + i]);
  static_cast<T*>(p.out)[c * p.out_line_stride + j * p.out_elem_stride] = static_cast<T>(acc);
}

template <typename T, typename A>
__global__ void forward_kernel(CombineParams p) {
  const T* source = static_cast<const T*>(p.source);
  for (int64_t item = global_thread(); item < p.num_out * p.elems; item += grid_threads()) {
    const int64_t j = item % p.elems;
    combine_element<T, A>(p, item / p.elems, j, [&](int64_t line) { return load_line<A>(p, source, line, j); });
  }
}

// Columns of the logits (lines of the output contiguous): a block takes whole
// elements j (rows of the logits) and its threads the classes, so the row a
// block gathers from is read into one multiprocessor's cache, not into those of
// every block that shares it.
template <typename T, typename A>
__global__ void forward_by_element_kernel(CombineParams p) {
  const T* source = static_cast<const T*>(p.source);
  for (int64_t j = blockIdx.x; j < p.elems; j += gridDim.x) {
    const auto load = [&](int64_t line) { return load_line<A>(p, source, line, j); };
    for (int64_t c = threadIdx.x; c < p.num_out; c += blockDim.x) combine_element<T, A>(p, c, j, load);
  }
}

// forward_by_element_kernel with the row first copied to shared memory
// (coalesced), so the classes' scattered reads hit shared memory rather than a
// different cache line each. For rows that fit in kMaxStagedBytes.
template <typename T, typename A>
__global__ void forward_staged_kernel(CombineParams p) {
  const T* source = static_cast<const T*>(p.source);
  T* row = dynamic_shared<T>();  // [num_lines]
  for (int64_t j = blockIdx.x; j < p.elems; j += gridDim.x) {
    __syncthreads();  // the previous row's reads are done
    for (int64_t line = threadIdx.x; line < p.num_lines; line += blockDim.x) {
      row[line] = source[line * p.line_stride + j * p.elem_stride];
    }
    __syncthreads();
    const auto load = [&](int64_t line) {
      return line < 0 || line >= p.num_lines ? std::numeric_limits<A>::quiet_NaN() : static_cast<A>(row[line]);
    };
    for (int64_t c = threadIdx.x; c < p.num_out; c += blockDim.x) combine_element<T, A>(p, c, j, load);
  }
}

// grad_alphas[c, i] from the class's k dot products <grad_out[c], source[n_cj]>.
template <typename A>
__device__ __forceinline__ void store_alpha_grad(const CombineBackwardParams& b, int64_t c, const A* dots, int64_t i) {
  const int k = static_cast<int>(b.forward.k);
  const A* row_alphas = static_cast<const A*>(b.forward.alphas) + c * k;
  static_cast<A*>(b.grad_alphas)[c * k + i] =
      l1_normalized_grad<A>(row_alphas, 1, dots, k, static_cast<int>(i), l1_norm<A>(row_alphas, 1, k));
}

// One block per class: the k dot products <grad_out[c], source[n_ci]> by a
// fixed-shape block reduction (deterministic), then the L1-normalisation gradient.
// `packed`: grad_out and source rows are contiguous and aligned (see packable).
template <typename T, typename A>
__global__ void grad_alphas_kernel(CombineBackwardParams b, bool packed) {
  const CombineParams& p = b.forward;
  A* partial = dynamic_shared<A>();                  // [blockDim.x]
  A* grad_normalized = partial + blockDim.x;         // [k]
  const T* source = static_cast<const T*>(p.source);
  const T* grad_out = static_cast<const T*>(b.grad_out);
  for (int64_t c = blockIdx.x; c < p.num_out; c += gridDim.x) {
    for (int64_t i = 0; i < p.k; ++i) {
      const int64_t line = p.neighbors[c * p.k + i];
      A dot = A(0);
      if (packed) {
        constexpr int V = Pack<T>::kSize;
        A gradient[V], values[V];
        for (int64_t pack = threadIdx.x; pack < p.elems / V; pack += blockDim.x) {
          load_pack(grad_out + c * p.out_line_stride + pack * V, gradient);
          load_line_pack(p, source, line, pack, values);
#pragma unroll
          for (int u = 0; u < V; ++u) dot += gradient[u] * values[u];
        }
      } else {
        for (int64_t j = threadIdx.x; j < p.elems; j += blockDim.x) {
          dot += static_cast<A>(grad_out[c * p.out_line_stride + j * p.out_elem_stride]) *
                 load_line<A>(p, source, line, j);
        }
      }
      partial[threadIdx.x] = dot;
      __syncthreads();
      for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
      }
      if (threadIdx.x == 0) grad_normalized[i] = partial[0];
      __syncthreads();
    }
    for (int64_t i = threadIdx.x; i < p.k; i += blockDim.x) store_alpha_grad(b, c, grad_normalized, i);
    __syncthreads();
  }
}

// grad_alphas over logit columns, first pass: a thread per (class c, neighbour
// i) and chunk of elements (blockIdx.y), summing over the chunk's elements in
// order. Threads of a warp share i and take consecutive classes, so they read
// 32 consecutive classes of a gradient row and gather from one logit row; every
// pair has its own thread, so even a training batch's few chunks fill the GPU.
template <typename T, typename A>
__global__ void alpha_partials_kernel(CombineBackwardParams b, int64_t chunk) {
  const CombineParams& p = b.forward;
  const T* source = static_cast<const T*>(p.source);
  const T* grad_out = static_cast<const T*>(b.grad_out);
  A* partials = static_cast<A*>(b.alpha_partials);
  const int64_t begin = blockIdx.y * chunk, end = std::min(p.elems, begin + chunk);
  for (int64_t pair = global_thread(); pair < p.num_out * p.k; pair += grid_threads()) {
    const int64_t c = pair % p.num_out, i = pair / p.num_out;
    const int64_t line = p.neighbors[c * p.k + i];
    A dot = A(0);
    for (int64_t j = begin; j < end; ++j) {
      dot += static_cast<A>(grad_out[c * p.out_line_stride + j * p.out_elem_stride]) * load_line<A>(p, source, line, j);
    }
    partials[(blockIdx.y * p.num_out + c) * p.k + i] = dot;
  }
}

// Second pass, a thread per class: the chunks' sums in chunk order (into chunk
// 0's slots), then the L1-normalisation gradient.
template <typename A>
__global__ void alphas_from_partials_kernel(CombineBackwardParams b) {
  const CombineParams& p = b.forward;
  A* partials = static_cast<A*>(b.alpha_partials);
  for (int64_t c = global_thread(); c < p.num_out; c += grid_threads()) {
    A* sums = partials + c * p.k;
    for (int64_t i = 0; i < p.k; ++i) {
      A total = sums[i];
      for (int64_t chunk = 1; chunk < b.alpha_chunks; ++chunk) total += partials[(chunk * p.num_out + c) * p.k + i];
      sums[i] = total;
    }
    for (int64_t i = 0; i < p.k; ++i) store_alpha_grad(b, c, sums, i);
  }
}

// Gradient of the source as a gather: every (line, j) sums, in a fixed order,
// the output gradients of the classes that read that line. No atomics.
template <typename T, typename A>
__global__ void grad_source_kernel(CombineBackwardParams b, bool lines_fastest) {
  const CombineParams& p = b.forward;
  const T* grad_out = static_cast<const T*>(b.grad_out);
  const A* alphas = static_cast<const A*>(p.alphas);
  A* grad_source = static_cast<A*>(b.grad_source);
  for (int64_t item = global_thread(); item < p.num_lines * p.elems; item += grid_threads()) {
    int64_t line, j;
    split_item(item, p.num_lines, p.elems, lines_fastest, &line, &j);
    A acc = A(0);
    for (int64_t e = b.line_offsets[line]; e < b.line_offsets[line + 1]; ++e) {
      const int64_t entry = b.line_entries[e];
      const int64_t c = entry / (p.k + 1), slot = entry % (p.k + 1);
      A weight = A(1);
      if (slot > 0) weight = alphas[c * p.k + slot - 1] / l1_norm<A>(alphas + c * p.k, 1, static_cast<int>(p.k));
      acc += weight * static_cast<A>(grad_out[c * p.out_line_stride + j * p.out_elem_stride]);
    }
    grad_source[line * b.grad_line_stride + j * b.grad_elem_stride] = acc;
  }
}

// grad_source_kernel for contiguous rows of grad_out, a 16-byte pack per thread;
// the same arithmetic per element, in the same order.
template <typename T, typename A>
__global__ void grad_source_packed_kernel(CombineBackwardParams b) {
  constexpr int V = Pack<T>::kSize;
  const CombineParams& p = b.forward;
  const T* grad_out = static_cast<const T*>(b.grad_out);
  const A* alphas = static_cast<const A*>(p.alphas);
  A* grad_source = static_cast<A*>(b.grad_source);
  const int64_t packs = p.elems / V;
  for (int64_t item = global_thread(); item < p.num_lines * packs; item += grid_threads()) {
    const int64_t line = item / packs, pack = item % packs;
    A acc[V], gradient[V];
#pragma unroll
    for (int u = 0; u < V; ++u) acc[u] = A(0);
    for (int64_t e = b.line_offsets[line]; e < b.line_offsets[line + 1]; ++e) {
      const int64_t entry = b.line_entries[e];
      const int64_t c = entry / (p.k + 1), slot = entry % (p.k + 1);
      A weight = A(1);
      if (slot > 0) weight = alphas[c * p.k + slot - 1] / l1_norm<A>(alphas + c * p.k, 1, static_cast<int>(p.k));
      load_pack(grad_out + c * p.out_line_stride + pack * V, gradient);
#pragma unroll
      for (int u = 0; u < V; ++u) acc[u] += weight * gradient[u];
    }
#pragma unroll
    for (int u = 0; u < V; ++u) grad_source[line * b.grad_line_stride + (pack * V + u) * b.grad_elem_stride] = acc[u];
  }
}

// alpha_combine's value checks in one block: each thread folds a strided share
// of the classes and neighbour indices, then a fixed-shape shared-memory merge.
template <typename A>
__global__ void __launch_bounds__(kThreads) checks_kernel(CombineCheckParams c) {
  __shared__ CombineValueSummary partial[kThreads];
  const CombineParams& p = c.combine;
  const A* alphas = static_cast<const A*>(p.alphas);
  CombineValueSummary summary = empty_summary();
  for (int64_t i = threadIdx.x; i < p.num_out; i += blockDim.x) {
    summarize_class(summary, p.targets[i], alphas + i * p.k, p.k);
  }
  for (int64_t i = threadIdx.x; i < p.num_out * p.k; i += blockDim.x) summarize_neighbor(summary, p.neighbors[i]);
  partial[threadIdx.x] = summary;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) merge_summary(partial[threadIdx.x], partial[threadIdx.x + half]);
    __syncthreads();
  }
  if (threadIdx.x == 0) *c.summary = partial[0];
}

// Shared memory a block may take without opting in to more.
constexpr int64_t kMaxStagedBytes = 48 * 1024;

}  // namespace

void alpha_combine(const CombineParams& p) {
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (packable<T>(p.source, p.line_stride, p.elem_stride, p.elems) &&
        packable<T>(p.out, p.out_line_stride, p.out_elem_stride, p.elems)) {
      launch(forward_packed_kernel<T, acc_t<T>>, blocks_for(p.num_out * (p.elems / Pack<T>::kSize)), kThreads, 0, p);
    } else if (p.out_line_stride == 1) {
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, (p.num_out + 31) / 32 * 32));
      const auto blocks = static_cast<unsigned int>(std::min<int64_t>(p.elems, 1 << 20));
      const int64_t row_bytes = p.num_lines * static_cast<int64_t>(sizeof(T));
      if (row_bytes <= kMaxStagedBytes) {
        launch(forward_staged_kernel<T, acc_t<T>>, blocks, threads, row_bytes, p);
      } else {
        launch(forward_by_element_kernel<T, acc_t<T>>, blocks, threads, 0, p);
      }
    } else {
      launch(forward_kernel<T, acc_t<T>>, blocks_for(p.num_out * p.elems), kThreads, 0, p);
    }
  });
}

void alpha_combine_checks(const CombineCheckParams& c) {
  dispatch_acc_types(c.combine.dtype, [&](auto tag) { launch(checks_kernel<decltype(tag)>, 1, kThreads, 0, c); });
}

void alpha_combine_backward(const CombineBackwardParams& b) {
  const CombineParams& p = b.forward;
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    if (b.grad_alphas != nullptr && p.num_out > 0 && b.alpha_partials != nullptr) {
      const int64_t chunk = (p.elems + b.alpha_chunks - 1) / b.alpha_chunks;
      const dim3 grid(blocks_for(p.num_out * p.k), static_cast<unsigned int>(b.alpha_chunks));
      launch(alpha_partials_kernel<T, A>, grid, kThreads, 0, b, chunk);
      launch(alphas_from_partials_kernel<A>, blocks_for(p.num_out), kThreads, 0, b);
    } else if (b.grad_alphas != nullptr && p.num_out > 0) {
      const size_t shared = (kThreads + p.k) * sizeof(A);
      const auto blocks = static_cast<unsigned int>(std::min<int64_t>(p.num_out, 65535));
      const bool packed = packable<T>(p.source, p.line_stride, p.elem_stride, p.elems) &&
                          packable<T>(b.grad_out, p.out_line_stride, p.out_elem_stride, p.elems);
      launch(grad_alphas_kernel<T, A>, blocks, kThreads, shared, b, packed);
    }
    if (b.grad_source != nullptr && p.num_lines > 0) {
      if (packable<T>(b.grad_out, p.out_line_stride, p.out_elem_stride, p.elems)) {
        launch(grad_source_packed_kernel<T, A>, blocks_for(p.num_lines * (p.elems / Pack<T>::kSize)), kThreads, 0, b);
      } else {
        launch(grad_source_kernel<T, A>, blocks_for(p.num_lines * p.elems), kThreads, 0, b, b.grad_line_stride == 1);
      }
    }
  });
}

}  // namespace alphanet::cuda
