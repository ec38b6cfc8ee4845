// The many-row GEMM of npr::linear_fused on AVX-512: y[M, N] = x[M, K] @ W^T with W pre-packed
// in column panels [ceil(N/32), K, 32] (pack: npr.ops.linear.pack_gemm_weight), so no call
// re-packs the weight as a plain GEMM does (MKL's sgemm copies B into its own panels every call:
// at M = 64 on SmolLM2's shapes that copy is 13-20% of the call, measured against MKL's own
// pre-packed sgemm). Outer-product register blocks of MR rows x 32 outputs (2 zmm per row,
// 24 accumulators at MR = 12); a panel stays in L2 while every row block passes over it.
// Torch-free and built only under the AVX-512 target (gemm_avx512.cpp).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "gemm_avx512.h"

namespace npr::gemm_avx512 {

inline constexpr int kMaxRows = 12;    // rows per register block

// MR rows of x (row stride ldx) x one panel [K, 32] -> y rows (stride ldy), the first nvalid of
// the 32 outputs stored (+ bias[0, nvalid) when bias). Meanwhile pf_lines cache lines from pf
// are prefetched into L2, spread over the K steps (a share of the next panel: its first pass
// would otherwise wait on DRAM; measured ~equal to MKL on cold weights without it).
template <int MR>
inline void block(const float* x, int64_t ldx, int64_t K, const float* panel, const float* bias,
                  float* y, int64_t ldy, int nvalid, const char* pf, int64_t pf_lines) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = x + i * ldx;
  int64_t pf_acc = 0;
  for (int64_t k = 0; k < K; ++k) {
    for (pf_acc += pf_lines; pf_acc >= K; pf_acc -= K, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    const __m512 b0 = _mm512_loadu_ps(panel + k * kPanel);
    const __m512 b1 = _mm512_loadu_ps(panel + k * kPanel + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(xr[i][k]);
      acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
    }
  }
  const __mmask16 m0 = nvalid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nvalid) - 1);
  const __mmask16 m1 = nvalid >= 32 ? __mmask16(0xFFFF)
                       : nvalid <= 16 ? __mmask16(0) : __mmask16((1u << (nvalid - 16)) - 1);
  __m512 bv0 = _mm512_setzero_ps(), bv1 = _mm512_setzero_ps();
  if (bias) {
    bv0 = _mm512_maskz_loadu_ps(m0, bias);
    bv1 = _mm512_maskz_loadu_ps(m1, bias + 16);
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(y + i * ldy, m0, _mm512_add_ps(acc[i][0], bv0));
    _mm512_mask_storeu_ps(y + i * ldy + 16, m1, _mm512_add_ps(acc[i][1], bv1));
  }
}

// Rows [0, M) x one panel, in blocks of kMaxRows (the last block smaller); the blocks share the
// prefetch of next (the next panel, or nullptr) between them.
inline void panel_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const float* panel,
                       const float* bias, float* y, int64_t ldy, int nvalid, const float* next) {
  const int64_t nb = (M + kMaxRows - 1) / kMaxRows;
  const int64_t lines = next ? K * kPanel * int64_t(sizeof(float)) / 64 : 0;
  int64_t j = 0;
  auto pf = [&](int64_t b) { return reinterpret_cast<const char*>(next) + (b * lines / nb) * 64; };
  auto pf_n = [&](int64_t b) { return (b + 1) * lines / nb - b * lines / nb; };
  int64_t m = 0;
  for (; m + kMaxRows <= M; m += kMaxRows, ++j)
    block<kMaxRows>(x + m * ldx, ldx, K, panel, bias, y + m * ldy, ldy, nvalid, pf(j), pf_n(j));
  const float* xm = x + m * ldx;
  float* ym = y + m * ldy;
  const char* p = pf(j);
  const int64_t pn = pf_n(j);
  switch (M - m) {
    case 11: block<11>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 10: block<10>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 9: block<9>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 8: block<8>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 7: block<7>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 6: block<6>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 5: block<5>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 4: block<4>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 3: block<3>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 2: block<2>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    case 1: block<1>(xm, ldx, K, panel, bias, ym, ldy, nvalid, p, pn); break;
    default: break;
  }
}

}  // namespace npr::gemm_avx512
