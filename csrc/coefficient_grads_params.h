// coefficient_grads: the parameter structs its op driver (csrc/coefficient_grads.cpp) fills and its
// backends' kernels read, and those kernels' entry points. Free of ATen, so the
// .cu files stay light to compile.
#pragma once

#include "kernel_common.h"

namespace alphanet {

// _coefficient_grads on the CPU: products with the coefficient networks' input,
// packed once per fit as panels [num_panels, padded_dims, kInputPanel] of its
// columns (panel p, row d, slot j holds inputs_t[d, p * kInputPanel + j]; zeros
// past dims and num_few). Float32; `columns` a multiple of 16.
// Or, with `table` set, gathered: input column c is the rows table[ids[c, 0]],
// ..., table[ids[c, parts - 1]] (each `row_width` long) one after another, and
// each panel is laid out from them as it is used (never the whole input).
constexpr int kInputPanel = 6;
struct InputProductParams {
  const float* panels;  // null when gathered
  int64_t num_panels, padded_dims, dims, num_few;
  const float* table;   // [rows, row_width]; null when packed
  const int64_t* ids;   // [num_few, parts]
  int64_t row_width, parts;
  const float* right;   // forward: [dims, columns]; backward: [num_few, columns]; contiguous
  int64_t columns;
  float* out;           // forward: [num_panels * kInputPanel, columns]; backward: [padded_dims, columns]
};

namespace cpu {
bool input_products_supported();
void input_product_forward(const InputProductParams& p);   // out = inputs_t^T @ right
void input_product_backward(const InputProductParams& p);  // out = inputs_t @ right
}  // namespace cpu

}  // namespace alphanet
