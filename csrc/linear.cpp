// npr::linear_small / npr::linear_packed — y = x @ W^T (+ b) for few rows (decode), CPU.
//
// Why: at decode every row multiplies the same weights, and the weights come from DRAM once per
// step, so the time should be the weight-read time whatever the number of rows, until the FMA
// units saturate. torch's GEMM pays 2-10x for 8 rows instead.
//
// How: the weights are streamed once per call for all rows (kernels in linear_kernel.h), fp32
// or stored as bf16 / fp16 and widened to fp32 in registers (half the bytes; fp32 compute).
//   linear_small(x, weight, bias):    weight as given, [N, K].
//   linear_packed(x, packed, n, bias): weight pre-packed by npr.ops.pack_linear_weight into
//       panels [ceil(N/8), K, 8] (zero-padded past N): all rows in one pass over the weights,
//       faster at 3+ rows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "linear_run.h"

namespace npr {
namespace {
using namespace linear_kernel;

at::Tensor linear_impl(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t n,
                       const std::optional<at::Tensor>& bias) {
  const at::Tensor bc = check_x_bias(op, x, bias, n);
  const int64_t K = x.size(-1);
  check_weight(op, weight, K, n);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) {  // empty reduction: y = bias (or 0)
    if (bc.defined()) {
      y.copy_(bc.expand_as(y));
    } else {
      y.zero_();
    }
    return y;
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t M = rows_of(x);
  run_linear(xc.const_data_ptr<float>(), K, M, K, wc, n,
             bc.defined() ? bc.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>());
  return y;
}

}  // namespace

// x: [..., K] fp32, weight: [N, K] fp32 | bf16 | fp16, bias: [N] fp32 or None -> [..., N] fp32
at::Tensor linear_small_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "npr::linear_small";
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), op,
              ": weight must be [N, K] with K = x.size(-1); got x ", x.sizes(), " weight ",
              weight.sizes());
  return linear_impl(op, x, weight, weight.size(0), bias);
}

// x: [..., K] fp32, packed: [ceil(N/8), K, 8] fp32 | bf16 | fp16 (zero-padded past N), n: N,
// bias: [N] fp32 or None -> [..., N] fp32
at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                             const std::optional<at::Tensor>& bias) {
  const char* op = "npr::linear_packed";
  TORCH_CHECK(is_packed(packed), op,
              ": packed must be [ceil(N/8), K, 8] (npr.ops.pack_linear_weight); got ",
              packed.sizes());
  return linear_impl(op, x, packed, n, bias);
}

}  // namespace npr

TORCH_LIBRARY_FRAGMENT(npr, m) {
  m.def("linear_small(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(npr, CPU, m) {
  m.impl("linear_small", &npr::linear_small_cpu);
  m.impl("linear_packed", &npr::linear_packed_cpu);
}
