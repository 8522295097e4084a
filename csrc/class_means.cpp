#include <torch/library.h>

#include "class_means_params.h"
#include "op_utils.h"

namespace alphanet {
namespace {

constexpr const char* kOp = "class_means";

// One check on the [C, d] sums instead of a second pass over x: a NaN or inf
// anywhere in x (or an overflowing sum) leaves a non-finite sum.
void check_finite_sums(const at::Tensor& sums) { check_finite(sums, kOp, "x (its per-class sums)"); }

// The fields both backends' kernels read (features with unit column stride).
ClassSumsParams sums_params(const at::Tensor& sums, const at::Tensor& features, const at::Tensor& label_ids) {
  ClassSumsParams params{};
  params.dtype = kernel_dtype(features.scalar_type());
  params.x = features.data_ptr();
  params.rows = features.size(0);
  params.cols = features.size(1);
  params.row_stride = features.stride(0);
  params.labels = label_ids.data_ptr<int64_t>();
  params.num_classes = sums.size(0);
  params.sums = sums.data_ptr();
  return params;
}

// The label range check from the sorted labels' two ends (clamped to
// [-1, num_classes]): the exact offending label is looked up only to word the error.
void check_label_ends(double lowest, double highest, const at::Tensor& label_ids, int64_t num_classes) {
  if (lowest >= 0 && highest < static_cast<double>(num_classes)) return;
  const auto [low, high] = at::aminmax(label_ids);
  check_index_range(low.item<int64_t>(), high.item<int64_t>(), num_classes, kOp, "labels", "num_classes");
}

// The CUDA kernels take the rows stably sorted by label and each class's
// segment of them (class_segments, which also notes the lowest and highest
// label), with no bincount, whose CUDA version syncs to size its output.
// Adding to sums checks the label range before the kernel (one device sync),
// so a bad call leaves sums as they were. Writing means (`means`, into fresh
// tensors, x not empty) leaves the counts and the finiteness check to the
// kernel too, and checks both after it, in one sync: few host-side ops, as on
// a GPU each costs about as much as reading tens of MB.
void cuda_class_sums(at::Tensor& sums, at::Tensor& counts, const at::Tensor& x, const at::Tensor& label_ids,
                     bool means) {
  const int64_t num_classes = sums.size(0);
  if (label_ids.numel() == 0) return;
  TORCH_CHECK(num_classes < (int64_t{1} << 31), kOp, ": num_classes must be below 2^31 on CUDA, got ", num_classes);
  const int64_t rows = label_ids.numel();
  const at::Tensor keys = at::empty({2 * rows}, label_ids.options().dtype(at::kInt));
  const at::Tensor row_ids = at::empty({2 * rows}, label_ids.options());
  size_t scratch_bytes = 0;
  LabelSortParams sort{label_ids.data_ptr<int64_t>(), rows, num_classes, reinterpret_cast<uint32_t*>(keys.data_ptr()),
                       row_ids.data_ptr<int64_t>(), nullptr, &scratch_bytes, /*size_query=*/true};
  run_cuda_kernel(ALPHANET_CUDA_KERNEL(sort_labels), sort);
  const at::Tensor scratch = at::empty({static_cast<int64_t>(scratch_bytes)}, label_ids.options().dtype(at::kByte));
  sort.scratch = scratch.data_ptr();
  sort.size_query = false;
  run_cuda_kernel(ALPHANET_CUDA_KERNEL(sort_labels), sort);
  const at::Tensor segment_offsets = at::empty({num_classes + 1}, label_ids.options());
  const at::Tensor label_ends = at::empty({3}, label_ids.options().dtype(at::kDouble));
  run_cuda_kernel(ALPHANET_CUDA_KERNEL(class_segments),
                  ClassSegmentsParams{sort.keys + rows, rows, num_classes, segment_offsets.data_ptr<int64_t>(),
                                      label_ends.data_ptr<double>()});
  if (!means) {
    const at::Tensor host_ends = label_ends.cpu();
    check_label_ends(host_ends[0].item<double>(), host_ends[1].item<double>(), label_ids, num_classes);
    counts.add_(segment_offsets.diff());
  }
  const at::Tensor features = unit_column_stride(x);
  ClassSumsParams params = sums_params(sums, features, label_ids);
  params.sorted_rows = row_ids.data_ptr<int64_t>() + rows;
  params.segment_offsets = segment_offsets.data_ptr<int64_t>();
  params.means = means;
  params.counts = counts.data_ptr<int64_t>();
  params.nonfinite = label_ends.data_ptr<double>() + 2;
  if (x.size(1) > 0) run_cuda_kernel(ALPHANET_CUDA_KERNEL(class_sums), params);
  if (!means) return check_finite_sums(sums);
  const at::Tensor host = label_ends.cpu();
  check_label_ends(host[0].item<double>(), host[1].item<double>(), label_ids, num_classes);
  if (host[2].item<double>() != 0.0) check_finite_sums(sums);
}

// Adds x's rows into sums and counts by label, or (means, CUDA kernels only)
// writes the class means over sums.
void add_class_sums(Backend backend, at::Tensor& sums, at::Tensor& counts, const at::Tensor& x,
                    const at::Tensor& labels, bool means) {
  check_float_matrix(x, kOp, "x");
  check_backend(x, kOp);
  check_same_device(x, labels, kOp, "x", "labels");
  check_same_device(x, sums, kOp, "x", "sums");
  check_same_device(x, counts, kOp, "x", "counts");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0),
              message(kOp, msg::labels_per_row, {{"rows", std::to_string(x.size(0))}, {"shape", c10::str(labels.sizes())}}));
  TORCH_CHECK(sums.dim() == 2 && sums.size(1) == x.size(1), kOp, ": sums must be [num_classes, ", x.size(1),
              "], got shape ", sums.sizes());
  TORCH_CHECK(sums.scalar_type() == acc_type(x.scalar_type()) && sums.is_contiguous(), kOp,
              ": sums must be a contiguous ", acc_type(x.scalar_type()), " tensor for ", x.scalar_type(),
              " features, got ", sums.scalar_type());
  const int64_t num_classes = sums.size(0);
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == num_classes && counts.scalar_type() == at::kLong, kOp,
              ": counts must be an int64 tensor of shape [", num_classes, "], got ", counts.scalar_type(), " ",
              counts.sizes());
  const at::OptionalDeviceGuard guard(at::device_of(x));
  if (cuda_paths(backend)) return cuda_class_sums(sums, counts, x, integer_indices(labels, kOp, "labels"), means);
  const at::Tensor label_ids = checked_indices(labels, num_classes, kOp, "labels", "num_classes");
  if (x.size(0) == 0 || x.size(1) == 0) {
    counts.add_(at::bincount(label_ids, {}, num_classes));
    return;
  }
  const at::Tensor features = unit_column_stride(x);
  cpu::class_sums(sums_params(sums, features, label_ids));
  counts.add_(at::bincount(label_ids, {}, num_classes));
  check_finite_sums(sums);
}

