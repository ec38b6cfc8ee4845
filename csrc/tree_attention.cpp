// npr::tree_attention — branch-tree (cascade / shared-prefix) attention over a paged KV cache.
// Schema + CPU kernels (fp32 compute; fp32/bf16/fp16 storage): the row kernel below (AVX2/FMA,
// any shape) and, for tasks with >= 16 query rows, the wide kernel (tree_attention_wide.h) built
// for AVX2 here and for AVX-512 in tree_attention_avx512.cpp.
//
// The planner (npr/ops/attention.py) turns the tree into work items: (a chunk of one segment's
// cache entries, the queries of the rows that read it). A task is (item, kv head): its queries'
// G heads each (a [M = queries * G, D] matrix) attend the item's keys with an online softmax,
// reading each key once for all of them; the task writes per (query, head) a partial output and
// its log-sum-exp. A merge then combines each query's partials by log-sum-exp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_ops.h"
#include "simd.h"
#include "thread_pool.h"
#include "tree_attention_check.h"
#include "tree_attention_cpu.h"
#include "tree_attention_wide.h"

namespace npr {
namespace {

// Keys per tile of the row kernel: 32, or 8 for tasks of >= kLongTask keys. A task of few query
// rows over many keys is a memory stream, and small tiles keep the prefetch of the next tile
// short and frequent: with the prefetches spread over the compute (KeyTiles), 8 vs 32 measured
// 11 vs 12.6 ms on 8 flat rows of 8K tokens and 5.0 vs 6.5 ms on one 32K-token row; 32 is
// 5-8% faster on 512-key rows.
constexpr int kMaxTile = 32;
constexpr int kMaxTileKeys = kMaxTile;  // pv_row's tail
constexpr int kLongTask = 768;
constexpr float NEG_INF = TA_NEG_INF;


// [hsum(a0), ..., hsum(a7)]
inline __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                      __m256 a7) {
  __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// s0[0..4) = q0 . k[0..4), s1[0..4) = q1 . k[0..4) over D (2 queries x 4 keys: 6 loads per 8 FMA).
inline void qk_2x4(const float* q0, const float* q1, const float* const* k, int64_t D, float* s0,
                   float* s1) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 x0 = _mm256_loadu_ps(q0 + d), x1 = _mm256_loadu_ps(q1 + d);
    const __m256 y0 = _mm256_loadu_ps(k0 + d), y1 = _mm256_loadu_ps(k1 + d);
    const __m256 y2 = _mm256_loadu_ps(k2 + d), y3 = _mm256_loadu_ps(k3 + d);
    a0 = _mm256_fmadd_ps(x0, y0, a0);
    a1 = _mm256_fmadd_ps(x0, y1, a1);
    a2 = _mm256_fmadd_ps(x0, y2, a2);
    a3 = _mm256_fmadd_ps(x0, y3, a3);
    a4 = _mm256_fmadd_ps(x1, y0, a4);
    a5 = _mm256_fmadd_ps(x1, y1, a5);
    a6 = _mm256_fmadd_ps(x1, y2, a6);
    a7 = _mm256_fmadd_ps(x1, y3, a7);
  }
  const __m256 r = reduce8(a0, a1, a2, a3, a4, a5, a6, a7);
  _mm_storeu_ps(s0, _mm256_castps256_ps128(r));
  _mm_storeu_ps(s1, _mm256_extractf128_ps(r, 1));
  for (; d < D; ++d) {
    for (int j = 0; j < 4; ++j) {
      s0[j] += q0[d] * k[j][d];
      s1[j] += q1[d] * k[j][d];
    }
  }
}

// s[0..8) = q . k[0..8) over D (one query x 8 keys: a lone query row, e.g. a decode row of a
// model without grouped heads, does not pay for a duplicate second row in qk_2x4).
inline void qk_1x8(const float* q, const float* const* k, int64_t D, float* s) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 x = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[j] + d), a[j]);
  }
  _mm256_storeu_ps(s, reduce8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
  for (; d < D; ++d)
    for (int j = 0; j < 8; ++j) s[j] += q[d] * k[j][d];
}

