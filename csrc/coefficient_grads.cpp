// One training step's loss and gradients for AlphaNet's coefficient networks,
// in one op: the stacked MLPs' forward pass, the corrected few-class logits
// (alpha_combine over raw logit columns), the softmax cross-entropy over all
// classes, and the backward pass written out by hand. On small problems a step
// is dominated by per-op overhead in Python and autograd (about 40 ops forward
// and backward); here those ops run back to back in C++. Built from ATen ops and
// the alphanet kernels, so the same code serves CPU and CUDA.
#include <torch/library.h>

#include <optional>
#include <vector>

#include "alpha_combine_ops.h"
#include "coefficient_grads_params.h"
#include "op_utils.h"

namespace alphanet {
namespace {

constexpr const char* kOp = "_coefficient_grads";
constexpr double kLeakySlope = 0.01;

at::Tensor combine(const at::Tensor& source, const at::Tensor& targets, const at::Tensor& neighbors,
                   const at::Tensor& alphas) {
  return alpha_combine_op().call(source, targets, neighbors, alphas, 1);
}

at::Tensor combine_alphas_grad(const at::Tensor& grad, const at::Tensor& source, const at::Tensor& targets,
                               const at::Tensor& neighbors, const at::Tensor& alphas) {
  return std::get<1>(alpha_combine_backward_op().call(grad, source, targets, neighbors, alphas, 1, false, true));
}

// The networks' input comes in three forms: inputs_t [D, C_f]; on the CPU the same
// packed once per fit into panels [ceil(C_f / kInputPanel), ceil(D / kInputPanel) *
// kInputPanel, kInputPanel] (see InputProductParams; alphanet_ext.fit packs it); or,
// with `ids` [C_f, parts], gathered: input column c is the rows table[ids[c, 0]], ...,
// table[ids[c, parts - 1]] of `inputs` (the table [V, D / parts]) one after another,
// so the input is never held whole.
bool gathered_by_kernel(const at::Tensor& table, const at::Tensor& first) {
  return table.is_cpu() && table.scalar_type() == at::kFloat && first.scalar_type() == at::kFloat &&
         first.size(1) % 16 == 0 && cpu::input_products_supported();
}

// The CPU kernels' product with a gathered input: right is [dims, N] forward (out
// [C_f rounded up to panels, N]) or [C_f, N] backward (out [dims rounded up, N]).
at::Tensor gathered_product(const at::Tensor& table, const at::Tensor& ids, int64_t dims, const at::Tensor& right,
                            bool forward) {
  const int64_t num_few = ids.size(0);
  InputProductParams p{nullptr, (num_few + kInputPanel - 1) / kInputPanel,
                       (dims + kInputPanel - 1) / kInputPanel * kInputPanel, dims, num_few, table.data_ptr<float>(),
                       ids.data_ptr<int64_t>(), table.size(1), ids.size(1), right.data_ptr<float>(), right.size(1),
                       nullptr};
  at::Tensor out = at::empty({forward ? p.num_panels * kInputPanel : p.padded_dims, right.size(1)}, right.options());
  p.out = out.data_ptr<float>();
  if (forward) {
    cpu::input_product_forward(p);
  } else {
    cpu::input_product_backward(p);
  }
  return out;
}

// Returns the input's transpose times first: [C_f, N].
at::Tensor first_layer(const at::Tensor& inputs, const at::Tensor* ids, const at::Tensor& first, int64_t num_few) {
  if (ids != nullptr) {
    const at::Tensor right = first.contiguous();
    if (gathered_by_kernel(inputs, first)) {
      return gathered_product(inputs, *ids, first.size(0), right, true).narrow(0, 0, num_few);
    }
    // elsewhere one product per part of the rows: a [C_f, D / parts] gathered copy at a time
    const int64_t width = inputs.size(1);
    at::Tensor out = at::zeros({num_few, first.size(1)}, first.options());
    for (int64_t part = 0; part < ids->size(1); ++part) {
      out.addmm_(inputs.index_select(0, ids->select(1, part)), right.narrow(0, part * width, width));
    }
    return out;
  }
  if (inputs.dim() == 2) {
    // inputs_t.t() @ first: the BLAS takes the transposed operand in place (this
    // order is the faster of the two; benchmarks/RESULTS.md).
    return at::mm(inputs.t(), first);
  }
  at::Tensor out = at::empty({inputs.size(0) * kInputPanel, first.size(1)}, first.options());
  const at::Tensor right = first.contiguous();
  cpu::input_product_forward({inputs.data_ptr<float>(), inputs.size(0), inputs.size(1), first.size(0), num_few,
                              nullptr, nullptr, 0, 0, right.data_ptr<float>(), first.size(1), out.data_ptr<float>()});
  return out.narrow(0, 0, num_few);
}

// Few classes per part of the first layer's gradient on CUDA. That product,
// [D, C_f] x [C_f, N], has a small output (12,288 x 32 at iNaturalist size:
// about 100 cuBLAS tiles for 132 multiprocessors) and a long inner dimension,
// so it is run as products over parts of the few classes, summed: more tiles
// in flight (the measurement is in benchmarks/RESULTS.md).
constexpr int64_t kFewClassesPerGradPart = 1024;

// The input times grad [D, N] for grad [C_f, N].
at::Tensor first_layer_grad(Backend backend, const at::Tensor& inputs, const at::Tensor* ids, const at::Tensor& grad,
                            const at::Tensor& first) {
  const int64_t dims = first.size(0);
  if (ids != nullptr) {
    const at::Tensor right = grad.contiguous();
    if (gathered_by_kernel(inputs, first)) {
      return gathered_product(inputs, *ids, dims, right, false).narrow(0, 0, dims);
    }
    const int64_t width = inputs.size(1);
    at::Tensor out = at::empty({dims, grad.size(1)}, grad.options());
    for (int64_t part = 0; part < ids->size(1); ++part) {
      at::Tensor rows = out.narrow(0, part * width, width);  // contiguous: written in place
      at::mm_out(rows, inputs.index_select(0, ids->select(1, part)).t(), right);
    }
    return out;
  }
  if (inputs.dim() == 2) {
    const int64_t num_few = inputs.size(1), parts = num_few / kFewClassesPerGradPart;
    if (!cuda_paths(backend) || parts < 2) return at::mm(inputs, grad);
    const int64_t per_part = num_few / parts, split = parts * per_part;
    const at::Tensor left = inputs.contiguous(), right = grad.contiguous();
    at::Tensor out = at::bmm(left.as_strided({parts, left.size(0), per_part}, {per_part, num_few, 1}),
                             right.narrow(0, 0, split).view({parts, per_part, right.size(1)}))
                         .sum(0);
    if (split < num_few) out.addmm_(left.narrow(1, split, num_few - split), right.narrow(0, split, num_few - split));
    return out;
  }
  at::Tensor out = at::empty({inputs.size(1), grad.size(1)}, grad.options());
  const at::Tensor right = grad.contiguous();
  cpu::input_product_backward({inputs.data_ptr<float>(), inputs.size(0), inputs.size(1), dims, grad.size(0), nullptr,
                               nullptr, 0, 0, right.data_ptr<float>(), grad.size(1), out.data_ptr<float>()});
  return out.narrow(0, 0, dims);
}

void check_gathered_inputs(const char* op, const at::Tensor& table, const at::Tensor& ids, const at::Tensor& first,
                           int64_t num_few) {
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), op, ": with input_ids, inputs_t must be a contiguous table "
              "of rows [V, d], got ", table.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.device() == table.device(),
              op, ": input_ids must be a contiguous int64 [C_f, parts] tensor on ", table.device(), ", got ",
              ids.scalar_type(), " ", ids.sizes(), " on ", ids.device());
  TORCH_CHECK(ids.size(0) == num_few, op, ": input_ids has ", ids.size(0), " rows for ", num_few, " few classes");
  TORCH_CHECK(ids.size(1) * table.size(1) == first.size(0) && table.scalar_type() == first.scalar_type(), op,
              ": input_ids' ", ids.size(1), " rows of ", table.size(1), " values (", table.scalar_type(),
              ") do not make the first layer's ", first.size(0), " inputs (", first.scalar_type(), ")");
  if (table.is_cpu() && ids.numel() > 0) {  // on a GPU index_select checks them, without a host sync
    const auto [low, high] = at::aminmax(ids);
    check_index_range(low.item<int64_t>(), high.item<int64_t>(), table.size(0), op, "input_ids", "the table's rows");
  }
}

