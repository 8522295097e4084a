// Typed dispatcher handles of the alpha_combine ops, for C++ code that calls
// them through the dispatcher (so CUDA, CPU and fake tensors each reach their
// kernel): the autograd kernel and the fit's training step.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace alphanet {

inline const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, int64_t)>&
alpha_combine_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("alphanet::alpha_combine", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t)>();
  return op;
}

// (grad_out, source, targets, neighbors, alphas, dim, need_source, need_alphas) -> (grad_source, grad_alphas)
inline const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
    bool)>&
alpha_combine_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("alphanet::alpha_combine_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, int64_t, bool, bool)>();
  return op;
}

}  // namespace alphanet
