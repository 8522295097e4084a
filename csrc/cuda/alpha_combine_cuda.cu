#include <cstdint>
#include <limits>

#include "../device_functions.h"
#include "../alpha_combine_params.h"
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
    move_pack(out + c * p.out_line_stride + pack * V, &result);
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

// Columns of the logits (lines of the output contiguous) whose rows are too long
// for forward_staged_kernel: a block takes whole elements j (rows of the
// logits) and its threads the classes, so the row a block gathers from is read
// into one multiprocessor's cache, not into those of every block that shares it.
template <typename T, typename A>
__global__ void forward_by_element_kernel(CombineParams p) {
  const T* source = static_cast<const T*>(p.source);
  for (int64_t j = blockIdx.x; j < p.elems; j += gridDim.x) {
    const auto load = [&](int64_t line) { return load_line<A>(p, source, line, j); };
    for (int64_t c = threadIdx.x; c < p.num_out; c += blockDim.x) combine_element<T, A>(p, c, j, load);
  }
}

// Logit rows held in shared memory at once by the staged kernels (the alpha
// gradient's registers for a class's per-row gradients bound it), and their
// blocks' threads: with two blocks of 112 KB per multiprocessor, smaller
// blocks leave a multiprocessor too few warps to hide memory latency.
constexpr int kMaxStagedRows = 8, kStagedThreads = 512;

// Threads of a column alpha-gradient block whose classes' sums and staged rows
// take one multiprocessor's shared memory (alpha_partials_staged_kernel): as
// many warps as two blocks of kStagedThreads.
constexpr int kMaxPartialsThreads = 1024;

// Loads a thread issues before it uses them, while summing the alpha
// gradient's chunks (kLoadBatch values) or staging rows (kPackBatch 16-byte
// packs): enough bytes in flight per multiprocessor to keep DRAM busy, which
// one 4-byte value at a time is not; more packs make the staged kernels spill
// registers (benchmarks/RESULTS.md has the measurements).
constexpr int kLoadBatch = 8, kPackBatch = 2;

// A staged row's elements, whole 16-byte packs: the logit row's num_lines values
// from an offset below one pack on, with NaN before and after them (the column
// plan names the NaN right after the last line for a line outside the source,
// so reads need no test).
template <typename T>
__host__ __device__ __forceinline__ int64_t staged_row_width(int64_t num_lines) {
  return ((num_lines + Pack<T>::kSize - 1) / Pack<T>::kSize + 1) * Pack<T>::kSize;
}

// Where logit row `row`'s lines start within its staged row's first pack: on
// contiguous rows, at the row's own offset from a 16-byte boundary, so that
// whole packs of the staged row are whole aligned packs of the source too.
template <typename T>
__device__ __forceinline__ int staged_row_shift(const CombineParams& p, const T* row) {
  return p.line_stride == 1 ? static_cast<int>(reinterpret_cast<std::uintptr_t>(row) / sizeof(T) % Pack<T>::kSize)
                            : 0;
}

// Copies `rows` logit rows from `first` on to shared memory, row r as
// staged_row_width elements from r * width on, its lines from offsets[r] on.
// Threads take consecutive packs, kPackBatch of them loaded before their
// stores: one 16-byte load a pack inside a contiguous row, element loads for
// the packs at its ends and for rows whose lines are strided.
template <typename T>
__device__ __forceinline__ void stage_rows(const CombineParams& p, const T* source, int64_t first, int rows,
                                           T* staged, int* offsets) {
  constexpr int V = Pack<T>::kSize;
  const int lines = static_cast<int>(p.num_lines), packs = static_cast<int>(staged_row_width<T>(p.num_lines) / V);
  const int total = rows * packs, step = static_cast<int>(blockDim.x);
  if (threadIdx.x < rows) {
    offsets[threadIdx.x] = threadIdx.x * packs * V + staged_row_shift(p, source + (first + threadIdx.x) * p.elem_stride);
  }
  // The row and pack of this thread's next pack, stepped along: a division per
  // pack would be most of the staging's instructions. A thread wraps to the
  // next row about once a row when rows are wider than the block.
  const T* row = source + first * p.elem_stride;
  int pack = threadIdx.x, shift = staged_row_shift(p, row);
  const auto wrap = [&] {
    if (pack < packs) return;
    const int rows_passed = pack / packs;
    pack -= rows_passed * packs;
    row += rows_passed * p.elem_stride;
    shift = staged_row_shift(p, row);
  };
  wrap();
  for (int base = threadIdx.x; base < total; base += kPackBatch * step) {
    Pack<T> values[kPackBatch];
#pragma unroll
    for (int u = 0; u < kPackBatch; ++u) {
      const int line = pack * V - shift;  // of the pack's first element
      if (base + u * step < total) {
        if (p.line_stride == 1 && line >= 0 && line + V <= lines) {
          move_pack(&values[u], row + line);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            values[u].values[v] = line + v >= 0 && line + v < lines
                                      ? row[static_cast<int64_t>(line + v) * p.line_stride]
                                      : std::numeric_limits<T>::quiet_NaN();
          }
        }
      }
      pack += step;
      wrap();
    }
#pragma unroll
    for (int u = 0; u < kPackBatch; ++u) {
      if (base + u * step >= total) break;
      move_pack(reinterpret_cast<uint4*>(staged) + base + u * step, &values[u]);
    }
  }
}

