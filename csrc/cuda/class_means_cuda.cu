#ifdef ALPHANET_CUDA_EMULATION
#include <algorithm>
#include <numeric>
#include <vector>
#else
#include <cub/device/device_radix_sort.cuh>
#endif

#include "../device_functions.h"
#include "../class_means_params.h"
#include "launch.cuh"
#include "pack.cuh"

namespace alphanet::cuda {
namespace {

// A class's finished sum: added to what sums held, or (means) its mean, with
// the CPU's arithmetic (zero plus the rows, then one division by the count).
// A NaN or inf mean sets *p.nonfinite (x - x is 0 exactly when x is finite).
template <typename A>
__device__ __forceinline__ A finished(A sum, int64_t count, const ClassSumsParams& p) {
  if (!p.means) return sum;
  const A mean = sum / static_cast<A>(count > 0 ? count : 1);
  if (!(mean - mean == A(0))) *p.nonfinite = 1.0;
  return mean;
}

// The means' counts, by one thread per class.
__device__ __forceinline__ void write_count(const ClassSumsParams& p, int64_t c, int64_t count) {
  if (p.means && blockIdx.x == 0 && threadIdx.x == 0) p.counts[c] = count;
}

// LabelSortParams' keys and row ids, a thread per row.
__global__ void label_keys_kernel(LabelSortParams p) {
  for (int64_t i = global_thread(); i < p.rows; i += grid_threads()) {
    const int64_t label = p.labels[i];
    p.keys[i] = static_cast<uint32_t>(label < 0 ? 0 : (label >= p.num_classes ? p.num_classes + 1 : label + 1));
    p.row_ids[i] = i;
  }
}

// One thread per boundary between sorted labels (and the two ends): the classes
// above the label before it and up to the label after it begin there.
__global__ void class_segments_kernel(ClassSegmentsParams p) {
  const auto label = [&](int64_t i) { return static_cast<int64_t>(p.sorted_keys[i]) - 1; };  // in [-1, num_classes]
  for (int64_t i = global_thread(); i <= p.rows; i += grid_threads()) {
    const int64_t below = i == 0 ? -1 : label(i - 1);
    const int64_t above = i == p.rows ? p.num_classes : label(i);
    for (int64_t c = below + 1; c <= above; ++c) {
      if (c >= 0) p.segment_offsets[c] = i;
    }
  }
  if (global_thread() == 0) {
    p.label_ends[0] = static_cast<double>(label(0));
    p.label_ends[1] = static_cast<double>(label(p.rows - 1));
    p.label_ends[2] = 0.0;
  }
}

// One thread per (class, column): it sums the class's rows in segment_sum's
// order (rows were stably sorted by label), so there are no atomics and the
// result is bit-identical run to run, and to the CPU kernel.
template <typename T, typename A>
__global__ void class_sums_kernel(ClassSumsParams p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= p.cols) return;
  for (int64_t c = blockIdx.y; c < p.num_classes; c += gridDim.y) {
    const int64_t begin = p.segment_offsets[c], end = p.segment_offsets[c + 1];
    write_count(p, c, end - begin);
    if (begin == end && !p.means) continue;
    A* out = static_cast<A*>(p.sums) + c * p.cols + col;
    *out = finished(segment_sum<A>(p.means ? A(0) : *out, x, p.row_stride, p.sorted_rows, begin, end, col),
                    end - begin, p);
  }
}

// class_sums_kernel for rows of whole 16-byte packs: a thread per (class, pack
// of columns), one vector load per row, each column summed in the same order.
template <typename T, typename A>
__global__ void class_sums_packed_kernel(ClassSumsParams p) {
  constexpr int kSize = Pack<T>::kSize;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t first_col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kSize;
  if (first_col >= p.cols) return;
  const auto load = [&](int64_t row) {
    Lanes<A, kSize> lanes;
    load_pack(x + row * p.row_stride + first_col, lanes.v);
    return lanes;
  };
  for (int64_t c = blockIdx.y; c < p.num_classes; c += gridDim.y) {
    const int64_t begin = p.segment_offsets[c], end = p.segment_offsets[c + 1];
    write_count(p, c, end - begin);
    if (begin == end && !p.means) continue;
    A* out = static_cast<A*>(p.sums) + c * p.cols + first_col;
    Lanes<A, kSize> sum;
#pragma unroll
    for (int u = 0; u < kSize; ++u) sum.v[u] = p.means ? A(0) : out[u];
    sum = segment_sum_rows(sum, p.sorted_rows, begin, end, load);
#pragma unroll
    for (int u = 0; u < kSize; ++u) out[u] = finished(sum.v[u], end - begin, p);
  }
}

}  // namespace

void class_sums(const ClassSumsParams& p) {
  if (p.num_classes == 0 || p.cols == 0 || p.rows == 0) return;
  dispatch_input_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const bool packed = packable<T>(p.x, p.row_stride, 1, p.cols);
    const int64_t lanes = packed ? p.cols / Pack<T>::kSize : p.cols;  // threads per class
    // Narrow rows get narrow blocks (whole warps), not blocks of mostly idle threads.
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, (lanes + 31) / 32 * 32));
    const dim3 grid(static_cast<unsigned int>((lanes + threads - 1) / threads),
                    static_cast<unsigned int>(std::min<int64_t>(p.num_classes, 65535)));
    launch(packed ? class_sums_packed_kernel<T, A> : class_sums_kernel<T, A>, grid, threads, 0, p);
  });
}

// A radix sort over the keys' low bits only (they lie in 0 .. num_classes + 1),
// where torch's sort of the int64 labels ran eight passes over all 64 bits.
// The emulator stands std::stable_sort in for cub's radix sort (both stable).
void sort_labels(const LabelSortParams& p) {
#ifdef ALPHANET_CUDA_EMULATION
  if (p.size_query) {
    *p.scratch_bytes = 0;
    return;
  }
  launch(label_keys_kernel, blocks_for(p.rows), kThreads, 0, p);
  std::vector<int64_t> order(p.rows);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p.keys[a] < p.keys[b]; });
  for (int64_t i = 0; i < p.rows; ++i) {
    p.keys[p.rows + i] = p.keys[order[i]];
    p.row_ids[p.rows + i] = order[i];
  }
#else
  int key_bits = 1;
  while ((int64_t{1} << key_bits) <= p.num_classes + 1) ++key_bits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (!p.size_query) launch(label_keys_kernel, blocks_for(p.rows), kThreads, 0, p);
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(p.size_query ? nullptr : p.scratch, *p.scratch_bytes, p.keys,
                                                 p.keys + p.rows, p.row_ids, p.row_ids + p.rows, p.rows, 0, key_bits,
                                                 stream));
#endif
}

void class_segments(const ClassSegmentsParams& p) {
  launch(class_segments_kernel, blocks_for(p.rows + 1), kThreads, 0, p);
}

}  // namespace alphanet::cuda
