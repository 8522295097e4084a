// Small kernels that pin down what the CUDA emulator promises (run by
// python_tests/test_cuda_emulation.py through _C._emulation_self_test): barrier
// and shuffle semantics, and the errors for broken kernels and launches.
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "../cuda/launch.cuh"
#include "../cuda/pack.cuh"
#include "../kernel_common.h"

namespace alphanet::emulation {
namespace {

using cuda::launch;

// Thread 0 writes a shared value that thread 1 then reads, with or without a
// barrier in between: without one, the result depends on the schedule.
__global__ void publish_kernel(bool with_barrier, int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 0;
  __syncthreads();
  if (threadIdx.x == 0) value = 1;
  if (with_barrier) __syncthreads();
  if (threadIdx.x == 1) *out = value;
}

// Butterfly sum of the lane ids of each warp, and an any-vote over the block.
__global__ void reduce_kernel(int* sums, int* votes) {
  int sum = static_cast<int>(threadIdx.x % 32);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  sums[blockIdx.x * blockDim.x + threadIdx.x] = sum;
  votes[blockIdx.x * 2] = __syncthreads_or(threadIdx.x == 37 && blockIdx.x == 1);
  votes[blockIdx.x * 2 + 1] = __syncthreads_or(0);
}

// Each lane's view of a warp vote on "thread id divisible by 3", twice in a row
// (a lane that runs ahead must not overwrite the first vote).
__global__ void ballot_kernel(unsigned int* out) {
  const unsigned int first = __ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
  const unsigned int second = __ballot_sync(0xffffffffu, threadIdx.x % 3 != 0);
  out[threadIdx.x] = first;
  out[blockDim.x + threadIdx.x] = second;
}

// Half of a warp waits at a warp barrier, the other half at a block barrier.
__global__ void split_barrier_kernel() {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// The last lane leaves before a full-warp shuffle.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Copies 16 bytes a thread from `from` to `to`, each thread's offset `shift` bytes past a 16-byte boundary.
__global__ void pack_kernel(int* to, const int* from, int shift) {
  const auto at = [&](auto* base) {
    return reinterpret_cast<decltype(base)>(reinterpret_cast<uintptr_t>(base) + 16 * threadIdx.x + shift);
  };
  cuda::move_pack(at(to), at(from));
}

// Thread i writes int `i` of the launch's dynamic shared memory, then reads it back to out.
__global__ void shared_kernel(int* out) {
  int* shared = cuda::dynamic_shared<int>();
  shared[threadIdx.x] = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = shared[threadIdx.x];
}

__global__ void empty_kernel() {}

}  // namespace

// Runs self-test `name` with the given schedule seed; returns its result.
std::vector<int> self_test(const std::string& name, uint64_t schedule_seed) {
  const bool was_on = enabled();
  configure(true, schedule_seed);
  std::vector<int> out;
  try {
    if (name == "publish" || name == "publish_with_barrier") {
      out.assign(1, -1);
      launch(publish_kernel, 1, 64, 0, name == "publish_with_barrier", out.data());
    } else if (name == "reduce") {
      out.assign(2 * 64 + 4, -1);
      launch(reduce_kernel, 2, 64, 0, out.data(), out.data() + 128);
    } else if (name == "ballot") {
      out.assign(2 * 64, -1);
      launch(ballot_kernel, 1, 64, 0, reinterpret_cast<unsigned int*>(out.data()));
    } else if (name == "split_barrier") {
      launch(split_barrier_kernel, 1, 64, 0);
    } else if (name == "exited_lane") {
      out.assign(32, -1);
      launch(exited_lane_kernel, 1, 32, 0, out.data());
    } else if (name == "aligned_packs" || name == "misaligned_packs") {
      alignas(16) int from[4 * 4 + 4], to[4 * 4 + 4] = {};  // 4 threads' packs, and room to shift them
      for (int i = 0; i < 4 * 4 + 4; ++i) from[i] = i;
      int* to_data = to;
      const int* from_data = from;
      launch(pack_kernel, 1, 4, 0, to_data, from_data, name == "aligned_packs" ? 0 : 4);
      out.assign(to, to + 4 * 4);
    } else if (name == "shared_within" || name == "shared_overrun") {
      out.assign(64, -1);  // 64 threads, with room for 64 ints or 60 (whole 16-byte units: no rounding slack)
      launch(shared_kernel, 1, 64, (name == "shared_within" ? 64 : 60) * sizeof(int), out.data());
    } else if (name == "too_many_threads") {
      launch(empty_kernel, 1, 2048, 0);
    } else if (name == "too_much_shared_memory") {
      launch(empty_kernel, 1, 32, 64 * 1024);
    } else {
      TORCH_CHECK(false, "unknown self-test '", name, "'");
    }
  } catch (...) {
    configure(was_on, 0);
    throw;
  }
  configure(was_on, 0);
  return out;
}

}  // namespace alphanet::emulation
