// Just enough of CUDA's device-side language to compile csrc/cuda/*.cu as C++
// and run their kernels on the CPU, so the CPU test suite exercises the CUDA
// kernels' launch configuration, indexing and memory movement, not only their
// shared per-element functions. Every thread of a block is a fiber; blocks run
// one after another on the calling thread. __syncthreads, __syncwarp and the
// warp shuffles are barriers between fibers, and the order in which fibers run
// between barriers can be shuffled to expose missing barriers (races).
//
// Included (through csrc/cuda/launch.cuh) only when ALPHANET_CUDA_EMULATION is
// defined: CPU-only builds on x86-64 Linux.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

// Kernel code is written for nvcc: it compares the unsigned threadIdx with
// ints, and moves 16-byte packs through uint4 casts, which C++'s strict
// aliasing would let GCC reorder.
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC optimize("no-strict-aliasing")

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(bytes) __attribute__((aligned(bytes)))
#define __launch_bounds__(...)
// Blocks run one at a time, so a function-level static is exactly block-shared memory.
#define __shared__ static

// Other threads write shared memory while this one waits at a barrier. The
// compiler cannot see that: left alone, GCC keeps a block-shared static's values
// in registers across the call. The memory clobber makes it reload them.
#define ALPHANET_EMULATION_FENCE() asm volatile("" ::: "memory")

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

struct alignas(16) float4 {
  float x, y, z, w;
};

namespace alphanet::emulation {

struct Coordinates {
  dim3 thread, block, block_dim, grid_dim;
};

const Coordinates& coordinates();  // of the emulated thread now running
void sync_block();
int sync_block_or(int predicate);  // nonzero if any thread's predicate is
void sync_warp(unsigned int mask);
unsigned char* dynamic_shared();   // the launch's dynamic shared memory, 16-byte aligned
// What the emulated device reports: small, so work splits as on a big GPU with big
// inputs; a block's dynamic shared memory with the opt-in attribute, as on Hopper.
constexpr int kMultiprocessors = 2;
constexpr size_t kMaxOptInShared = 227 * 1024;
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
void allow_dynamic_shared(const void* kernel, size_t bytes);
// Ends the launch with `message` as its error, as a GPU ends a kernel that
// faults; the other threads do not run on.
[[noreturn]] void fault(const char* message);
// The warp's exchange buffer for this thread's next shuffle: 32 slots of 8
// bytes. Consecutive shuffles alternate between two buffers, so one barrier
// per shuffle suffices (no lane can write a buffer another has yet to read).
unsigned char* next_shuffle_buffer();
int lane();

// Runs thread_body once per thread of every block of the grid, as a launch of
// `kernel` would; checks the launch configuration against the limits of the
// hardware (and the shared memory the kernel opted in to).
void run(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& thread_body);

template <typename T>
T shuffle_xor(unsigned int mask, T value, int offset) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  unsigned char* buffer = next_shuffle_buffer();
  std::memcpy(buffer + 8 * lane(), &value, sizeof(T));
  ALPHANET_EMULATION_FENCE();
  sync_warp(mask);
  ALPHANET_EMULATION_FENCE();
  T result;
  std::memcpy(&result, buffer + 8 * (lane() ^ offset), sizeof(T));
  return result;
}

// Bit i set if lane i of `mask` passed a nonzero predicate (lanes outside the
// mask read as zero).
inline unsigned int ballot(unsigned int mask, int predicate) {
  unsigned char* buffer = next_shuffle_buffer();
  const int vote = predicate != 0;
  std::memcpy(buffer + 8 * lane(), &vote, sizeof(vote));
  ALPHANET_EMULATION_FENCE();
  sync_warp(mask);
  ALPHANET_EMULATION_FENCE();
  unsigned int bits = 0;
  for (int other = 0; other < 32; ++other) {
    int other_vote = 0;
    if (mask >> other & 1u) std::memcpy(&other_vote, buffer + 8 * other, sizeof(other_vote));
    bits |= static_cast<unsigned int>(other_vote) << other;
  }
  return bits;
}

}  // namespace alphanet::emulation

#define threadIdx (::alphanet::emulation::coordinates().thread)
#define blockIdx (::alphanet::emulation::coordinates().block)
#define blockDim (::alphanet::emulation::coordinates().block_dim)
#define gridDim (::alphanet::emulation::coordinates().grid_dim)

inline void __syncthreads() {
  ALPHANET_EMULATION_FENCE();
  ::alphanet::emulation::sync_block();
  ALPHANET_EMULATION_FENCE();
}

inline int __syncthreads_or(int predicate) {
  ALPHANET_EMULATION_FENCE();
  const int any = ::alphanet::emulation::sync_block_or(predicate);
  ALPHANET_EMULATION_FENCE();
  return any;
}

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  ALPHANET_EMULATION_FENCE();
  ::alphanet::emulation::sync_warp(mask);
  ALPHANET_EMULATION_FENCE();
}

// Fibers never run at the same time, so a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  return ::alphanet::emulation::ballot(mask, predicate);
}

inline int __popc(unsigned int bits) { return __builtin_popcount(bits); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int offset) {
  return ::alphanet::emulation::shuffle_xor(mask, value, offset);
}