// The staged rows' offsets (stage_rows), after staged_rows staged rows.
template <typename T>
__device__ __forceinline__ int* staged_offsets(T* staged, const CombineParams& p, int staged_rows) {
  return reinterpret_cast<int*>(staged + staged_rows * staged_row_width<T>(p.num_lines));
}

// A line of the column plan: `line`, or num_lines (a staged row's NaN slot) outside the source.
__device__ __forceinline__ int32_t plan_line(const CombineParams& p, int64_t line) {
  return static_cast<int32_t>(line < 0 || line >= p.num_lines ? p.num_lines : line);
}

// Writes CombineParams::column_lines (and column_weights if `weights`), a thread per class.
template <typename A>
__global__ void column_plan_kernel(CombineParams p, bool weights) {
  const A* alphas = static_cast<const A*>(p.alphas);
  A* column_weights = static_cast<A*>(p.column_weights);
  for (int64_t c = global_thread(); c < p.num_out; c += grid_threads()) {
    p.column_lines[c] = plan_line(p, p.targets[c]);
    for (int64_t i = 0; i < p.k; ++i) p.column_lines[(i + 1) * p.num_out + c] = plan_line(p, p.neighbors[c * p.k + i]);
    if (!weights) continue;
    const A norm = l1_norm<A>(alphas + c * p.k, 1, static_cast<int>(p.k));
    for (int64_t i = 0; i < p.k; ++i) column_weights[i * p.num_out + c] = alphas[c * p.k + i] / norm;
  }
}

// Neighbours whose dot products grad_alphas_kernel sums in one pass over the
// gradient row (one register each per thread), and whose plan entries the
// staged kernels read at once: read one after another, each was a round trip
// to L2 that the thread waited for.
constexpr int kNeighborGroup = 8;

// Neighbours in the group from `group` on (compared in 32 bits in the unrolled loops).
__device__ __forceinline__ int group_size(const CombineParams& p, int64_t group) {
  return static_cast<int>(std::min<int64_t>(kNeighborGroup, p.k - group));
}

// Class c's plan lines of neighbours [group, group + kNeighborGroup), issued as
// independent loads; load_plan_group reads their normalised coefficients too.
__device__ __forceinline__ void load_plan_lines(const CombineParams& p, int64_t c, int64_t group,
                                                int32_t (&lines)[kNeighborGroup]) {
  const int count = group_size(p, group);
#pragma unroll
  for (int g = 0; g < kNeighborGroup; ++g) {
    if (g >= count) break;
    lines[g] = p.column_lines[(group + g + 1) * p.num_out + c];
  }
}

template <typename A>
__device__ __forceinline__ void load_plan_group(const CombineParams& p, const A* weights, int64_t c, int64_t group,
                                                int32_t (&lines)[kNeighborGroup], A (&group_weights)[kNeighborGroup]) {
  load_plan_lines(p, c, group, lines);
  const int count = group_size(p, group);
#pragma unroll
  for (int g = 0; g < kNeighborGroup; ++g) {
    if (g >= count) break;
    group_weights[g] = weights[(group + g) * p.num_out + c];
  }
}