// acc[i][0..D) += sum_{j < nj} p[i][j] * v[j][0..D) for MB rows (MB x 16 columns in registers).
template <int MB>
inline void pv_block(float* const* acc, const float* const* p, const float* const* v, int nj,
                     int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m256 c0[MB], c1[MB];
    for (int i = 0; i < MB; ++i) {
      c0[i] = _mm256_loadu_ps(acc[i] + d);
      c1[i] = _mm256_loadu_ps(acc[i] + d + 8);
    }
    for (int j = 0; j < nj; ++j) {
      const __m256 v0 = _mm256_loadu_ps(v[j] + d), v1 = _mm256_loadu_ps(v[j] + d + 8);
      for (int i = 0; i < MB; ++i) {
        const __m256 pb = _mm256_broadcast_ss(p[i] + j);
        c0[i] = _mm256_fmadd_ps(pb, v0, c0[i]);
        c1[i] = _mm256_fmadd_ps(pb, v1, c1[i]);
      }
    }
    for (int i = 0; i < MB; ++i) {
      _mm256_storeu_ps(acc[i] + d, c0[i]);
      _mm256_storeu_ps(acc[i] + d + 8, c1[i]);
    }
  }
  for (; d + 8 <= D; d += 8) {
    __m256 c0[MB];
    for (int i = 0; i < MB; ++i) c0[i] = _mm256_loadu_ps(acc[i] + d);
    for (int j = 0; j < nj; ++j) {
      const __m256 v0 = _mm256_loadu_ps(v[j] + d);
      for (int i = 0; i < MB; ++i) c0[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p[i] + j), v0, c0[i]);
    }
    for (int i = 0; i < MB; ++i) _mm256_storeu_ps(acc[i] + d, c0[i]);
  }
  for (; d < D; ++d)
    for (int i = 0; i < MB; ++i) {
      float s = acc[i][d];
      for (int j = 0; j < nj; ++j) s += p[i][j] * v[j][d];
      acc[i][d] = s;
    }
}

// acc[0..D) += sum_{j < nj} p[j] * v[j][0..D) for one row: 32 columns (4 registers) per pass
// and even / odd keys in separate accumulators (8 independent FMA chains: pv_block<1> has 2,
// and a decode row's PV waited on FMA latency).
inline void pv_row(float* acc, const float* p, const float* const* v, int nj, int64_t D) {
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    __m256 c[4], e[4];
    for (int r = 0; r < 4; ++r) {
      c[r] = _mm256_loadu_ps(acc + d + 8 * r);
      e[r] = _mm256_setzero_ps();
    }
    int j = 0;
    for (; j + 2 <= nj; j += 2) {
      const __m256 p0 = _mm256_broadcast_ss(p + j), p1 = _mm256_broadcast_ss(p + j + 1);
      for (int r = 0; r < 4; ++r) {
        c[r] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v[j] + d + 8 * r), c[r]);
        e[r] = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v[j + 1] + d + 8 * r), e[r]);
      }
    }
    if (j < nj) {
      const __m256 p0 = _mm256_broadcast_ss(p + j);
      for (int r = 0; r < 4; ++r) c[r] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v[j] + d + 8 * r), c[r]);
    }
    for (int r = 0; r < 4; ++r) _mm256_storeu_ps(acc + d + 8 * r, _mm256_add_ps(c[r], e[r]));
  }
  if (d < D) {
    float* a[1] = {acc + d};
    const float* pr[1] = {p};
    const float* vs[kMaxTileKeys];
    for (int j = 0; j < nj; ++j) vs[j] = v[j] + d;
    pv_block<1>(a, pr, vs, nj, D - d);
  }
}

template <typename T>
using Ctx = TreeAttentionCtx<T>;

