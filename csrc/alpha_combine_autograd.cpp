// alpha_combine's autograd kernel. In C++ rather than through Python's
// torch.library.register_autograd: the backward then runs on the autograd
// engine's thread without taking the GIL or building Python frames, and the
// forward adds no Python call either.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "alpha_combine_ops.h"

namespace alphanet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class AlphaCombine : public torch::autograd::Function<AlphaCombine> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& source, const at::Tensor& targets,
                            const at::Tensor& neighbors, const at::Tensor& alphas, int64_t dim) {
    ctx->save_for_backward({source, targets, neighbors, alphas});
    ctx->saved_data["dim"] = dim;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return alpha_combine_op().call(source, targets, neighbors, alphas, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    // grad mode on here means create_graph=True; the backward op has no derivative of its own
    TORCH_CHECK(!at::GradMode::is_enabled() ||
                    !(grad_outputs[0].requires_grad() || saved[0].requires_grad() || saved[3].requires_grad()),
                "alpha_combine: gradients of its gradients (create_graph=True) are not supported");
    const bool need_source = ctx->needs_input_grad(0), need_alphas = ctx->needs_input_grad(3);
    auto [grad_source, grad_alphas] = alpha_combine_backward_op().call(
        grad_outputs[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["dim"].toInt(), need_source,
        need_alphas);
    return {need_source ? grad_source : at::Tensor(), at::Tensor(), at::Tensor(),
            need_alphas ? grad_alphas : at::Tensor(), at::Tensor()};
  }
};

at::Tensor alpha_combine_autograd(const at::Tensor& source, const at::Tensor& targets, const at::Tensor& neighbors,
                                  const at::Tensor& alphas, int64_t dim) {
  return AlphaCombine::apply(source, targets, neighbors, alphas, dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(alphanet, Autograd, m) { m.impl("alpha_combine", &alpha_combine_autograd); }

}  // namespace alphanet