void class_sums_(at::Tensor& sums, at::Tensor& counts, const at::Tensor& x, const at::Tensor& labels) {
  add_class_sums(backend_of(x), sums, counts, x, labels, /*means=*/false);
}

std::tuple<at::Tensor, at::Tensor> class_means(const at::Tensor& x, const at::Tensor& labels, int64_t num_classes) {
  check_float_matrix(x, kOp, "x");
  TORCH_CHECK(num_classes >= 1, message(kOp, msg::num_classes, {{"value", std::to_string(num_classes)}}));
  // The CUDA kernels write every class's mean and count when there is anything to sum.
  const Backend backend = backend_of(x);
  const bool written_whole = cuda_paths(backend) && x.numel() > 0;
  const auto options = x.options().dtype(acc_type(x.scalar_type()));
  const auto count_options = x.options().dtype(at::kLong);
  at::Tensor sums = written_whole ? at::empty({num_classes, x.size(1)}, options)
                                  : at::zeros({num_classes, x.size(1)}, options);
  at::Tensor counts = written_whole ? at::empty({num_classes}, count_options) : at::zeros({num_classes}, count_options);
  add_class_sums(backend, sums, counts, x, labels, written_whole);
  if (!written_whole) sums.div_(counts.clamp_min(1).unsqueeze(1).to(sums.scalar_type()));
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(alphanet, m) {
  m.def("class_sums_(Tensor(a!) sums, Tensor(b!) counts, Tensor x, Tensor labels) -> ()");
  m.def("class_means(Tensor x, Tensor labels, int num_classes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(alphanet, CPU, m) {
  m.impl("class_sums_", &class_sums_);
  m.impl("class_means", &class_means);
}

#ifdef ALPHANET_WITH_CUDA
TORCH_LIBRARY_IMPL(alphanet, CUDA, m) {
  m.impl("class_sums_", &class_sums_);
  m.impl("class_means", &class_means);
}
#endif

}  // namespace alphanet
