#include <torch/library.h>

#include <cstring>
#include <vector>

#include "alpha_combine_params.h"
#include "op_utils.h"

namespace alphanet {
namespace {

constexpr const char* kOp = "alpha_combine";

struct Checked {
  CombineParams params;
  at::Tensor targets, neighbors, alphas;  // keep the converted copies alive
  int64_t dim;
};

// Index and coefficient values: every index in [0, num_lines), every
// coefficient row finite and nonzero. The same messages on every backend.
void check_values(Backend backend, const at::Tensor& source, const CombineParams& params, int64_t dim) {
  constexpr int64_t kSummaryFields = sizeof(CombineValueSummary) / sizeof(int64_t);
  const at::Tensor summary = at::empty({kSummaryFields}, source.options().dtype(at::kLong));
  run_kernel(backend, &cpu::alpha_combine_checks, ALPHANET_CUDA_KERNEL(alpha_combine_checks),
             CombineCheckParams{params, reinterpret_cast<CombineValueSummary*>(summary.data_ptr<int64_t>())});
  CombineValueSummary values;
  std::memcpy(&values, summary.cpu().data_ptr<int64_t>(), sizeof(values));
  const char* lines = dim == 0 ? "rows of source" : "columns of source";
  check_index_range(values.lowest_target, values.highest_target, params.num_lines, kOp, "targets", lines);
  check_index_range(values.lowest_neighbor, values.highest_neighbor, params.num_lines, kOp, "neighbors", lines);
  TORCH_CHECK(values.nonfinite_rows == 0, message(kOp, msg::not_finite, {{"name", "alphas"}}));
  TORCH_CHECK(values.zero_rows == 0, message(kOp, msg::combine_zero_row));
}

// Validates the inputs and fills everything but the output pointers. The op
// checks index and coefficient values only for the CPU kernels: on CUDA that
// costs a device sync, which training loops calling it every step must not
// pay, so there the Python wrapper runs _check_combine_values first and the
// kernels guard their reads (the emulator follows the CUDA path, so CPU tests
// cover it).
Checked prepare(Backend backend, const at::Tensor& source, const at::Tensor& targets, const at::Tensor& neighbors,
                const at::Tensor& alphas, int64_t dim, bool values) {
  check_float_matrix(source, kOp, "source");
  check_backend(source, kOp);
  check_same_device(source, targets, kOp, "source", "targets");
  check_same_device(source, neighbors, kOp, "source", "neighbors");
  check_same_device(source, alphas, kOp, "source", "alphas");
  TORCH_CHECK(dim == 0 || dim == 1 || dim == -1 || dim == -2,
              message(kOp, msg::combine_dim, {{"value", std::to_string(dim)}}));
  dim = dim < 0 ? dim + 2 : dim;
  TORCH_CHECK(targets.dim() == 1, message(kOp, msg::combine_targets, {{"shape", c10::str(targets.sizes())}}));
  TORCH_CHECK(neighbors.dim() == 2 && neighbors.size(0) == targets.size(0),
              message(kOp, msg::combine_neighbors, {{"targets", std::to_string(targets.size(0))},
                                                    {"shape", c10::str(neighbors.sizes())}}));
  TORCH_CHECK(neighbors.size(1) >= 1, message(kOp, msg::combine_k));
  TORCH_CHECK(alphas.sizes() == neighbors.sizes(),
              message(kOp, msg::combine_alphas_shape, {{"expected", c10::str(neighbors.sizes())},
                                                       {"shape", c10::str(alphas.sizes())}}));
  TORCH_CHECK(at::isFloatingType(alphas.scalar_type()),
              message(kOp, msg::combine_alphas_float, {{"dtype", c10::str(alphas.scalar_type())}}));

  Checked checked;
  checked.dim = dim;
  const int64_t num_lines = source.size(dim);
  checked.targets = integer_indices(targets, kOp, "targets");
  checked.neighbors = integer_indices(neighbors, kOp, "neighbors");
  checked.alphas = alphas.to(acc_type(source.scalar_type())).contiguous();

  CombineParams& p = checked.params;
  p.dtype = kernel_dtype(source.scalar_type());
  p.source = source.data_ptr();
  p.line_stride = source.stride(dim);
  p.elem_stride = source.stride(1 - dim);
  p.num_lines = num_lines;
  p.elems = source.size(1 - dim);
  p.targets = checked.targets.data_ptr<int64_t>();
  p.neighbors = checked.neighbors.data_ptr<int64_t>();
  p.alphas = checked.alphas.data_ptr();
  p.num_out = targets.size(0);
  p.k = neighbors.size(1);
  if (values) check_values(backend, source, p, dim);
  return checked;
}

bool checks_values(Backend backend) { return !cuda_paths(backend); }

// The output's shape when combining along `dim`: [n, elems] for rows, [elems, n] for columns.
std::vector<int64_t> output_shape(const Checked& c) {
  const int64_t n = c.params.num_out, elems = c.params.elems;
  return c.dim == 0 ? std::vector<int64_t>{n, elems} : std::vector<int64_t>{elems, n};
}

void set_output_strides(const at::Tensor& out, int64_t dim, int64_t* line_stride, int64_t* elem_stride) {
  *line_stride = out.stride(dim);
  *elem_stride = out.stride(1 - dim);
}

// Buffers for the plan of the CUDA kernels whose output lines are contiguous
// (CombineParams::column_lines, column_weights); none elsewhere.
std::pair<at::Tensor, at::Tensor> attach_column_plan(Backend backend, const at::Tensor& source, CombineParams& p) {
  if (!cuda_paths(backend) || p.out_line_stride != 1) return {};
  at::Tensor lines = at::empty({p.k + 1, p.num_out}, source.options().dtype(at::kInt));
  at::Tensor weights = at::empty({p.k, p.num_out}, source.options().dtype(acc_type(source.scalar_type())));
  p.column_lines = lines.data_ptr<int32_t>();
  p.column_weights = weights.data_ptr();
  return {lines, weights};
}

at::Tensor alpha_combine(const at::Tensor& source, const at::Tensor& targets, const at::Tensor& neighbors,
                         const at::Tensor& alphas, int64_t dim) {
  const Backend backend = backend_of(source);
  Checked c = prepare(backend, source, targets, neighbors, alphas, dim, checks_values(backend));
  at::Tensor out = at::empty(output_shape(c), source.options());
  if (out.numel() == 0) return out;
  const at::OptionalDeviceGuard guard(at::device_of(source));
  c.params.out = out.data_ptr();
  set_output_strides(out, c.dim, &c.params.out_line_stride, &c.params.out_elem_stride);
  const auto plan = attach_column_plan(backend, source, c.params);
  run_kernel(backend, &cpu::alpha_combine, ALPHANET_CUDA_KERNEL(alpha_combine), c.params);
  return out;
}

// Gradients of alpha_combine. Either part can be skipped: the training loop
// needs only the coefficients' gradient.
std::tuple<at::Tensor, at::Tensor> alpha_combine_backward(const at::Tensor& grad_out, const at::Tensor& source,
                                                          const at::Tensor& targets, const at::Tensor& neighbors,
                                                          const at::Tensor& alphas, int64_t dim, bool need_source,
                                                          bool need_alphas) {
  const Backend backend = backend_of(source);
  Checked c = prepare(backend, source, targets, neighbors, alphas, dim, checks_values(backend));
  const at::ScalarType acc = acc_type(source.scalar_type());
  const std::vector<int64_t> expected = output_shape(c);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expected), kOp, ": grad_out must have shape ",
              at::IntArrayRef(expected), ", got ", grad_out.sizes());
  check_same_device(source, grad_out, kOp, "source", "grad_out");
  TORCH_CHECK(!(need_alphas && cuda_paths(backend)) || c.params.k <= kMaxCudaGradNeighbors, kOp,
              ": the gradient of alphas on CUDA supports up to ", kMaxCudaGradNeighbors, " neighbours per class, got k=",
              c.params.k);
  const at::OptionalDeviceGuard guard(at::device_of(source));
  const at::Tensor grad = grad_out.to(source.scalar_type());