// The wide kernel's vector ISA here: AVX2, 8 queries per register, 16 registers (12
// accumulators + 3 query or probability registers + 1 broadcast per block). Tiles of 24 keys:
// with 48 the K/V tile, Qt and Ot of D = 128 overflow L1 (measured 5-7% slower).
struct Avx2 {
  using reg = __m256;
  static constexpr int kLanes = 8, kMaxQueryRegs = 3, kAccumulators = 12, kTileKeys = 24;
  static constexpr int value_cols(int nq) { return nq == 1 ? 8 : 4; }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static __m256i load_int(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static reg all_true() { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }
  static reg greater(__m256i a, int32_t b) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(a, _mm256_set1_epi32(b)));
  }
  static reg not_equal(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_OQ); }
  static reg select(reg m, reg a, reg b) { return _mm256_blendv_ps(b, a, m); }  // m ? a : b
  static reg exp(reg x) { return exp256(x); }
};

struct Scratch {
  std::vector<float> Q, acc, S, mrow, lrow, kbuf, vbuf, zero;
  std::vector<int> nv, rownv;
  const float* kp[kMaxTile];
  const float* vp[kMaxTile];
  void reserve(int64_t M, int64_t D) {
    if (static_cast<int64_t>(mrow.size()) < M) {
      Q.resize(M * D);
      acc.resize(M * D);
      S.resize(M * kMaxTile);
      mrow.resize(M);
      lrow.resize(M);
      nv.resize(M);
      rownv.resize(M);
    }
    if (static_cast<int64_t>(zero.size()) < D) {
      zero.assign(D, 0.f);
      kbuf.resize(kMaxTile * D);
      vbuf.resize(kMaxTile * D);
    }
  }
};