// forward_by_element_kernel with `staged_rows` logit rows at a time first copied
// to shared memory, so the classes' scattered reads hit shared memory rather
// than a different cache line each, and each class's plan (its lines and
// normalised coefficients) is read once for all the staged rows rather than
// once per row. Each output element gets combine_element's arithmetic, in its
// order (the plan's weights are its quotients).
template <typename T, typename A>
__global__ void __launch_bounds__(kStagedThreads, 2) forward_staged_kernel(CombineParams p, int staged_rows) {
  const T* source = static_cast<const T*>(p.source);
  const A* weights = static_cast<const A*>(p.column_weights);
  T* out = static_cast<T*>(p.out);
  T* staged = dynamic_shared<T>();  // staged_rows staged rows (stage_rows), then their offsets
  int* offsets = staged_offsets(staged, p, staged_rows);
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * staged_rows; first < p.elems;
       first += static_cast<int64_t>(gridDim.x) * staged_rows) {
    const int rows = static_cast<int>(std::min<int64_t>(staged_rows, p.elems - first));
    __syncthreads();  // the previous rows' reads are done
    stage_rows(p, source, first, rows, staged, offsets);
    __syncthreads();
    for (int64_t c = threadIdx.x; c < p.num_out; c += blockDim.x) {
      A group_weights[kNeighborGroup];
      int32_t lines[kNeighborGroup];
      const int32_t target = p.column_lines[c];
      load_plan_group(p, weights, c, 0, lines, group_weights);
      T* out_class = out + c * p.out_line_stride + first * p.out_elem_stride;
      for (int r = 0; r < rows; ++r) {
        const T* row = staged + offsets[r];
        A acc = static_cast<A>(row[target]);
        for (int64_t group = 0; group < p.k; group += kNeighborGroup) {
          // more than kNeighborGroup neighbours: the groups' plans are read again for every row
          if (group > 0 || (r > 0 && p.k > kNeighborGroup)) load_plan_group(p, weights, c, group, lines, group_weights);
          const int count = group_size(p, group);
#pragma unroll
          for (int g = 0; g < kNeighborGroup; ++g) {
            if (g >= count) break;
            acc += group_weights[g] * static_cast<A>(row[lines[g]]);
          }
        }
        out_class[r * p.out_elem_stride] = static_cast<T>(acc);
      }
    }
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

// One block per class: the k dot products <grad_out[c], source[n_ci]>, up to
// kNeighborGroup of them per pass over the class's gradient row (each thread a
// strided share of the elements, one register per neighbour), each summed by a
// fixed butterfly within warps, then over the warps in order (deterministic);
// then the L1-normalisation gradient. `packed`: grad_out and source rows are
// contiguous and aligned (see packable).
template <typename T, typename A>
__global__ void grad_alphas_kernel(CombineBackwardParams b, bool packed) {
  const CombineParams& p = b.forward;
  const int warps = static_cast<int>(blockDim.x) / kWarp;  // blockDim.x: whole warps
  A* warp_sums = dynamic_shared<A>();                      // [warps, kNeighborGroup]
  A* grad_normalized = warp_sums + warps * kNeighborGroup;  // [k]
  const T* source = static_cast<const T*>(p.source);
  const T* grad_out = static_cast<const T*>(b.grad_out);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t c = blockIdx.x; c < p.num_out; c += gridDim.x) {
    const int64_t* lines = p.neighbors + c * p.k;
    for (int64_t group = 0; group < p.k; group += kNeighborGroup) {
      const int count = static_cast<int>(std::min<int64_t>(kNeighborGroup, p.k - group));
      A dots[kNeighborGroup];
#pragma unroll
      for (int i = 0; i < kNeighborGroup; ++i) dots[i] = A(0);
      if (packed) {
        constexpr int V = Pack<T>::kSize;
        A gradient[V], values[V];
        for (int64_t pack = threadIdx.x; pack < p.elems / V; pack += blockDim.x) {
          load_pack(grad_out + c * p.out_line_stride + pack * V, gradient);
#pragma unroll
          for (int i = 0; i < kNeighborGroup; ++i) {
            if (i >= count) break;
            load_line_pack(p, source, lines[group + i], pack, values);
#pragma unroll
            for (int u = 0; u < V; ++u) dots[i] += gradient[u] * values[u];
          }
        }
      } else {
        for (int64_t j = threadIdx.x; j < p.elems; j += blockDim.x) {
          const A gradient = static_cast<A>(grad_out[c * p.out_line_stride + j * p.out_elem_stride]);
#pragma unroll
          for (int i = 0; i < kNeighborGroup; ++i) {
            if (i < count) dots[i] += gradient * load_line<A>(p, source, lines[group + i], j);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kNeighborGroup; ++i) {
        const A total = warp_sum(dots[i]);
        if (lane == 0) warp_sums[warp * kNeighborGroup + i] = total;
      }
      __syncthreads();
      if (threadIdx.x < count) {
        A total = A(0);
        for (int w = 0; w < warps; ++w) total += warp_sums[w * kNeighborGroup + threadIdx.x];
        grad_normalized[group + threadIdx.x] = total;
      }
      __syncthreads();
    }
    for (int64_t i = threadIdx.x; i < p.k; i += blockDim.x) store_alpha_grad(b, c, grad_normalized, i);
    __syncthreads();
  }
}

// grad_alphas over logit columns, first pass: a thread per (class c, neighbour
// i) and chunk of elements (blockIdx.y), summing over the chunk's elements in
// order into alpha_partials[chunk, i, c]. Threads of a warp share i and take
// consecutive classes, so they read 32 consecutive classes of a gradient row and
// gather from one logit row; every pair has its own thread, so even a training
// batch's few chunks fill the GPU.
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
    partials[blockIdx.y * p.num_out * p.k + pair] = dot;
  }
}

