// The Python module alphanet_ext._C. The ops themselves live in the
// torch.ops.alphanet namespace (csrc/<op>.cpp); importing this module loads them.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alphanet_ext compiled kernels (ops are under torch.ops.alphanet)";
  m.def("compiled_with_cuda", []() {
#ifdef ALPHANET_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
