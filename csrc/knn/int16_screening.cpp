// kNN by the CPU's int16 screening: queries and keys coded as int16 in a frame
// centred on the keys' mean; their integer products bound every distance from
// both sides, and only keys whose lower bound can still beat the running k-th
// upper bound are ranked in float64. The bound, its proof and the AVX2 kernel
// are in cpu/knn_cpu.cpp (knn_screened); the result is the exact float64 top-k.
#include "knn_ranking.h"

namespace alphanet::knn {

bool int16_screening_supported() { return cpu::knn_screening_supported(); }

std::tuple<at::Tensor, at::Tensor> int16_knn(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                             bool cosine) {
  at::Tensor distances = at::empty({queries.size(0), k}, queries.options().dtype(acc_type(queries.scalar_type())));
  at::Tensor indices = at::empty({queries.size(0), k}, queries.options().dtype(at::kLong));
  ScreenedKnnParams params{};
  const at::Tensor q = unit_column_stride(queries), x = unit_column_stride(keys);
  set_rows(params, q, x);
  params.cosine = cosine;
  const at::Tensor center = frame_center(keys, cosine);
  params.center = center.data_ptr<double>();
  params.num_queries = queries.size(0);
  params.num_keys = keys.size(0);
  params.k = k;
  params.distances = distances.data_ptr();
  params.indices = indices.data_ptr<int64_t>();
  cpu::knn_screened(params);
  return {distances, indices};
}

}  // namespace alphanet::knn