void check_packed_inputs(const char* op, const at::Tensor& inputs, const at::Tensor& first, int64_t num_few) {
  TORCH_CHECK(inputs.is_cpu() && inputs.scalar_type() == at::kFloat && inputs.is_contiguous() &&
                  inputs.size(2) == kInputPanel && inputs.size(1) % kInputPanel == 0,
              op, ": packed inputs must be a contiguous float32 CPU tensor [P, D', ", kInputPanel,
              "] with D' a multiple of ", kInputPanel, ", got ", inputs.sizes());
  TORCH_CHECK(cpu::input_products_supported(), op, ": packed inputs need an x86-64 CPU with AVX2 and FMA");
  TORCH_CHECK(first.scalar_type() == at::kFloat && first.size(1) % 16 == 0, op,
              ": with packed inputs the first layer must be float32 with a multiple of 16 columns, got ",
              first.scalar_type(), " ", first.sizes());
  TORCH_CHECK(first.size(0) <= inputs.size(1) && first.size(0) + kInputPanel > inputs.size(1), op,
              ": packed inputs hold ", inputs.size(1), " rows, which does not fit a first layer of ",
              first.size(0), " rows");
  TORCH_CHECK(num_few <= inputs.size(0) * kInputPanel && num_few + kInputPanel > inputs.size(0) * kInputPanel, op,
              ": packed inputs hold ", inputs.size(0), " panels, which does not fit ", num_few, " few classes");
}

