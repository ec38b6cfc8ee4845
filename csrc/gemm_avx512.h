// Declaration of the AVX-512 many-row GEMM (gemm_avx512.cpp; kernel: gemm_kernel.h).
#pragma once
#include <cstdint>

namespace npr::gemm_avx512 {

inline constexpr int64_t kPanel = 32;  // outputs per panel

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T (+ bias [N] when not null), W packed
// as panels [ceil(N/32), K, 32] zero-padded past N. Needs AVX-512 (npr::use_avx512()).
void gemm_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t N,
                 const float* bias, float* y, int64_t ldy);

}  // namespace npr::gemm_avx512