// alpha_partials_kernel for logit rows that fit in shared memory: a block takes
// a chunk (blockIdx.y) and a range of classes_per_block classes (blockIdx.x),
// and copies the chunk's logit rows to shared memory `staged_rows` at a time.
// Each thread then adds the staged rows' products to the chunk's sums of its
// (class, neighbour) pairs, which no other thread touches, kept in shared
// memory until the chunk's last rows. So the neighbours' logits come from
// shared memory instead of a 32-byte sector each, the lines from the plan and
// the gradients in consecutive slots for a warp's classes, and every sum runs
// over the chunk's rows in order, as in alpha_partials_kernel (the same bits).
// Sums kept in global memory instead would be re-read and re-written once a
// pass of staged rows and dominate the L2 traffic.
template <typename T, typename A>
__global__ void __launch_bounds__(kMaxPartialsThreads, 1)
    alpha_partials_staged_kernel(CombineBackwardParams b, int64_t chunk, int staged_rows, int classes_per_block) {
  const CombineParams& p = b.forward;
  const T* source = static_cast<const T*>(p.source);
  const T* grad_out = static_cast<const T*>(b.grad_out);
  A* partials = static_cast<A*>(b.alpha_partials) + blockIdx.y * p.num_out * p.k;
  T* staged = dynamic_shared<T>();  // staged_rows staged rows (stage_rows), their offsets, then the sums
  int* offsets = staged_offsets(staged, p, staged_rows);
  A* sums = reinterpret_cast<A*>(offsets + kMaxStagedRows);  // [k, classes_per_block]
  const int64_t begin = blockIdx.y * chunk, end = std::min(p.elems, begin + chunk);
  const int64_t first_class = static_cast<int64_t>(blockIdx.x) * classes_per_block;
  const int classes = static_cast<int>(std::min<int64_t>(classes_per_block, p.num_out - first_class));
  if (begin >= end) {  // an empty last chunk: its sums are zero
    for (int local = threadIdx.x; local < classes; local += blockDim.x) {
      for (int64_t i = 0; i < p.k; ++i) partials[i * p.num_out + first_class + local] = A(0);
    }
    return;
  }
  for (int64_t first = begin; first < end; first += staged_rows) {
    const int rows = static_cast<int>(std::min<int64_t>(staged_rows, end - first));
    const bool opening = first == begin, closing = first + rows == end;
    __syncthreads();  // the previous rows' reads are done
    stage_rows(p, source, first, rows, staged, offsets);
    __syncthreads();
    for (int local = threadIdx.x; local < classes; local += blockDim.x) {
      const int64_t c = first_class + local;
      A gradient[kMaxStagedRows];
#pragma unroll
      for (int r = 0; r < kMaxStagedRows; ++r) {
        if (r >= rows) break;
        gradient[r] = static_cast<A>(grad_out[c * p.out_line_stride + (first + r) * p.out_elem_stride]);
      }
      for (int64_t group = 0; group < p.k; group += kNeighborGroup) {
        int32_t lines[kNeighborGroup];
        A dots[kNeighborGroup];
        load_plan_lines(p, c, group, lines);
        const int count = group_size(p, group);
        A* group_sums = sums + static_cast<int>(group) * classes_per_block + local;
#pragma unroll
        for (int g = 0; g < kNeighborGroup; ++g) {
          if (g >= count) break;
          dots[g] = opening ? A(0) : group_sums[g * classes_per_block];
        }
#pragma unroll
        for (int r = 0; r < kMaxStagedRows; ++r) {
          if (r >= rows) break;
          const T* row = staged + offsets[r];
#pragma unroll
          for (int g = 0; g < kNeighborGroup; ++g) {
            if (g >= count) break;
            dots[g] += gradient[r] * static_cast<A>(row[lines[g]]);
          }
        }
#pragma unroll
        for (int g = 0; g < kNeighborGroup; ++g) {
          if (g >= count) break;
          if (closing) {
            partials[(group + g) * p.num_out + c] = dots[g];
          } else {
            group_sums[g * classes_per_block] = dots[g];
          }
        }
      }
    }
  }
}

