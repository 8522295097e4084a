// The Python module alphanet_ext._C. The ops themselves live in the
// torch.ops.alphanet namespace (csrc/<op>.cpp); importing this module loads them.
// It also exposes the host build of the per-element device functions that only
// the CUDA kernels call, so the CPU test suite can check them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "device_functions.h"
#include "coefficient_grads_params.h"

#ifdef ALPHANET_CUDA_EMULATION
namespace alphanet::emulation {
std::vector<int> self_test(const std::string& name, uint64_t schedule_seed);  // csrc/emulation/self_test.cpp
}
#endif

namespace py = pybind11;

// Build facts that setup.py passes as preprocessor tokens (2_13_0, sm_75_80_90_PTX):
// the torch this module was compiled against (its ABI), and what was compiled.
#define ALPHANET_STRINGIFY_(x) #x
#define ALPHANET_STRINGIFY(x) ALPHANET_STRINGIFY_(x)
#ifndef ALPHANET_TORCH_VERSION
#define ALPHANET_TORCH_VERSION unknown
#endif
#ifndef ALPHANET_NATIVE_BUILD
#define ALPHANET_NATIVE_BUILD 0
#endif

namespace {

using Candidates = std::pair<std::vector<double>, std::vector<int64_t>>;

Candidates topk_insert_all(int k, const std::vector<double>& values) {
  Candidates out{std::vector<double>(k, std::numeric_limits<double>::infinity()),
                 std::vector<int64_t>(k, std::numeric_limits<int64_t>::max())};
  for (size_t i = 0; i < values.size(); ++i) {
    alphanet::topk_insert(out.first.data(), out.second.data(), k, values[i], static_cast<int64_t>(i));
  }
  return out;
}

double segment_sum(const std::vector<double>& x, int64_t row_stride, const std::vector<int64_t>& rows, int64_t begin,
                   int64_t end, int64_t col) {
  return alphanet::segment_sum<double>(0.0, x.data(), row_stride, rows.data(), begin, end, col);
}

std::vector<double> l1_normalized_grad(const std::vector<double>& alphas, const std::vector<double>& grad_normalized) {
  const int k = static_cast<int>(alphas.size());
  const double norm = alphanet::l1_norm<double>(alphas.data(), 1, k);
  std::vector<double> grad(k);
  for (int j = 0; j < k; ++j) {
    grad[j] = alphanet::l1_normalized_grad<double>(alphas.data(), 1, grad_normalized.data(), k, j, norm);
  }
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alphanet_ext compiled kernels (ops are under torch.ops.alphanet)";
  py::dict build;
  build["torch_version"] = ALPHANET_STRINGIFY(ALPHANET_TORCH_VERSION);
  build["native_cpu"] = static_cast<bool>(ALPHANET_NATIVE_BUILD);
#ifdef ALPHANET_WITH_CUDA
  build["cuda_version"] = ALPHANET_STRINGIFY(ALPHANET_CUDA_VERSION);
  build["cuda_archs"] = ALPHANET_STRINGIFY(ALPHANET_CUDA_ARCHS);
#endif
  m.attr("build_info") = build;
  m.def("compiled_with_cuda", []() {
#ifdef ALPHANET_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("has_cuda_emulation", []() {
#ifdef ALPHANET_CUDA_EMULATION
    return true;
#else
    return false;
#endif
  });
#ifdef ALPHANET_CUDA_EMULATION
  m.def("_set_cuda_emulation", &alphanet::emulation::configure, py::arg("on"), py::arg("schedule_seed") = 0,
        "Test facility: while on, ops on CPU tensors run the CUDA kernels on a CPU emulator; a nonzero "
        "schedule_seed shuffles the order in which a block's threads run between barriers.");
  m.def("_cuda_emulation_enabled", &alphanet::emulation::enabled);
  m.def("_emulation_self_test", &alphanet::emulation::self_test, py::arg("name"), py::arg("schedule_seed") = 0);
#endif
  // The packed-input panel width of _coefficient_grads: Python packs the input in this layout.
  m.attr("input_panel") = alphanet::kInputPanel;
  m.def("_topk_insert_all", &topk_insert_all);
  m.def("_segment_sum", &segment_sum);
  m.def("_l1_normalized_grad", &l1_normalized_grad);
}