// inputs_t [D, C_f]: the networks' shared input, transposed (or packed, or with input_ids
// gathered from a table of rows: above). first [D, T*H]:
// every trial's first layer (trial t in columns t*H .. t*H+H-1). rest[l]
// [T, out, in]: the later layers. biases[l] [T, out]. few_bias [T, C_f].
// raw [S, T*C]: the batch's logits without bias, trial-major columns.
// targets [T*C_f], neighbors [T*C_f, k]: column ids in raw. base_lse,
// target_few, target_base [S, T]: log-sum-exp of the base-class scores, the
// target's few position (-1 for a base target), the target's score when it is
// a base class. Returns the per-trial mean losses [T] and the gradients of
// (first, rest..., biases..., few_bias), in that order.
std::tuple<at::Tensor, std::vector<at::Tensor>> coefficient_grads(
    const at::Tensor& inputs_t, const at::Tensor& first, at::TensorList rest, at::TensorList biases,
    const at::Tensor& few_bias, const at::Tensor& raw, const at::Tensor& targets, const at::Tensor& neighbors,
    const at::Tensor& base_lse, const at::Tensor& target_few, const at::Tensor& target_base, double pred_scale,
    const std::optional<at::Tensor>& input_ids) {
  const Backend backend = backend_of(inputs_t);
  TORCH_CHECK(biases.size() == rest.size() + 1, kOp, ": need one bias per layer, got ", biases.size(), " for ",
              rest.size() + 1, " layers");
  TORCH_CHECK(few_bias.dim() == 2, kOp, ": few_bias must be [T, C_f], got ", few_bias.sizes());
  TORCH_CHECK(first.dim() == 2, kOp, ": first must be [D, T*H], got ", first.sizes());
  const at::Tensor* ids = input_ids.has_value() ? &input_ids.value() : nullptr;
  if (ids != nullptr) {
    check_gathered_inputs(kOp, inputs_t, *ids, first, few_bias.size(1));
  } else if (inputs_t.dim() == 3) {
    check_packed_inputs(kOp, inputs_t, first, few_bias.size(1));
  } else {
    TORCH_CHECK(inputs_t.dim() == 2 && first.size(0) == inputs_t.size(0), kOp,
                ": inputs_t [D, C_f] and first [D, T*H] do not match: ", inputs_t.sizes(), ", ", first.sizes());
    TORCH_CHECK(few_bias.size(1) == inputs_t.size(1), kOp, ": few_bias must be [T, ", inputs_t.size(1), "], got ",
                few_bias.sizes());
  }
  TORCH_CHECK(base_lse.dim() == 2 && base_lse.size(1) == few_bias.size(0) && target_few.sizes() == base_lse.sizes() &&
                  target_base.sizes() == base_lse.sizes(),
              kOp, ": base_lse, target_few and target_base must all be [S, T]");
  const int64_t trials = few_bias.size(0), num_few = few_bias.size(1), rows = base_lse.size(0);
  TORCH_CHECK(first.size(1) % trials == 0, kOp, ": first has ", first.size(1), " columns, not a multiple of T=",
              trials);
  const int64_t hidden = first.size(1) / trials;

  // Forward through the networks, keeping each layer's pre-activation.
  std::vector<at::Tensor> pre_activations;
  pre_activations.push_back(first_layer(inputs_t, ids, first, num_few)
                                .view({num_few, trials, hidden})
                                .transpose(0, 1)
                                .add(biases[0].unsqueeze(1)));
  for (size_t layer = 0; layer < rest.size(); ++layer) {
    const at::Tensor activation = at::leaky_relu(pre_activations.back(), kLeakySlope);
    pre_activations.push_back(at::baddbmm(biases[layer + 1].unsqueeze(1), activation, rest[layer].transpose(1, 2)));
  }
  const at::Tensor alphas = pre_activations.back();  // [T, C_f, k]
  const int64_t k = alphas.size(2);
  const at::Tensor flat_alphas = alphas.reshape({trials * num_few, k});

  // Loss: softmax over base classes (through base_lse) and the corrected few classes.
  at::Tensor scores = combine(raw, targets, neighbors, flat_alphas).view({rows, trials, num_few});
  scores.add_(few_bias).mul_(pred_scale);
  const at::Tensor log_total = at::logaddexp(base_lse, at::logsumexp(scores, {2}));
  const at::Tensor is_few = target_few.ge(0);
  const at::Tensor few_index = target_few.clamp_min(0).unsqueeze(2);
  const at::Tensor target_score = at::where(is_few, scores.gather(2, few_index).squeeze(2), target_base);
  const at::Tensor losses = (log_total - target_score).mean(0);

  // d loss / d score of each few class: softmax probability minus the target's one-hot, / rows.
  at::Tensor grad_scores = scores.sub_(log_total.unsqueeze(2)).exp_();
  grad_scores.scatter_add_(2, few_index, is_few.unsqueeze(2).to(grad_scores.scalar_type()).neg());
  grad_scores.mul_(pred_scale / static_cast<double>(rows));
  const at::Tensor grad_few_bias = grad_scores.sum(0);
  at::Tensor grad = combine_alphas_grad(grad_scores.view({rows, trials * num_few}), raw, targets, neighbors,
                                        flat_alphas)
                        .view({trials, num_few, k})
                        .to(alphas.scalar_type());

  // Backward through the networks.
  std::vector<at::Tensor> grad_rest(rest.size()), grad_biases(biases.size());
  for (size_t layer = rest.size(); layer-- > 0;) {
    const at::Tensor& below = pre_activations[layer];
    grad_rest[layer] = at::bmm(grad.transpose(1, 2), at::leaky_relu(below, kLeakySlope));
    grad_biases[layer + 1] = grad.sum(1);
    grad = at::bmm(grad, rest[layer]);
    grad = at::where(below.gt(0), grad, grad * kLeakySlope);
  }
  grad_biases[0] = grad.sum(1);
  const at::Tensor grad_first =
      first_layer_grad(backend, inputs_t, ids, grad.transpose(0, 1).reshape({num_few, trials * hidden}), first);

  std::vector<at::Tensor> grads;
  grads.push_back(grad_first);
  grads.insert(grads.end(), grad_rest.begin(), grad_rest.end());
  grads.insert(grads.end(), grad_biases.begin(), grad_biases.end());
  grads.push_back(grad_few_bias);
  return {losses, grads};
}