// Second pass: a block takes whole classes and a thread each (class, neighbour)
// pair, whose chunk sums it adds in chunk order (threads of a neighbour slot
// read consecutive classes) into shared memory, [classes, k]; then, once the
// block's classes are summed, the L1-normalisation gradient.
template <typename A>
__global__ void alphas_from_partials_kernel(CombineBackwardParams b, int64_t classes_per_block) {
  const CombineParams& p = b.forward;
  const A* partials = static_cast<const A*>(b.alpha_partials);
  A* sums = dynamic_shared<A>();
  const int64_t chunk_pairs = p.num_out * p.k;
  for (int64_t first_class = blockIdx.x * classes_per_block; first_class < p.num_out;
       first_class += static_cast<int64_t>(gridDim.x) * classes_per_block) {
    const int64_t classes = std::min(classes_per_block, p.num_out - first_class), pairs = classes * p.k;
    for (int64_t pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
      const int64_t c = pair % classes, i = pair / classes;
      const A* slot = partials + i * p.num_out + first_class + c;
      A total = slot[0];
      int64_t chunk = 1;
      for (; chunk + kLoadBatch <= b.alpha_chunks; chunk += kLoadBatch) {
        A values[kLoadBatch];
#pragma unroll
        for (int u = 0; u < kLoadBatch; ++u) values[u] = slot[(chunk + u) * chunk_pairs];
#pragma unroll
        for (int u = 0; u < kLoadBatch; ++u) total += values[u];
      }
      for (; chunk < b.alpha_chunks; ++chunk) total += slot[chunk * chunk_pairs];
      sums[c * p.k + i] = total;
    }
    __syncthreads();
    for (int64_t pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
      store_alpha_grad(b, first_class + pair / p.k, sums + pair / p.k * p.k, pair % p.k);
    }
    __syncthreads();
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

// Shared memory for a staged kernel's rows: two blocks fit on a Hopper or
// Ampere multiprocessor (228 or 164 KB).
constexpr int64_t kStagedBytes = 112 * 1024;

// The staged rows' offsets, after the rows (staged_offsets).
constexpr int64_t kOffsetsBytes = kMaxStagedRows * sizeof(int);

template <typename T>
int64_t staged_row_bytes(const CombineParams& p) {
  return staged_row_width<T>(p.num_lines) * static_cast<int64_t>(sizeof(T));
}

template <typename T>
int64_t staged_bytes(const CombineParams& p, int rows) {
  return rows * staged_row_bytes<T>(p) + kOffsetsBytes;
}

// Lets `kernel` take `bytes` of shared memory where that is above the 48 KB a kernel gets without asking.
template <typename... Params>
void allow_above_default_shared(void (*kernel)(Params...), int64_t bytes) {
  if (bytes > 48 * 1024) allow_shared_memory(kernel, bytes);
}

// Logit rows forward_staged_kernel holds at once (0: a row does not fit), with
// the kernel allowed the shared memory they take (staged_bytes).
template <typename T, typename... Params>
int staged_rows_for(void (*kernel)(Params...), const CombineParams& p) {
  const int64_t budget = std::min(kStagedBytes, max_shared_per_block()) - kOffsetsBytes;
  const int64_t rows = std::min<int64_t>(kMaxStagedRows, budget / staged_row_bytes<T>(p));
  if (rows > 0) allow_above_default_shared(kernel, staged_bytes<T>(p, rows));
  return static_cast<int>(rows);
}

// How alpha_partials_staged_kernel splits the classes and the shared memory.
struct PartialsShape {
  int64_t class_blocks = 0;
  int classes_per_block = 0, staged_rows = 0, threads = 0;  // staged_rows 0: a row does not fit
  int64_t shared_bytes = 0;
};

// Enough class blocks for two blocks a multiprocessor, and more where a
// block's sums would leave no room for a logit row. Blocks whose sums leave
// room for two rows in kStagedBytes run two a multiprocessor; the others take
// all the shared memory a block may have, and kMaxPartialsThreads threads.
// Every thread stages rows, including those without a class of their own.
template <typename T, typename A>
PartialsShape partials_shape(const CombineBackwardParams& b) {
  const CombineParams& p = b.forward;
  const int64_t row_bytes = staged_row_bytes<T>(p), class_bytes = p.k * static_cast<int64_t>(sizeof(A));
  const int64_t max_shared = max_shared_per_block(), two_per_multiprocessor = std::min(kStagedBytes, max_shared);
  const int64_t most_classes = (max_shared - kOffsetsBytes - row_bytes) / class_bytes;
  if (most_classes < 1) return {};
  const int64_t class_blocks = std::max(
      std::min<int64_t>((p.num_out + kStagedThreads - 1) / kStagedThreads,
                        (2 * multiprocessors() + b.alpha_chunks - 1) / b.alpha_chunks),
      (p.num_out + most_classes - 1) / most_classes);
  const int64_t classes = (p.num_out + class_blocks - 1) / class_blocks, sums_bytes = classes * class_bytes;
  const bool two = sums_bytes + kOffsetsBytes + 2 * row_bytes <= two_per_multiprocessor;
  const int64_t rows = std::min<int64_t>(
      kMaxStagedRows, ((two ? two_per_multiprocessor : max_shared) - kOffsetsBytes - sums_bytes) / row_bytes);
  return {class_blocks, static_cast<int>(classes), static_cast<int>(rows), two ? kStagedThreads : kMaxPartialsThreads,
          staged_bytes<T>(p, static_cast<int>(rows)) + sums_bytes};
}

}  // namespace

void alpha_combine(const CombineParams& p) {
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (packable<T>(p.source, p.line_stride, p.elem_stride, p.elems) &&
        packable<T>(p.out, p.out_line_stride, p.out_elem_stride, p.elems)) {
      launch(forward_packed_kernel<T, acc_t<T>>, blocks_for(p.num_out * (p.elems / Pack<T>::kSize)), kThreads, 0, p);
    } else if (p.out_line_stride == 1) {
      const auto kernel = forward_staged_kernel<T, acc_t<T>>;
      // fewer rows per block where that leaves under two blocks per multiprocessor (a training batch's logits)
      const int staged_rows = static_cast<int>(std::min<int64_t>(
          staged_rows_for<T>(kernel, p), std::max<int64_t>(1, p.elems / (2 * multiprocessors()))));
      if (staged_rows > 0) {
        launch(column_plan_kernel<acc_t<T>>, blocks_for(p.num_out), kThreads, 0, p, true);
        const auto blocks = static_cast<unsigned int>(std::min<int64_t>((p.elems + staged_rows - 1) / staged_rows, 1 << 20));
        launch(kernel, blocks, kStagedThreads, staged_bytes<T>(p, staged_rows), p, staged_rows);
      } else {
        const int threads = static_cast<int>(std::min<int64_t>(kThreads, (p.num_out + 31) / 32 * 32));
        launch(forward_by_element_kernel<T, acc_t<T>>, static_cast<unsigned int>(std::min<int64_t>(p.elems, 1 << 20)),
               threads, 0, p);
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
      const PartialsShape shape = partials_shape<T, A>(b);
      if (shape.staged_rows > 0) {
        const auto staged_kernel = alpha_partials_staged_kernel<T, A>;
        allow_above_default_shared(staged_kernel, shape.shared_bytes);
        const dim3 grid(static_cast<unsigned int>(shape.class_blocks), static_cast<unsigned int>(b.alpha_chunks));
        launch(column_plan_kernel<A>, blocks_for(p.num_out), kThreads, 0, p, false);
        launch(staged_kernel, grid, shape.threads, shape.shared_bytes, b, chunk, shape.staged_rows,
               shape.classes_per_block);
      } else {
        const dim3 grid(blocks_for(p.num_out * p.k), static_cast<unsigned int>(b.alpha_chunks));
        launch(alpha_partials_kernel<T, A>, grid, kThreads, 0, b, chunk);
      }
      const int64_t classes_per_block = std::max<int64_t>(1, kThreads / p.k);
      launch(alphas_from_partials_kernel<A>, blocks_for(p.num_out, static_cast<int>(classes_per_block)), kThreads,
             classes_per_block * p.k * sizeof(A), b, classes_per_block);
    } else if (b.grad_alphas != nullptr && p.num_out > 0) {
      const size_t shared = (kThreads / kWarp * kNeighborGroup + p.k) * sizeof(A);
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