  CombineBackwardParams b{};
  b.forward = c.params;
  b.grad_out = grad.data_ptr();
  set_output_strides(grad, c.dim, &b.forward.out_line_stride, &b.forward.out_elem_stride);
  // The CPU kernel adds each class's terms into grad_source; the CUDA kernels,
  // when they run (grad not empty), write every element of both gradients.
  const bool written_whole = cuda_paths(backend) && grad.numel() > 0;
  const auto gradient_buffer = [&](at::IntArrayRef sizes) {
    const auto options = source.options().dtype(acc);
    return written_whole ? at::empty(sizes, options) : at::zeros(sizes, options);
  };
  at::Tensor grad_alphas = need_alphas ? gradient_buffer(alphas.sizes()) : at::Tensor();
  at::Tensor grad_source = need_source ? gradient_buffer(source.sizes()) : at::Tensor();
  at::Tensor alpha_partials;
  if (need_alphas) {
    b.grad_alphas = grad_alphas.data_ptr();
    if (cuda_paths(backend) && b.forward.out_line_stride == 1) {
      const int64_t chunk_elems =
          std::clamp(c.params.elems / kTargetAlphaChunks, kMinAlphaChunkElems, kAlphaChunkElems);
      b.alpha_chunks = std::min(kMaxAlphaChunks, (c.params.elems + chunk_elems - 1) / chunk_elems);
      alpha_partials = at::empty({b.alpha_chunks, c.params.k, c.params.num_out}, source.options().dtype(acc));
      b.alpha_partials = alpha_partials.data_ptr();
    }
  }
  const auto plan = need_alphas ? attach_column_plan(backend, source, b.forward) : std::pair<at::Tensor, at::Tensor>{};
  at::Tensor line_offsets, line_entries;
  if (need_source) {
    b.grad_source = grad_source.data_ptr();
    b.grad_line_stride = grad_source.stride(c.dim);
    b.grad_elem_stride = grad_source.stride(1 - c.dim);
    if (cuda_paths(backend)) {
      const at::Tensor lines = at::cat({c.targets.unsqueeze(1), c.neighbors}, 1).reshape(-1);
      line_entries = std::get<1>(lines.sort(/*stable=*/true, 0, false));
      line_offsets = at::zeros({c.params.num_lines + 1}, lines.options());
      line_offsets.narrow(0, 1, c.params.num_lines).copy_(at::bincount(lines, {}, c.params.num_lines).cumsum(0));
      b.line_offsets = line_offsets.data_ptr<int64_t>();
      b.line_entries = line_entries.data_ptr<int64_t>();
    }
  }
  if (grad.numel() > 0 && (need_alphas || need_source)) {
    run_kernel(backend, &cpu::alpha_combine_backward, ALPHANET_CUDA_KERNEL(alpha_combine_backward), b);
  }
  // A part not asked for comes back empty (custom-op returns cannot be None).
  const at::Tensor none = at::empty({0}, source.options());
  return {need_source ? grad_source.to(source.scalar_type()) : none,
          need_alphas ? grad_alphas.to(alphas.scalar_type()) : none};
}

