// npr::linear_small / npr::linear_packed — y = x @ W^T (+ b) for few rows (decode), CPU.
//
// Why: at decode every row multiplies the same weights, and the weights come from DRAM once per
// step, so the time should be the weight-read time whatever the number of rows, until the FMA
// units saturate. torch's GEMM pays 2-10x for 8 rows instead.
//
// How: the weights are streamed once per call for all rows (kernels in linear_kernel.h), fp32
// or stored as bf16 / fp16 and widened to fp32 in registers (half the bytes; fp32 compute).
// Threads (at::parallel_for) split the outputs into contiguous ranges, so each thread reads one
// contiguous part of the weights.
//   linear_small(x, weight, bias):    weight as given, [N, K].
//   linear_packed(x, packed, n, bias): weight pre-packed by npr.ops.pack_linear_weight into
//       [ceil(N/3), ceil(K/8), 3, 8] (zero-padded): 3 outputs per register block, faster at 4+
//       rows.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "linear_kernel.h"

namespace npr {
namespace {
using namespace linear_kernel;

// Minimum weight bytes per parallel task: below ~32 KiB a thread wake-up costs more than it
// saves.
constexpr int64_t kMinTaskBytes = int64_t(32) << 10;

int64_t grain_for(int64_t bytes_per_item) {
  return std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(1, bytes_per_item));
}

template <class W>
void run_plain(const float* x, int64_t M, const typename W::T* w, int64_t K, const float* bias,
               float* y, int64_t N) {
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(typename W::T));
  at::parallel_for(0, N, grain_for(row_bytes), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      plain_rows<W>(x, K, M, w + n * K, K, bias ? bias[n] : 0.f, y + n, N);
  });
}

template <class W>
void run_packed(const float* x, int64_t ldx, int64_t M, const typename W::T* w, int64_t Kp,
                const float* bias, float* y, int64_t N) {
  const int64_t nblocks = (N + kPackN - 1) / kPackN;
  const int64_t block_elems = Kp * kPackN;
  const int64_t block_bytes = block_elems * static_cast<int64_t>(sizeof(typename W::T));
  at::parallel_for(0, nblocks, grain_for(block_bytes), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kPackN;
      const int nvalid = static_cast<int>(std::min<int64_t>(kPackN, N - n0));
      packed_rows<W>(x, ldx, M, w + b * block_elems, Kp, bias ? bias + n0 : nullptr, y + n0, N,
                     nvalid);
    }
  });
}

// Checks shared by both ops; returns the contiguous bias (undefined when absent).
at::Tensor check_common(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t n,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kHalf, op,
              ": weight must be float32, bfloat16 or float16, got ", wt);
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., K], got a 0-dim tensor");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": CPU kernel got x on ",
              x.device(), ", weight on ", weight.device());
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ",
              bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [N] with N = ", n,
              "; got ", bias->sizes());
  TORCH_CHECK(bias->device().is_cpu(), op, ": bias on ", bias->device());
  return bias->contiguous();
}

at::Tensor empty_out(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return at::empty(shape, x.options());
}

// y[..] = bias (or 0) for an empty reduction (K = 0).
void fill_bias(at::Tensor& y, const at::Tensor& bias) {
  if (bias.defined()) {
    y.copy_(bias.expand_as(y));
  } else {
    y.zero_();
  }
}

int64_t rows_of(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

template <class Fn>
void dispatch_weight(at::ScalarType wt, Fn&& fn) {
  if (wt == at::kFloat) {
    fn(F32{});
  } else if (wt == at::kBFloat16) {
    fn(BF16{});
  } else {
    fn(F16{});
  }
}

template <class W>
const typename W::T* weight_ptr(const at::Tensor& w) {
  return reinterpret_cast<const typename W::T*>(w.const_data_ptr());
}

}  // namespace

// x: [..., K] fp32, weight: [N, K] fp32 | bf16 | fp16, bias: [N] fp32 or None -> [..., N] fp32
at::Tensor linear_small_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "npr::linear_small";
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), op,
              ": weight must be [N, K] with K = x.size(-1); got x ", x.sizes(), " weight ",
              weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor bc = check_common(op, x, weight, N, bias);
  at::Tensor y = empty_out(x, N);
  if (y.numel() == 0) return y;
  if (K == 0) {
    fill_bias(y, bc);
    return y;
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const float* bp = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
  dispatch_weight(wc.scalar_type(), [&](auto tag) {
    using W = decltype(tag);
    run_plain<W>(xc.const_data_ptr<float>(), rows_of(x), weight_ptr<W>(wc), K, bp,
                 y.mutable_data_ptr<float>(), N);
  });
  return y;
}

// x: [..., K] fp32, packed: [ceil(N/3), ceil(K/8), 3, 8] fp32 | bf16 | fp16 (zero-padded),
// n: N, bias: [N] fp32 or None -> [..., N] fp32
at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                             const std::optional<at::Tensor>& bias) {
  const char* op = "npr::linear_packed";
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., K], got a 0-dim tensor");
  const int64_t K = x.size(-1);
  const int64_t Kp = (K + kPackK - 1) / kPackK * kPackK;
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPackN && packed.size(3) == kPackK &&
                  packed.size(1) * kPackK == Kp && n >= 0 &&
                  (n + kPackN - 1) / kPackN == packed.size(0),
              op, ": packed must be [ceil(N/3), ceil(K/8), 3, 8] (npr.ops.pack_linear_weight) ",
              "with K = x.size(-1) = ", K, " and N = n = ", n, "; got ", packed.sizes());
  const at::Tensor bc = check_common(op, x, packed, n, bias);
  at::Tensor y = empty_out(x, n);
  if (y.numel() == 0) return y;
  if (K == 0) {
    fill_bias(y, bc);
    return y;
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = packed.contiguous();
  const int64_t M = rows_of(x);
  // The packed weights are zero past K; x gets a zero-padded copy so the kernel needs no K tail.
  std::vector<float> xpad;
  const float* xp = xc.const_data_ptr<float>();
  if (Kp != K) {
    xpad.assign(static_cast<size_t>(M * Kp), 0.f);
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(xpad.data() + m * Kp, xp + m * K, sizeof(float) * static_cast<size_t>(K));
    xp = xpad.data();
  }
  const float* bp = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
  dispatch_weight(wc.scalar_type(), [&](auto tag) {
    using W = decltype(tag);
    run_packed<W>(xp, Kp, M, weight_ptr<W>(wc), Kp, bp, y.mutable_data_ptr<float>(), n);
  });
  return y;
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
