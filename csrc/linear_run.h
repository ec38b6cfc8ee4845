// Multi-threaded drivers of the linear kernels (linear_kernel.h) and the checks shared by
// npr::linear_small / npr::linear_packed (linear.cpp) and npr::linear_fused (fused_linear.cpp).
// Threads split the outputs into contiguous ranges, so each thread reads one contiguous part of
// the weights.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "linear_kernel.h"
#include "thread_pool.h"

namespace npr::linear_kernel {

// Minimum weight bytes per parallel task: below ~32 KiB a thread wake-up costs more than it
// saves.
inline constexpr int64_t kMinTaskBytes = int64_t(32) << 10;

// More rows than this, a plain fp32 weight goes to torch's GEMM (= npr.ops.linear.SMALL_ROWS_MAX).
inline constexpr int64_t kGemmRowsMin = 16;

inline int64_t grain_for(int64_t bytes_per_item) {
  return std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(1, bytes_per_item));
}

// x: [M, K] fp32 (row stride ldx), w: [N, K], bias: [N] or nullptr -> y: [M, N]
template <class W>
void run_plain(const float* x, int64_t ldx, int64_t M, const typename W::T* w, int64_t K,
               const float* bias, float* y, int64_t N) {
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(typename W::T));
  npr::parallel_for(0, N, grain_for(row_bytes), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      plain_rows<W>(x, ldx, M, w + n * K, K, bias ? bias[n] : 0.f, y + n, N);
  });
}

// x: [M, K] fp32 (row stride ldx), w: packed [ceil(N/8), K, 8], bias: [N] or nullptr -> y: [M, N]
template <class W>
void run_packed(const float* x, int64_t ldx, int64_t M, const typename W::T* w, int64_t K,
                const float* bias, float* y, int64_t N) {
  const int64_t npanels = (N + kPackN - 1) / kPackN;
  const int64_t panel_elems = K * kPackN;
  const int64_t panel_bytes = panel_elems * static_cast<int64_t>(sizeof(typename W::T));
  npr::parallel_for(0, npanels, grain_for(panel_bytes), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kPackN;
      const int nvalid = static_cast<int>(std::min<int64_t>(kPackN, N - n0));
      panel_rows<W>(x, ldx, M, w + b * panel_elems, K, bias ? bias + n0 : nullptr, y + n0, N,
                    nvalid);
    }
  });
}

// A weight in the packed layout [ceil(N/8), K, 8] (GEMM panels are [ceil(N/32), K, 32]).
inline bool is_packed(const at::Tensor& w) { return w.dim() == 3 && w.size(2) == kPackN; }

// Checks a weight for K inputs and n outputs: plain [n, K] or packed [ceil(n/8), K, 8], fp32 /
// bf16 / fp16 on CPU.
inline void check_weight(const char* op, const at::Tensor& w, int64_t K, int64_t n) {
  const auto wt = w.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kHalf, op,
              ": weight must be float32, bfloat16 or float16, got ", wt);
  TORCH_CHECK(w.device().is_cpu(), op, ": CPU kernel got weight on ", w.device());
  if (w.dim() == 2) {
    TORCH_CHECK(w.size(0) == n && w.size(1) == K, op, ": weight must be [N, K] with K = ", K,
                " and N = ", n, "; got ", w.sizes());
  } else {
    TORCH_CHECK(is_packed(w) && w.size(1) == K && n >= 0 && (n + kPackN - 1) / kPackN == w.size(0),
                op, ": packed must be [ceil(N/8), K, 8] (npr.ops.pack_linear_weight) with K = ",
                K, " and N = ", n, "; got ", w.sizes());
  }
}

// Checks an fp32 CPU x [..., Kx] and an optional fp32 bias [n]; returns the contiguous bias
// (undefined when absent).
inline at::Tensor check_x_bias(const char* op, const at::Tensor& x,
                               const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., K], got a 0-dim tensor");
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU kernel got x on ", x.device());
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ",
              bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [N] with N = ", n,
              "; got ", bias->sizes());
  TORCH_CHECK(bias->device().is_cpu(), op, ": bias on ", bias->device());
  return bias->contiguous();
}

inline int64_t rows_of(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// y: [M, N] = x: [M, K] (row stride ldx) @ W^T (+ bias). w: a contiguous weight that passed
// check_weight.
inline void run_linear(const float* x, int64_t ldx, int64_t M, int64_t K, const at::Tensor& w,
                       int64_t N, const float* bias, float* y) {
  auto go = [&](auto tag) {
    using W = decltype(tag);
    const auto* wp = reinterpret_cast<const typename W::T*>(w.const_data_ptr());
    if (w.dim() == 2) {
      run_plain<W>(x, ldx, M, wp, K, bias, y, N);
    } else {
      run_packed<W>(x, ldx, M, wp, K, bias, y, N);
    }
  };
  switch (w.scalar_type()) {
    case at::kFloat: go(F32{}); break;
    case at::kBFloat16: go(BF16{}); break;
    default: go(F16{}); break;
  }
}

}  // namespace npr::linear_kernel
