// Register-blocked weight-streaming kernels behind npr::linear_small / npr::linear_packed
// (csrc/linear.cpp). Torch-free so they can be compiled and timed on their own.
//
// Both read the weights as ONE sequential stream per thread (measured here: reading 2-4 weight
// rows side by side halves the DRAM bandwidth of a thread, while one stream plus software
// prefetch ~8 KiB ahead reaches the machine's read bandwidth):
//  * plain [N, K] weights: one output row at a time, up to 8 x rows per register block
//    (8 accumulators; fewer rows use several accumulator sets along K);
//  * packed [N/3, K/8, 3, 8] weights (pack_linear_weight): 3 outputs x up to 4 rows per
//    block, so each x load feeds 3 FMAs and each weight load 4: a higher FMA rate at 4+ rows,
//    where the FMA units (not DRAM) become the limit (1 thread, weights in cache, 576x1536:
//    84-89 vs 64-77 GFLOP/s at 4-8 rows; 49 -> 68 at K = 1536, where 8 x rows leave L1).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace npr::linear_kernel {

// Weight storage formats: 8 consecutive weights as fp32, and one as a scalar (K tail).
struct F32 {
  using T = float;
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  static float load1(const float* p) { return *p; }
};
struct BF16 {
  using T = uint16_t;
  static __m256 load8(const uint16_t* p) { return load_bf16x8(p); }
  static float load1(const uint16_t* p) {
    const uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
struct F16 {
  using T = uint16_t;
  static __m256 load8(const uint16_t* p) { return load_fp16x8(p); }
  static float load1(const uint16_t* p) { return _cvtsh_ss(*p); }
};

// Software prefetch: this many bytes ahead in the weight stream, into L2 (T1), for calls with
// at least kPrefetchMinRows rows. Measured on the build machine (1 thread, 576x6144, best of
// 30, A/B interleaved): at 8 rows, 8 KiB into L2 overlaps DRAM with the FMAs (packed fp32
// 1.48 -> 0.79 ms, bf16 1.02 -> 0.65 ms; 1 KiB into L1 gave 1.34 ms); at 1-3 rows the
// hardware prefetcher alone is as fast or faster (packed fp32, 1 row: 0.44 vs 0.55 ms).
#ifndef NPR_LINEAR_PREFETCH_BYTES
#define NPR_LINEAR_PREFETCH_BYTES 8192
#endif
#ifndef NPR_LINEAR_PREFETCH_HINT
#define NPR_LINEAR_PREFETCH_HINT _MM_HINT_T1
#endif
#ifndef NPR_LINEAR_PREFETCH_MIN_ROWS
#define NPR_LINEAR_PREFETCH_MIN_ROWS 4
#endif
constexpr int64_t kPrefetchBytes = NPR_LINEAR_PREFETCH_BYTES;
constexpr int64_t kPrefetchMinRows = NPR_LINEAR_PREFETCH_MIN_ROWS;

template <class T>
inline void prefetch(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), NPR_LINEAR_PREFETCH_HINT);
}

// Sums of 8 accumulators: [sum(a[0]), ..., sum(a[7])].
inline __m256 hsum8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 q0 = _mm256_hadd_ps(h01, h23);  // per 128-bit half: partial s0 s1 s2 s3
  const __m256 q1 = _mm256_hadd_ps(h45, h67);  // per 128-bit half: partial s4 s5 s6 s7
  const __m256 lo = _mm256_permute2f128_ps(q0, q1, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(q0, q1, 0x31);
  return _mm256_add_ps(lo, hi);
}

// Accumulator sets along K so that >= 8 independent FMA chains are in flight (2 FMA pipes x
// 4 cycles latency), given MB * NB accumulators per set.
constexpr int sets_for(int mb, int nb) { return (8 + mb * nb - 1) / (mb * nb); }

// ---- plain [N, K] weights --------------------------------------------------------------------

