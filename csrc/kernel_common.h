// What every op's raw-pointer interface shares (csrc/<op>_params.h holds each
// op's own parameter structs and kernel entry points): the element types and
// their dispatch, and the CUDA emulator's switch. Free of ATen.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "device_functions.h"

namespace alphanet {

enum class DType { Half, BFloat16, Float, Double };

// float accumulation for 16/32-bit inputs, double for double.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename F>
void dispatch_input_types(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Half: f(c10::Half{}); break;
    case DType::BFloat16: f(c10::BFloat16{}); break;
    case DType::Float: f(float{}); break;
    case DType::Double: f(double{}); break;
  }
}

template <typename F>
void dispatch_acc_types(DType dtype, F&& f) {
  if (dtype == DType::Double) f(double{}); else f(float{});
}

// The CPU build's CUDA emulator (csrc/emulation), a test facility: while it is
// on, ops on CPU tensors run the CUDA kernels and the CUDA code paths.
namespace emulation {
bool enabled();
void configure(bool on, uint64_t schedule_seed);  // seed 0: threads run in order
}  // namespace emulation

}  // namespace alphanet