// One task: item w, kv head kvh, in tiles of KT keys.
template <typename T, int KT>
void run_task_tiles(const Ctx<T>& c, int64_t w, int64_t kvh, Scratch& s) {
  const int64_t D = c.D, G = c.G;
  const int64_t p0 = c.item_part_indptr[w], nq = c.item_part_indptr[w + 1] - p0, M = nq * G;
  if (M == 0) return;
  s.reserve(M, D);
  float* Q = s.Q.data();
  float* acc = s.acc.data();
  float* S = s.S.data();
  int max_nv = 0;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t t = c.part_q[p0 + i];
    const int nvis = c.part_nvis[p0 + i];
    max_nv = std::max(max_nv, nvis);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t m = i * G + g;
      to_f32(c.q + (t * c.Hq + kvh * G + g) * D, Q + m * D, D, c.scale);
      s.nv[m] = nvis;
    }
  }
  std::fill(acc, acc + M * D, 0.f);
  std::fill(s.mrow.begin(), s.mrow.begin() + M, NEG_INF);
  std::fill(s.lrow.begin(), s.lrow.begin() + M, 0.f);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  KeyTiles<T, KT> tiles(c, w, kvh, max_nv);
  for (int tok = 0, nt; (nt = tiles.advance()) > 0; tok += nt) {
    const T* const* kraw = tiles.k();
    const T* const* vraw = tiles.v();
    for (int j = 0; j < nt; ++j) {
      if constexpr (std::is_same_v<T, float>) {
        s.kp[j] = kraw[j];
        s.vp[j] = vraw[j];
      } else {
        to_f32(kraw[j], s.kbuf.data() + j * D, D, 1.f);
        to_f32(vraw[j], s.vbuf.data() + j * D, D, 1.f);
        s.kp[j] = s.kbuf.data() + j * D;
        s.vp[j] = s.vbuf.data() + j * D;
      }
    }
    const int ntp = (nt + 7) & ~7;  // padded with zero rows, masked below
    for (int j = nt; j < ntp; ++j) s.kp[j] = s.vp[j] = s.zero.data();

    // the next tile's prefetches, spread over this tile's QK and PV calls (see KeyTiles)
    const int calls = static_cast<int>((M + 1) / 2 * (ntp / 4) + (M + 3) / 4);

    // scores S[m][0..ntp) = (scale * q_m) . k_j
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
      for (int j = 0; j < ntp; j += 4) {
        qk_2x4(Q + m * D, Q + (m + 1) * D, s.kp + j, D, S + m * KT + j, S + (m + 1) * KT + j);
        tiles.prefetch_share(calls);
      }
    if (m < M) {
      for (int j = 0; j < ntp; j += 8) {
        qk_1x8(Q + m * D, s.kp + j, D, S + m * KT + j);
        tiles.prefetch_share(calls);
        tiles.prefetch_share(calls);
      }
    }

    // online softmax: P overwrites S; rows rescale their accumulators when the max moves
    for (m = 0; m < M; ++m) {
      float* srow = S + m * KT;
      const int nvalid = std::clamp(s.nv[m] - tok, 0, nt);
      s.rownv[m] = nvalid;
      if (nvalid == 0) {
        std::fill(srow, srow + ntp, 0.f);
        continue;
      }
      __m256 vmx = _mm256_set1_ps(NEG_INF);
      int j0 = 0;
      for (; j0 + 8 <= nvalid; j0 += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(srow + j0));
      float mx = hmax256(vmx);
      for (; j0 < nvalid; ++j0) mx = std::max(mx, srow[j0]);
      const float m_old = s.mrow[m];
      const float m_new = std::max(m_old, mx);
      // alpha rescales what the row summed so far; exactly 1 (no exp, no rescale) when the max
      // holds, which is most tiles once a row has seen a few
      const float alpha = m_old == m_new ? 1.f : (m_old == NEG_INF ? 0.f : std::exp(m_old - m_new));
      const __m256 vmax = _mm256_set1_ps(m_new), vn = _mm256_set1_ps(static_cast<float>(nvalid));
      __m256 vsum = _mm256_setzero_ps();
      for (int j = 0; j < ntp; j += 8) {
        __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(srow + j), vmax));
        const __m256 valid = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(j)), vn, _CMP_LT_OQ);
        p = _mm256_and_ps(p, valid);
        vsum = _mm256_add_ps(vsum, p);
        _mm256_storeu_ps(srow + j, p);
      }
      s.lrow[m] = s.lrow[m] * alpha + hsum256(vsum);
      s.mrow[m] = m_new;
      if (alpha != 1.f) {
        float* a = acc + m * D;
        const __m256 va = _mm256_set1_ps(alpha);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) _mm256_storeu_ps(a + d, _mm256_mul_ps(_mm256_loadu_ps(a + d), va));
        for (; d < D; ++d) a[d] *= alpha;
      }
    }

    // acc[m] += P[m] . V, 4 rows at a time
    for (m = 0; m < M; m += 4) {
      tiles.prefetch_share(calls);
      const int mb = static_cast<int>(std::min<int64_t>(4, M - m));
      int nj = 0;
      float* arow[4];
      const float* prow[4];
      for (int i = 0; i < mb; ++i) {
        nj = std::max(nj, s.rownv[m + i]);
        arow[i] = acc + (m + i) * D;
        prow[i] = S + (m + i) * KT;
      }
      if (nj == 0) continue;
      switch (mb) {
        case 4: pv_block<4>(arow, prow, s.vp, nj, D); break;
        case 3: pv_block<3>(arow, prow, s.vp, nj, D); break;
        case 2: pv_block<2>(arow, prow, s.vp, nj, D); break;
        default: pv_row(arow[0], prow[0], s.vp, nj, D); break;
      }
    }
  }

  for (int64_t m = 0; m < M; ++m) {
    const int64_t part = p0 + m / G, h = kvh * G + m % G;
    const float l = s.lrow[m];
    const float inv = 1.f / l;
    float* o = c.o_part + (part * c.Hq + h) * D;
    const float* a = acc + m * D;
    for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
    c.lse_part[part * c.Hq + h] = s.mrow[m] + std::log(l);
  }
}

// One task of the row kernel: 8-key tiles for long tasks (memory streams), else 32.
template <typename T>
void run_task(const Ctx<T>& c, int64_t w, int64_t kvh, Scratch& s) {
  int max_nv = 0;
  for (int64_t p = c.item_part_indptr[w]; p < c.item_part_indptr[w + 1]; ++p)
    max_nv = std::max(max_nv, c.part_nvis[p]);
  if (max_nv >= kLongTask)
    run_task_tiles<T, 8>(c, w, kvh, s);
  else
    run_task_tiles<T, kMaxTile>(c, w, kvh, s);
}

