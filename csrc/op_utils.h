// Validation and backend selection shared by the op drivers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "kernel_common.h"

namespace alphanet {

inline DType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    default: TORCH_CHECK(false, "unsupported dtype ", type);
  }
}

inline at::ScalarType acc_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble, op,
              ": ", name, " must be float16, bfloat16, float32 or float64, got ", type);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                              const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b, " is on ",
              b.device());
}

inline void check_backend(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), op, ": unsupported device ", t.device());
#ifndef ALPHANET_WITH_CUDA
  TORCH_CHECK(t.device().is_cpu(), op, ": alphanet_ext was built without CUDA support (rebuild with ALPHANET_CUDA=1)");
#endif
}

// A matrix whose rows are contiguous: t itself, or a contiguous copy.
inline at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// Index tensor as contiguous int64; its values are not checked.
inline at::Tensor integer_indices(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()) &&
                  t.scalar_type() != at::kBool,
              op, ": ", name, " must be an integer tensor, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

// Indices whose lowest and highest values are `lowest` and `highest` (an empty
// set: lowest > highest) must lie in [0, limit).
inline void check_index_range(int64_t lowest, int64_t highest, int64_t limit, const char* op, const char* name,
                              const char* limit_name) {
  if (lowest > highest) return;
  TORCH_CHECK(lowest >= 0 && highest < limit, op, ": ", name, " must lie in [0, ", limit, ") (", limit_name,
              "), found ", lowest < 0 ? lowest : highest);
}

// Integer index tensor as contiguous int64, every value checked to lie in [0, limit).
inline at::Tensor checked_indices(const at::Tensor& t, int64_t limit, const char* op, const char* name,
                                  const char* limit_name) {
  at::Tensor indices = integer_indices(t, op, name);
  if (indices.numel() == 0) return indices;
  int64_t lowest = 0, highest = 0;
  if (indices.is_cpu()) {  // a plain loop: no tensor ops, so small calls stay cheap
    const int64_t* values = indices.data_ptr<int64_t>();
    lowest = highest = values[0];
    for (int64_t i = 1; i < indices.numel(); ++i) {
      lowest = std::min(lowest, values[i]);
      highest = std::max(highest, values[i]);
    }
  } else {
    auto [low, high] = at::aminmax(indices);
    lowest = low.item<int64_t>();
    highest = high.item<int64_t>();
  }
  check_index_range(lowest, highest, limit, op, name, limit_name);
  return indices;
}

// One vectorised sum answers for nearly every tensor; only a non-finite sum
// (NaN/inf present, or an overflowing sum) pays for the exact elementwise test.
// The sums of all the tensors come back in one transfer (one device sync).
inline void check_finite(std::initializer_list<std::pair<const at::Tensor*, const char*>> named, const char* op) {
  std::vector<at::Tensor> sums;
  for (const auto& [t, name] : named) sums.push_back(t->sum(acc_type(t->scalar_type())).to(at::kDouble));
  const at::Tensor host = at::stack(sums).cpu();
  int64_t i = 0;
  for (const auto& [t, name] : named) {
    if (!std::isfinite(host[i++].item<double>())) {
      TORCH_CHECK(at::isfinite(*t).all().item<bool>(), op, ": ", name, " contains NaN or inf");
    }
  }
}

inline void check_finite(const at::Tensor& t, const char* op, const char* name) { check_finite({{&t, name}}, op); }

#if defined(ALPHANET_WITH_CUDA) || defined(ALPHANET_CUDA_EMULATION)
#define ALPHANET_CUDA_KERNEL(name) (&::alphanet::cuda::name)
#else
#define ALPHANET_CUDA_KERNEL(name) nullptr
#endif

// Whether ops on `t` take the CUDA kernels and code paths: on CUDA tensors, and
// on CPU tensors while the CUDA emulator is on.
inline bool uses_cuda_kernels(const at::Tensor& t) {
#ifdef ALPHANET_CUDA_EMULATION
  if (t.is_cpu() && emulation::enabled()) return true;
#endif
  return t.is_cuda();
}

template <typename T>
struct NonDeduced {
  using type = T;
};

// Runs the CPU or the CUDA kernel (nullptr in a CPU-only build) for the tensor's device.
template <typename Params>
void run_kernel(const at::Tensor& on, void (*cpu_kernel)(const Params&),
                typename NonDeduced<void (*)(const Params&)>::type cuda_kernel, const Params& params) {
  if (!uses_cuda_kernels(on)) {
    cpu_kernel(params);
  } else {
    TORCH_CHECK(cuda_kernel != nullptr, "alphanet_ext was built without CUDA support");
    cuda_kernel(params);
  }
}

// Runs a kernel that only the CUDA code paths have (nullptr in a CPU-only build).
template <typename Params>
void run_cuda_kernel(typename NonDeduced<void (*)(const Params&)>::type cuda_kernel, const Params& params) {
  TORCH_CHECK(cuda_kernel != nullptr, "alphanet_ext was built without CUDA support");
  cuda_kernel(params);
}

}  // namespace alphanet