// Rows [0, MB) of x (row stride ldx) times ONE weight row w[0, K) -> y[i * ldy], + bias.
template <class W, int MB>
inline void row_block(const float* __restrict x, int64_t ldx, const typename W::T* __restrict w,
                      int64_t K, float bias, float* __restrict y, int64_t ldy, bool pf) {
  using T = typename W::T;
  constexpr int U = sets_for(MB, 1);
  constexpr int64_t ahead = kPrefetchBytes / static_cast<int64_t>(sizeof(T));
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));  // weights per cache line
  __m256 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MB; ++i) acc[u][i] = _mm256_setzero_ps();
  int64_t k = 0;
  const int64_t KU = K - K % (8 * U);
  for (; k < KU; k += 8 * U) {
    // One prefetch per cache line; it runs on into the next weight rows.
    if (ahead > 0 && pf && (k % line) < 8 * U) prefetch(w + k + ahead);
    for (int u = 0; u < U; ++u) {
      const __m256 wv = W::load8(w + k + 8 * u);
      for (int i = 0; i < MB; ++i)
        acc[u][i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * ldx + k + 8 * u), acc[u][i]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = W::load8(w + k);
    for (int i = 0; i < MB; ++i)
      acc[0][i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * ldx + k), acc[0][i]);
  }
  for (int u = 1; u < U; ++u)
    for (int i = 0; i < MB; ++i) acc[0][i] = _mm256_add_ps(acc[0][i], acc[u][i]);
  float out[MB];
  int i = 0;
  if constexpr (MB == 8) {
    _mm256_storeu_ps(out, hsum8(acc[0]));
    i = 8;
  }
  for (; i < MB; ++i) out[i] = hsum256(acc[0][i]);
  for (; k < K; ++k) {  // K tail (K % 8 weights)
    const float wk = W::load1(w + k);
    for (int r = 0; r < MB; ++r) out[r] += wk * x[r * ldx + k];
  }
  for (int r = 0; r < MB; ++r) y[r * ldy] = out[r] + bias;
}

// Near-equal split of M rows into blocks of at most MBmax (12 -> 6+6, 9 -> 5+4): calls
// fn(m0, mb) per block, in order.
template <int MBmax, class Fn>
inline void split_rows(int64_t M, Fn&& fn) {
  const int64_t nblk = (M + MBmax - 1) / MBmax;
  int64_t m = 0;
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t mb = (M - m + (nblk - b) - 1) / (nblk - b);
    fn(m, mb);
    m += mb;
  }
}

// All M rows of x times one weight row n: y[:, n]. Only the first row block prefetches; the
// others re-read the weight row from L1/L2.
template <class W>
inline void plain_rows(const float* x, int64_t ldx, int64_t M, const typename W::T* w, int64_t K,
                       float bias, float* y, int64_t ldy) {
  split_rows<8>(M, [&](int64_t m0, int64_t mb) {
    const float* xb = x + m0 * ldx;
    float* yb = y + m0 * ldy;
    const bool pf = m0 == 0 && M >= kPrefetchMinRows;
    switch (mb) {
      case 1: row_block<W, 1>(xb, ldx, w, K, bias, yb, ldy, pf); break;
      case 2: row_block<W, 2>(xb, ldx, w, K, bias, yb, ldy, pf); break;
      case 3: row_block<W, 3>(xb, ldx, w, K, bias, yb, ldy, pf); break;
      case 4: row_block<W, 4>(xb, ldx, w, K, bias, yb, ldy, pf); break;
      case 5: row_block<W, 5>(xb, ldx, w, K, bias, yb, ldy, pf); break;
      case 6: row_block<W, 6>(xb, ldx, w, K, bias, yb, ldy, pf); break;
      case 7: row_block<W, 7>(xb, ldx, w, K, bias, yb, ldy, pf); break;
      default: row_block<W, 8>(xb, ldx, w, K, bias, yb, ldy, pf); break;
    }
  });
}

// ---- packed [N/3, Kp/8, 3, 8] weights --------------------------------------------------------

constexpr int kPackN = 3;  // outputs per packed block
constexpr int kPackK = 8;  // weights of one output per packed chunk (one ymm)
constexpr int kPackRows = 4;  // x rows per register block: 4 x 3 = 12 accumulators