// o[t] = sum_i w_i o_part[i] / sum_i w_i, w_i = exp(lse_i - max lse), over query t's partials
template <typename T>
void merge(const float* o_part, const float* lse_part, const int32_t* q_part_indptr,
           const int32_t* q_parts, T* out, int64_t ntok, int64_t Hq, int64_t D) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, Hq * D));
  npr::parallel_for(0, ntok, grain, [&](int64_t b, int64_t e) {
    std::vector<float> buf(D);
    for (int64_t t = b; t < e; ++t) {
      const int64_t a = q_part_indptr[t], n = q_part_indptr[t + 1] - a;
      for (int64_t h = 0; h < Hq; ++h) {
        T* o = out + (t * Hq + h) * D;
        if (n == 1) {
          const float* src = o_part + (q_parts[a] * Hq + h) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(src[d]);
          continue;
        }
        float mx = NEG_INF;
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, lse_part[q_parts[a + i] * Hq + h]);
        std::fill(buf.begin(), buf.end(), 0.f);
        float wsum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = q_parts[a + i];
          const float wgt = std::exp(lse_part[p * Hq + h] - mx);
          wsum += wgt;
          const float* src = o_part + (p * Hq + h) * D;
          for (int64_t d = 0; d < D; ++d) buf[d] += wgt * src[d];
        }
        const float inv = 1.f / wsum;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(buf[d] * inv);
      }
    }
  });
}

// The data checks that the planner guarantees, repeated here (O(E + P + T)) so a bad plan is a
// clear error rather than an out-of-bounds read.
void check_data(const TreeAttentionDims& d, const at::Tensor& q_indptr, const at::Tensor& seg_indptr,
                const at::Tensor& seg_blocks, const at::Tensor& seg_fills,
                const at::Tensor& row_seg_indptr, const at::Tensor& row_segs,
                const at::Tensor& item_ents, const at::Tensor& item_part_indptr,
                const at::Tensor& part_q, const at::Tensor& part_nvis,
                const at::Tensor& q_part_indptr, const at::Tensor& q_parts, int64_t max_item_parts) {
  const int32_t* qi = q_indptr.const_data_ptr<int32_t>();
  TORCH_CHECK(qi[0] == 0 && qi[d.R] == d.T, "npr::tree_attention: q_indptr must run from 0 to T=",
              d.T, ", got ", qi[0], "..", qi[d.R]);
  TORCH_CHECK(seg_indptr.const_data_ptr<int32_t>()[d.S] == d.E,
              "npr::tree_attention: seg_indptr[-1] must equal the number of entries ", d.E);
  TORCH_CHECK(row_seg_indptr.const_data_ptr<int32_t>()[d.R] == row_segs.numel(),
              "npr::tree_attention: row_seg_indptr[-1] must equal len(row_segs)");
  const int32_t* blocks = seg_blocks.const_data_ptr<int32_t>();
  const int32_t* fills = seg_fills.const_data_ptr<int32_t>();
  for (int64_t e = 0; e < d.E; ++e) {
    TORCH_CHECK(blocks[e] >= 0 && blocks[e] < d.NB, "npr::tree_attention: seg_blocks[", e, "]=",
                blocks[e], " is not a block of the cache (NB=", d.NB, ")");
    TORCH_CHECK(fills[e] >= 1 && fills[e] <= d.BS, "npr::tree_attention: seg_fills[", e, "]=",
                fills[e], " outside 1..block_size=", d.BS);
  }
  const int32_t* ents = item_ents.const_data_ptr<int32_t>();
  const int32_t* ipi = item_part_indptr.const_data_ptr<int32_t>();
  const int32_t* pq = part_q.const_data_ptr<int32_t>();
  const int32_t* pn = part_nvis.const_data_ptr<int32_t>();
  TORCH_CHECK(ipi[0] == 0 && ipi[d.W] == d.P, "npr::tree_attention: item_part_indptr must run "
              "from 0 to P=", d.P);
  for (int64_t w = 0; w < d.W; ++w) {
    const int64_t e0 = ents[2 * w], e1 = ents[2 * w + 1];
    TORCH_CHECK(0 <= e0 && e0 <= e1 && e1 <= d.E, "npr::tree_attention: item ", w,
                " has entry range [", e0, ", ", e1, ") outside [0, ", d.E, "]");
    TORCH_CHECK(ipi[w] <= ipi[w + 1] && ipi[w + 1] - ipi[w] <= max_item_parts,
                "npr::tree_attention: item ", w, " has a bad partial range (or more than "
                "max_item_parts=", max_item_parts, ")");
    int64_t ntok = 0;
    for (int64_t e = e0; e < e1; ++e) ntok += fills[e];
    for (int64_t p = ipi[w]; p < ipi[w + 1]; ++p) {
      TORCH_CHECK(pq[p] >= 0 && pq[p] < d.T, "npr::tree_attention: part_q[", p, "]=", pq[p],
                  " is not a query index");
      TORCH_CHECK(pn[p] >= 1 && pn[p] <= ntok, "npr::tree_attention: part_nvis[", p, "]=", pn[p],
                  " outside 1..", ntok, " (the tokens of item ", w, ")");
    }
  }
  const int32_t* qpi = q_part_indptr.const_data_ptr<int32_t>();
  const int32_t* qp = q_parts.const_data_ptr<int32_t>();
  TORCH_CHECK(qpi[0] == 0 && qpi[d.T] == d.P, "npr::tree_attention: q_part_indptr must run from 0 "
              "to P=", d.P);
  for (int64_t t = 0; t < d.T; ++t) {
    TORCH_CHECK(qpi[t + 1] > qpi[t], "npr::tree_attention: query ", t, " has no partials "
                "(every query must see at least one key)");
    for (int64_t i = qpi[t]; i < qpi[t + 1]; ++i)
      TORCH_CHECK(qp[i] >= 0 && qp[i] < d.P && pq[qp[i]] == t, "npr::tree_attention: q_parts[",
                  i, "] is not a partial of query ", t);
  }
}

