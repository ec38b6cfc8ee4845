// npr::rms_norm — y = x / sqrt(mean(x^2) + eps) * weight over the last dim (CPU, fp32 compute).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>

#include "simd.h"
#include "thread_pool.h"

namespace npr {


// x: [..., D] fp32, weight: [D] fp32 -> [..., D]
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "npr::rms_norm: CPU kernel takes float32, got x=", x.scalar_type(),
              " weight=", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.size(0),
              "npr::rms_norm: weight must be [D] with D = x.size(-1); got x ", x.sizes(),
              " weight ", weight.sizes());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t d = xc.size(-1);
  const int64_t rows = d == 0 ? 0 : xc.numel() / d;
  const float* xp = xc.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const float feps = static_cast<float>(eps);
  npr::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) rms_norm_row(xp + r * d, wp, yp + r * d, d, feps);
  });
  return y;
}

}  // namespace npr

TORCH_LIBRARY_FRAGMENT(npr, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(npr, CPU, m) { m.impl("rms_norm", &npr::rms_norm_cpu); }