// The value checks alone, on any backend (one device sync on CUDA).
void check_combine_values(const at::Tensor& source, const at::Tensor& targets, const at::Tensor& neighbors,
                          const at::Tensor& alphas, int64_t dim) {
  const at::OptionalDeviceGuard guard(at::device_of(source));
  prepare(backend_of(source), source, targets, neighbors, alphas, dim, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(alphanet, m) {
  m.def("alpha_combine(Tensor source, Tensor targets, Tensor neighbors, Tensor alphas, int dim=0) -> Tensor");
  m.def("_check_combine_values(Tensor source, Tensor targets, Tensor neighbors, Tensor alphas, int dim=0) -> ()");
  m.def(
      "alpha_combine_backward(Tensor grad_out, Tensor source, Tensor targets, Tensor neighbors, Tensor alphas, "
      "int dim, bool need_source, bool need_alphas) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(alphanet, CPU, m) {
  m.impl("_check_combine_values", &check_combine_values);
  m.impl("alpha_combine", &alpha_combine);
  m.impl("alpha_combine_backward", &alpha_combine_backward);
}

#ifdef ALPHANET_WITH_CUDA
TORCH_LIBRARY_IMPL(alphanet, CUDA, m) {
  m.impl("_check_combine_values", &check_combine_values);
  m.impl("alpha_combine", &alpha_combine);
  m.impl("alpha_combine_backward", &alpha_combine_backward);
}
#endif

}  // namespace alphanet