std::atomic<int64_t> g_task_counts[3];  // see tree_attention_task_counts

template <typename T>
void run_all(const at::Tensor& qc, const at::Tensor& k, const at::Tensor& v,
             const TreeAttentionDims& d, const at::Tensor& seg_blocks, const at::Tensor& seg_fills,
             const at::Tensor& item_ents, const at::Tensor& item_part_indptr,
             const at::Tensor& part_q, const at::Tensor& part_nvis,
             const at::Tensor& q_part_indptr, const at::Tensor& q_parts, double scale,
             at::Tensor& out) {
  at::Tensor o_part = at::empty({d.P, d.Hq, d.D}, qc.options().dtype(at::kFloat));
  at::Tensor lse_part = at::empty({d.P, d.Hq}, qc.options().dtype(at::kFloat));
  const Ctx<T> c = make_tree_attention_args<T, int64_t>(qc, k, v, d, seg_blocks, seg_fills,
                                                        item_ents, item_part_indptr, part_q,
                                                        part_nvis, o_part, lse_part, scale);
  // tasks (item, kv head), items already sorted most expensive first; threads take tasks from a
  // shared counter so long shared-prefix chunks and short own suffixes balance. Each call of the
  // body drains the queue, so this is right however parallel_for splits [0, nth).
  const int64_t ntask = d.W * d.Hkv;
  std::atomic<int64_t> next{0};
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntask));
  // Tasks with >= 16 query rows (a shared chunk read by several rows, or a long extend) go to the
  // wide kernel: AVX-512 when the CPU has it and the rows fill its 16-lane registers, else AVX2
  // (8 lanes; 24 rows, say, run faster there than padded to 32). Fewer rows: the row kernel.
  const bool wide = d.D % 8 == 0, avx512 = wide && use_avx512();
  const int32_t* ipi = c.item_part_indptr;
  npr::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    Scratch s;
    WideScratch ws;
    int64_t ran[3] = {0, 0, 0};
    for (int64_t i = next.fetch_add(1); i < ntask; i = next.fetch_add(1)) {
      const int64_t w = i / d.Hkv, kvh = i % d.Hkv, rows = (ipi[w + 1] - ipi[w]) * d.G;
      if (wide && rows >= 16 && avx512 && rows % 16 == 0) {
        tree_attention_task_avx512<T>(c, w, kvh, ws);
        ++ran[2];
      } else if (wide && rows >= 16) {
        Wide<Avx2>::task<T>(c, w, kvh, ws);
        ++ran[1];
      } else {
        run_task<T>(c, w, kvh, s);
        ++ran[0];
      }
    }
    for (int k = 0; k < 3; ++k) g_task_counts[k].fetch_add(ran[k], std::memory_order_relaxed);
  });
  merge<T>(c.o_part, c.lse_part, q_part_indptr.const_data_ptr<int32_t>(),
           q_parts.const_data_ptr<int32_t>(), reinterpret_cast<T*>(out.mutable_data_ptr()), d.T,
           d.Hq, d.D);
}

}  // namespace

