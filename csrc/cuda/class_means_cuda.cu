#include "../device_functions.h"
#include "../kernel_params.h"
#include "launch.cuh"
#include "pack.cuh"

namespace alphanet::cuda {
namespace {

// A class's finished sum: added to what sums held, or (means) its mean, with
// the CPU's arithmetic (zero plus the rows, then one division by the count).
template <typename A>
__device__ __forceinline__ A finished(A sum, int64_t count, bool means) {
  return means ? sum / static_cast<A>(count > 0 ? count : 1) : sum;
}

// One thread per (class, column): it sums the class's rows in segment_sum's
// order (rows were stably sorted by label), so there are no atomics and the
// result is bit-identical run to run, and to the CPU kernel.
template <typename T, typename A>
__global__ void class_sums_kernel(const T* __restrict__ x, int64_t cols, int64_t row_stride,
                                  const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ offsets,
                                  int64_t num_classes, A* __restrict__ sums, bool means) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  for (int64_t c = blockIdx.y; c < num_classes; c += gridDim.y) {
    const int64_t begin = offsets[c], end = offsets[c + 1];
    if (begin == end && !means) continue;
    A* out = sums + c * cols + col;
    *out = finished(segment_sum<A>(means ? A(0) : *out, x, row_stride, sorted_rows, begin, end, col), end - begin,
                    means);
  }
}

// class_sums_kernel for rows of whole 16-byte packs: a thread per (class, pack
// of columns), one vector load per row, each column summed in the same order.
template <typename T, typename A>
__global__ void class_sums_packed_kernel(const T* __restrict__ x, int64_t cols, int64_t row_stride,
                                         const int64_t* __restrict__ sorted_rows,
                                         const int64_t* __restrict__ offsets, int64_t num_classes,
                                         A* __restrict__ sums, bool means) {
  constexpr int kSize = Pack<T>::kSize;
  const int64_t first_col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kSize;
  if (first_col >= cols) return;
  const auto load = [&](int64_t row) {
    Lanes<A, kSize> lanes;
    load_pack(x + row * row_stride + first_col, lanes.v);
    return lanes;
  };
  for (int64_t c = blockIdx.y; c < num_classes; c += gridDim.y) {
    const int64_t begin = offsets[c], end = offsets[c + 1];
    if (begin == end && !means) continue;
    A* out = sums + c * cols + first_col;
    Lanes<A, kSize> sum;
#pragma unroll
    for (int u = 0; u < kSize; ++u) sum.v[u] = means ? A(0) : out[u];
    sum = segment_sum_rows(sum, sorted_rows, begin, end, load);
#pragma unroll
    for (int u = 0; u < kSize; ++u) out[u] = finished(sum.v[u], end - begin, means);
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
    launch(packed ? class_sums_packed_kernel<T, A> : class_sums_kernel<T, A>, grid, threads, 0,
           static_cast<const T*>(p.x), p.cols, p.row_stride, p.sorted_rows, p.segment_offsets, p.num_classes,
           static_cast<A*>(p.sums), p.means);
  });
}

}  // namespace alphanet::cuda