// The networks' first layer alone, ``first_layer`` above: [C_f, N]. What the step's
// forward pass computes first, for callers that need the coefficients without a step.
at::Tensor input_product(const at::Tensor& inputs, const at::Tensor& first, int64_t num_few,
                         const std::optional<at::Tensor>& input_ids) {
  TORCH_CHECK(first.dim() == 2, "_input_product: first must be [D, N], got ", first.sizes());
  const at::Tensor* ids = input_ids.has_value() ? &input_ids.value() : nullptr;
  if (ids != nullptr) {
    check_gathered_inputs("_input_product", inputs, *ids, first, num_few);
  } else if (inputs.dim() == 3) {
    check_packed_inputs("_input_product", inputs, first, num_few);
  } else {
    TORCH_CHECK(inputs.dim() == 2 && inputs.size(0) == first.size(0) && inputs.size(1) == num_few,
                "_input_product: inputs_t must be [", first.size(0), ", ", num_few, "], got ", inputs.sizes());
  }
  return first_layer(inputs, ids, first, num_few).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(alphanet, m) {
  m.def("_input_product(Tensor inputs_t, Tensor first, int num_few, Tensor? input_ids=None) -> Tensor");
  m.def(
      "_coefficient_grads(Tensor inputs_t, Tensor first, Tensor[] rest, Tensor[] biases, Tensor few_bias, Tensor raw, "
      "Tensor targets, Tensor neighbors, Tensor base_lse, Tensor target_few, Tensor target_base, float pred_scale, "
      "Tensor? input_ids=None) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(alphanet, CPU, m) {
  m.impl("_coefficient_grads", &coefficient_grads);
  m.impl("_input_product", &input_product);
}

#ifdef ALPHANET_WITH_CUDA
TORCH_LIBRARY_IMPL(alphanet, CUDA, m) {
  m.impl("_coefficient_grads", &coefficient_grads);
  m.impl("_input_product", &input_product);
}
#endif

}  // namespace alphanet