at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& q_indptr,
                              const at::Tensor& seg_indptr, const at::Tensor& seg_blocks,
                              const at::Tensor& seg_fills, const at::Tensor& row_seg_indptr,
                              const at::Tensor& row_segs, const at::Tensor& item_ents,
                              const at::Tensor& item_part_indptr, const at::Tensor& part_q,
                              const at::Tensor& part_nvis, const at::Tensor& q_part_indptr,
                              const at::Tensor& q_parts, int64_t max_item_parts, double scale) {
  const TreeAttentionDims d = check_tree_attention_args(
      q, k_cache, v_cache, q_indptr, seg_indptr, seg_blocks, seg_fills, row_seg_indptr, row_segs,
      item_ents, item_part_indptr, part_q, part_nvis, q_part_indptr, q_parts, max_item_parts);
  check_data(d, q_indptr, seg_indptr, seg_blocks, seg_fills, row_seg_indptr, row_segs, item_ents,
             item_part_indptr, part_q, part_nvis, q_part_indptr, q_parts, max_item_parts);
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);
  if (d.T == 0) return out;
  switch (qc.scalar_type()) {
    case at::kFloat:
      run_all<float>(qc, k_cache, v_cache, d, seg_blocks, seg_fills, item_ents, item_part_indptr,
                     part_q, part_nvis, q_part_indptr, q_parts, scale, out);
      break;
    case at::kBFloat16:
      run_all<c10::BFloat16>(qc, k_cache, v_cache, d, seg_blocks, seg_fills, item_ents,
                             item_part_indptr, part_q, part_nvis, q_part_indptr, q_parts, scale,
                             out);
      break;
    default:
      run_all<c10::Half>(qc, k_cache, v_cache, d, seg_blocks, seg_fills, item_ents,
                         item_part_indptr, part_q, part_nvis, q_part_indptr, q_parts, scale, out);
      break;
  }
  return out;
}

std::array<int64_t, 3> tree_attention_task_counts(bool reset) {
  std::array<int64_t, 3> out{};
  for (int k = 0; k < 3; ++k)
    out[k] = reset ? g_task_counts[k].exchange(0) : g_task_counts[k].load();
  return out;
}

}  // namespace npr

TORCH_LIBRARY_FRAGMENT(npr, m) {
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor q_indptr, "
      "Tensor seg_indptr, Tensor seg_blocks, Tensor seg_fills, Tensor row_seg_indptr, "
      "Tensor row_segs, Tensor item_ents, Tensor item_part_indptr, Tensor part_q, "
      "Tensor part_nvis, Tensor q_part_indptr, Tensor q_parts, int max_item_parts, "
      "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(npr, CPU, m) { m.impl("tree_attention", &npr::tree_attention_cpu); }
