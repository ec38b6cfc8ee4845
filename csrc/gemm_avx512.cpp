// npr::gemm_avx512::gemm_panels: the many-row GEMM of gemm_kernel.h, threads over panels. Built
// for AVX-512: the system headers come first, then the target pragma, then gemm_kernel.h, so its
// AVX-512 code and nothing else gets the target; callers check npr::use_avx512() first.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "gemm_avx512.h"
#include "thread_pool.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")

#include "gemm_kernel.h"

namespace npr::gemm_avx512 {

void gemm_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t N,
                 const float* bias, float* y, int64_t ldy) {
  const int64_t np = (N + kPanel - 1) / kPanel;
  // a task of at least ~64 KiB of panels (a thread wake-up costs a few microseconds)
  const int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / std::max<int64_t>(1, K * kPanel * 4));
  // Rows in chunks whose x stays in L2 (~512 KiB) while every panel passes over it: at 2048 rows
  // x read from L3 for each panel made the kernel 10-20% slower than MKL (prefill).
  const int64_t chunk = std::max<int64_t>(
      kMaxRows, (int64_t(512) << 10) / std::max<int64_t>(1, K * 4) / kMaxRows * kMaxRows);
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t mc = std::min(chunk, M - m0);
    npr::parallel_for(0, np, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel;
        const int nvalid = static_cast<int>(std::min<int64_t>(kPanel, N - n0));
        panel_rows(x + m0 * ldx, ldx, mc, K, w + p * K * kPanel, bias ? bias + n0 : nullptr,
                   y + m0 * ldy + n0, ldy, nvalid, p + 1 < np ? w + (p + 1) * K * kPanel : nullptr);
      }
    });
  }
}

}  // namespace npr::gemm_avx512

#pragma GCC pop_options