// Rows [0, MB) of x (row stride ldx, Kp columns, zero-padded past K) times one packed block
// wb: [Kp/8][3][8] -> y[i * ldy + j] for j < nvalid, + bias[j].
//
// PF (software prefetch) is a template parameter and the sums are taken over compile-time
// indices before the runtime nvalid picks the stored ones: a runtime branch in the loop or a
// runtime index into acc made GCC keep acc in memory and store every accumulator on every
// iteration (1 thread, weights in L1, 576 x 126: 8 rows 34 -> 53 GFLOP/s on a Zen 3 VM).
template <class W, int MB, bool PF>
inline void packed_block(const float* __restrict x, int64_t ldx,
                         const typename W::T* __restrict wb, int64_t Kp,
                         const float* __restrict bias, float* __restrict y, int64_t ldy,
                         int nvalid) {
  using T = typename W::T;
  constexpr int NB = kPackN;
  constexpr int U = sets_for(MB, NB);
  constexpr int64_t ahead = kPrefetchBytes / static_cast<int64_t>(sizeof(T));
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  constexpr int64_t step = 8 * U * NB;  // weights consumed per step
  __m256 acc[U][MB][NB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[u][i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  const int64_t KU = Kp - Kp % (8 * U);
  for (; k < KU; k += 8 * U) {
    const T* wk = wb + k * NB;
    if constexpr (ahead > 0 && PF) {
      for (int64_t o = 0; o < step; o += line) prefetch(wk + ahead + o);
    }
    for (int u = 0; u < U; ++u) {
      __m256 wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = W::load8(wk + (u * NB + j) * 8);
      for (int i = 0; i < MB; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + i * ldx + k + 8 * u);
        for (int j = 0; j < NB; ++j) acc[u][i][j] = _mm256_fmadd_ps(wv[j], xv, acc[u][i][j]);
      }
    }
  }
  for (; k < Kp; k += 8) {
    const T* wk = wb + k * NB;
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = W::load8(wk + j * 8);
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NB; ++j) acc[0][i][j] = _mm256_fmadd_ps(wv[j], xv, acc[0][i][j]);
    }
  }
  for (int u = 1; u < U; ++u)
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[0][i][j] = _mm256_add_ps(acc[0][i][j], acc[u][i][j]);
  float out[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i][j] = hsum256(acc[0][i][j]);
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < nvalid; ++j) y[i * ldy + j] = out[i][j] + (bias ? bias[j] : 0.f);
}

// All M rows of x times one packed block (3 outputs, nvalid of them real), in register blocks
// of at most MaxRows rows: 4 with AVX2's 16 registers; 8 (24 accumulators) where the caller is
// compiled for AVX-512VL's 32 (linear_avx512.cpp), so the block's weights are read once for 8 rows.
template <class W, int MaxRows = kPackRows>
inline void packed_rows(const float* x, int64_t ldx, int64_t M, const typename W::T* wb,
                        int64_t Kp, const float* bias, float* y, int64_t ldy, int nvalid) {
  static_assert(MaxRows >= 1 && MaxRows <= 8, "packed_rows: 1..8 rows per register block");
  split_rows<MaxRows>(M, [&](int64_t m0, int64_t mb) {
    const float* xb = x + m0 * ldx;
    float* yb = y + m0 * ldy;
    const bool pf = m0 == 0 && M >= kPrefetchMinRows;
    auto block = [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      if constexpr (R <= MaxRows) {
        if (pf)
          packed_block<W, R, true>(xb, ldx, wb, Kp, bias, yb, ldy, nvalid);
        else
          packed_block<W, R, false>(xb, ldx, wb, Kp, bias, yb, ldy, nvalid);
      }
    };
    switch (mb) {
      case 1: block(std::integral_constant<int, 1>{}); break;
      case 2: block(std::integral_constant<int, 2>{}); break;
      case 3: block(std::integral_constant<int, 3>{}); break;
      case 4: block(std::integral_constant<int, 4>{}); break;
      case 5: block(std::integral_constant<int, 5>{}); break;
      case 6: block(std::integral_constant<int, 6>{}); break;
      case 7: block(std::integral_constant<int, 7>{}); break;
      default: block(std::integral_constant<int, 8>{}); break;
    }
  });
}

// packed_rows with 8-row register blocks, compiled for AVX-512VL (linear_avx512.cpp); call only
// when use_avx512() (cpu_isa.h).
template <class W>
void packed_rows_avx512(const float* x, int64_t ldx, int64_t M, const typename W::T* wb,
                        int64_t Kp, const float* bias, float* y, int64_t ldy, int nvalid);

}  // namespace npr::linear_kernel
