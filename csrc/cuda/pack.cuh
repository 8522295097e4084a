// 16-byte packs of consecutive elements, moved with one vector load (light
// header, shared by the CUDA kernels).
#pragma once

#include <cstdint>

#include "launch.cuh"

namespace alphanet::cuda {

// 16 bytes of consecutive elements of one line, moved with one vector load or
// store. Used where a line's elements are contiguous and 16-byte aligned.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T values[kSize];
};

template <typename T>
bool packable(const void* base, int64_t line_stride, int64_t elem_stride, int64_t elems) {
  return elem_stride == 1 && line_stride % Pack<T>::kSize == 0 && elems % Pack<T>::kSize == 0 &&
         reinterpret_cast<std::uintptr_t>(base) % 16 == 0;
}

// One 16-byte vector load and store. A GPU faults ("misaligned address") unless
// both addresses are 16-byte aligned; so does the emulator, where x86 would not.
__device__ __forceinline__ void move_pack(void* to, const void* from) {
#ifdef ALPHANET_CUDA_EMULATION
  if ((reinterpret_cast<std::uintptr_t>(to) | reinterpret_cast<std::uintptr_t>(from)) % 16 != 0) {
    emulation::fault("misaligned address: a 16-byte pack moved to or from an address that is not 16-byte aligned");
  }
#endif
  *static_cast<uint4*>(to) = *static_cast<const uint4*>(from);
}

template <typename A, typename T>
__device__ __forceinline__ void load_pack(const T* at, A (&values)[Pack<T>::kSize]) {
  Pack<T> pack;
  move_pack(&pack, at);
#pragma unroll
  for (int u = 0; u < Pack<T>::kSize; ++u) values[u] = static_cast<A>(pack.values[u]);
}

}  // namespace alphanet::cuda
