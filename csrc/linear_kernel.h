// Register-blocked weight-streaming kernels behind npr::linear_small / npr::linear_packed
// (csrc/linear.cpp). Torch-free so they can be compiled and timed on their own.
//
// Both read the weights as ONE sequential stream per thread (measured here: reading 2-4 weight
// rows side by side halves the DRAM bandwidth of a thread, while one stream plus software
// prefetch ~8 KiB ahead reaches the machine's read bandwidth):
//  * plain [N, K] weights: one output row at a time, up to 8 x rows per register block
//    (8 accumulators; fewer rows use several accumulator sets along K);
//  * packed [ceil(N/8), K, 8] weights (pack_linear_weight): panels of 8 outputs; per input k
//    one weight vector (the 8 outputs' weights) times each row's x[k] broadcast, up to 8 rows
//    in one pass, so all rows are done while the weights stream in once. Measured on a Zen 3
//    VM (2 threads, SmolLM2's 121 linears, weights cold, in one process alternating): 8 rows
//    17.7-20.6 ms vs 24.8-26.6 ms for the previous 3-outputs x 8-inputs dot-product blocks,
//    1-4 rows equal within noise: at 8 rows the old blocks were compute-bound, these overlap.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <numeric>
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
// at least kPrefetchMinRows rows. Measured on a Zen 1 VM with the earlier dot-product packed
// layout (1 thread, 576x6144, best of 30, A/B interleaved): at 8 rows, 8 KiB into L2 overlaps
// DRAM with the FMAs (fp32 1.48 -> 0.79 ms, bf16 1.02 -> 0.65 ms; 1 KiB into L1 gave
// 1.34 ms); at 1-3 rows the hardware prefetcher alone is as fast or faster (1 row: 0.44 vs
// 0.55 ms). Rechecked for the panel layout on a Zen 3 VM (2 threads, SmolLM2's linears):
// prefetching costs 20-30% at 1-2 rows, is about even at 3, and 4-32 KiB ahead are equal at 8.
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

// ---- packed [ceil(N/8), K, 8] weights -----------------------------------------------------

constexpr int kPackN = 8;     // outputs per panel (one ymm of fp32)
constexpr int kPackRows = 8;  // x rows per register block: 8 accumulators, one pass

// Rows [0, MB) of x (row stride ldx) times one panel p: [K][8] -> y[i * ldy + j] for
// j < nvalid, + bias[j]. U accumulator sets along K keep >= 8 independent FMA chains in flight
// (2 FMA pipes x 4 cycles latency) at few rows. PF (software prefetch of the weight stream) and
// every index into acc are compile-time: a runtime branch in the loop or a runtime index into
// acc makes GCC keep acc in memory and store it on every iteration.
template <class W, int MB, bool PF>
inline void panel_block(const float* __restrict x, int64_t ldx, int64_t K,
                        const typename W::T* __restrict p, const float* __restrict bias,
                        float* __restrict y, int64_t ldy, int nvalid) {
  using T = typename W::T;
  constexpr int U = sets_for(MB, 1);
  // k steps per iteration: a multiple of U covering whole 64-byte lines of weights
  constexpr int64_t per_line = 64 / (kPackN * static_cast<int64_t>(sizeof(T)));
  constexpr int64_t S = std::lcm(static_cast<int64_t>(U), per_line);
  constexpr int64_t ahead = kPrefetchBytes / static_cast<int64_t>(sizeof(T));
  __m256 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MB; ++i) acc[u][i] = _mm256_setzero_ps();
  int64_t k = 0;
  const int64_t KS = K - K % S;
  for (; k < KS; k += S) {
    const T* wk = p + k * kPackN;
    if constexpr (ahead > 0 && PF) {
      for (int64_t o = 0; o < S * kPackN; o += 64 / static_cast<int64_t>(sizeof(T)))
        prefetch(wk + ahead + o);
    }
    for (int s = 0; s < S; ++s) {
      const __m256 wv = W::load8(wk + s * kPackN);
      for (int i = 0; i < MB; ++i)
        acc[s % U][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + i * ldx + k + s), wv, acc[s % U][i]);
    }
  }
  for (; k < K; ++k) {
    const __m256 wv = W::load8(p + k * kPackN);
    for (int i = 0; i < MB; ++i)
      acc[0][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + i * ldx + k), wv, acc[0][i]);
  }
  for (int u = 1; u < U; ++u)
    for (int i = 0; i < MB; ++i) acc[0][i] = _mm256_add_ps(acc[0][i], acc[u][i]);
  if (nvalid == kPackN) {
    const __m256 bv = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    for (int i = 0; i < MB; ++i) _mm256_storeu_ps(y + i * ldy, _mm256_add_ps(acc[0][i], bv));
    return;
  }
  float out[MB][kPackN];  // the panel's last outputs past N are padding
  for (int i = 0; i < MB; ++i) _mm256_storeu_ps(out[i], acc[0][i]);
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < nvalid; ++j) y[i * ldy + j] = out[i][j] + (bias ? bias[j] : 0.f);
}

// All M rows of x times one panel (8 outputs, nvalid of them real), in near-equal blocks of at
// most kPackRows rows. Only the first block prefetches (calls of kPrefetchMinRows rows or
// more: below, the hardware prefetcher alone was as fast); later blocks re-read the panel from
// L1/L2.
template <class W>
inline void panel_rows(const float* x, int64_t ldx, int64_t M, const typename W::T* p, int64_t K,
                       const float* bias, float* y, int64_t ldy, int nvalid) {
  split_rows<kPackRows>(M, [&](int64_t m0, int64_t mb) {
    const float* xb = x + m0 * ldx;
    float* yb = y + m0 * ldy;
    const bool pf = m0 == 0 && M >= kPrefetchMinRows;
    auto block = [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      if (pf)
        panel_block<W, R, true>(xb, ldx, K, p, bias, yb, ldy, nvalid);
      else
        panel_block<W, R, false>(xb, ldx, K, p, bias, yb, ldy, nvalid);
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

}  // namespace npr::linear_kernel
