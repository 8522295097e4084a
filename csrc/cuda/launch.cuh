// Launch helpers shared by the CUDA kernels (light headers only: no ATen).
// Compiled by nvcc for the GPU, or as C++ over csrc/emulation/cuda_emulation.h
// when ALPHANET_CUDA_EMULATION is defined (the CPU test build).
#pragma once

#ifdef ALPHANET_CUDA_EMULATION
#include "../emulation/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace alphanet::cuda {

constexpr int kThreads = 256, kWarp = 32;

// kernel<<<grid, block, shared_bytes, current stream>>>(args...), checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, const Args&... args) {
#ifdef ALPHANET_CUDA_EMULATION
  emulation::run(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes, [&] { kernel(args...); });
#else
  kernel<<<grid, block, shared_bytes, c10::cuda::getCurrentCUDAStream().stream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

#ifndef ALPHANET_CUDA_EMULATION
// An attribute of the current device.
inline int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}
#endif

// Dynamic shared memory a block may take on the current device with the opt-in
// attribute (allow_shared_memory); 48 KB without it.
inline int64_t max_shared_per_block() {
#ifdef ALPHANET_CUDA_EMULATION
  return static_cast<int64_t>(emulation::kMaxOptInShared);
#else
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
#endif
}

// Lets `kernel` take up to `bytes` of dynamic shared memory (at most max_shared_per_block()).
template <typename... Params>
void allow_shared_memory(void (*kernel)(Params...), int64_t bytes) {
#ifdef ALPHANET_CUDA_EMULATION
  emulation::allow_dynamic_shared(reinterpret_cast<const void*>(kernel), static_cast<size_t>(bytes));
#else
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
#endif
}

// Streaming multiprocessors of the current device.
inline int multiprocessors() {
#ifdef ALPHANET_CUDA_EMULATION
  return emulation::kMultiprocessors;
#else
  return device_attribute(cudaDevAttrMultiProcessorCount);
#endif
}

// The launch's dynamic shared memory (shared_bytes of `launch`), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#ifdef ALPHANET_CUDA_EMULATION
  return reinterpret_cast<T*>(emulation::dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
  return reinterpret_cast<T*>(dynamic_shared_bytes);
#endif
}

// Blocks for a grid-stride loop over `total` items.
inline unsigned int blocks_for(int64_t total, int threads = kThreads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 20)));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// The sum of a value over a warp's lanes by a butterfly of shuffles, which
// leaves the same bits in every lane (each step adds the same two values, in
// swapped order).
template <typename A>
__device__ __forceinline__ A warp_sum(A value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

}  // namespace alphanet::cuda
