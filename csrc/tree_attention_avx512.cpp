// npr::tree_attention, CPU kernel for tasks with many query rows (>= 16), AVX-512.
//
// The AVX2 kernel (tree_attention.cpp) keeps queries as rows and reduces dot products
// horizontally; with 16 ymm registers it needs ~0.75 loads per FMA. Here the task's queries are
// stored transposed (Qt[d][m], 16 queries per zmm register) so that
//   scores  St[j][m] += k[j][d] * Qt[d][m]     (a broadcast key element x 16 queries)
//   output  Ot[d][m] += v[j][d] * Pt[j][m]     (a broadcast value element x 16 queries)
// are outer products with no horizontal reductions, the online softmax runs across 16 queries per
// instruction, and 32 registers hold 16 accumulators: ~0.6 loads per (zmm) FMA. On the Zen 4 VM
// this is ~1.45x the AVX2 kernel at 32 query rows (decode, 8 siblings x 4 GQA heads).
//
// Compiled for AVX-512 with a target pragma that covers only this file's own functions (every
// header is included before it), so no inline function shared with other TUs is built for
// AVX-512; the caller checks the CPU first (use_avx512, cpu_isa.h).
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "tree_attention_cpu.h"

namespace npr {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")

namespace {

constexpr int KT = 64;  // keys per tile
constexpr int JB = 8;   // keys per score register block
constexpr int DB = 8;   // value columns per output register block

// e^x for 16 lanes: the polynomial of simd.h's exp256.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// St[j][16 MVB queries] = sum_d k[j][d] * Qt[d][..] for JB keys. Qt, St: row stride Mp.
template <int MVB>
inline void scores(const float* Qt, int64_t Mp, const float* const* k, int64_t D, float* St) {
  __m512 c[JB][MVB];
  for (int j = 0; j < JB; ++j)
    for (int i = 0; i < MVB; ++i) c[j][i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 q[MVB];
    for (int i = 0; i < MVB; ++i) q[i] = _mm512_loadu_ps(Qt + d * Mp + 16 * i);
    for (int j = 0; j < JB; ++j) {
      const __m512 b = _mm512_set1_ps(k[j][d]);
      for (int i = 0; i < MVB; ++i) c[j][i] = _mm512_fmadd_ps(b, q[i], c[j][i]);
    }
  }
  for (int j = 0; j < JB; ++j)
    for (int i = 0; i < MVB; ++i) _mm512_storeu_ps(St + j * Mp + 16 * i, c[j][i]);
}

// Ot[d0 + dd][..] = Ot[..] * alpha + sum_{j < nt} v[j][d0 + dd] * Pt[j][..] for DB columns.
template <int MVB>
inline void accumulate(float* Ot, int64_t Mp, const float* Pt, const float* const* v, int nt,
                       int64_t d0, const float* alpha) {
  __m512 c[DB][MVB];
  for (int i = 0; i < MVB; ++i) {
    const __m512 a = _mm512_loadu_ps(alpha + 16 * i);
    for (int dd = 0; dd < DB; ++dd)
      c[dd][i] = _mm512_mul_ps(_mm512_loadu_ps(Ot + (d0 + dd) * Mp + 16 * i), a);
  }
  for (int j = 0; j < nt; ++j) {
    __m512 p[MVB];
    for (int i = 0; i < MVB; ++i) p[i] = _mm512_loadu_ps(Pt + j * Mp + 16 * i);
    const float* vr = v[j] + d0;
    for (int dd = 0; dd < DB; ++dd) {
      const __m512 b = _mm512_set1_ps(vr[dd]);
      for (int i = 0; i < MVB; ++i) c[dd][i] = _mm512_fmadd_ps(b, p[i], c[dd][i]);
    }
  }
  for (int dd = 0; dd < DB; ++dd)
    for (int i = 0; i < MVB; ++i) _mm512_storeu_ps(Ot + (d0 + dd) * Mp + 16 * i, c[dd][i]);
}

struct Scratch {
  std::vector<float> Qt, Ot, St, mrow, lrow, alpha, zero, kbuf, vbuf, qrow;
  std::vector<int32_t> nv;
};

template <typename T>
void run_task_avx512(const TreeAttentionCtx<T>& c, int64_t w, int64_t kvh) {
  thread_local Scratch s;
  const int64_t D = c.D, G = c.G;
  const int64_t p0 = c.item_part_indptr[w], nq = c.item_part_indptr[w + 1] - p0, M = nq * G;
  const int64_t Mp = (M + 15) & ~int64_t{15}, NV = Mp / 16;
  s.Qt.assign(D * Mp, 0.f);
  s.Ot.assign(D * Mp, 0.f);
  s.St.resize(KT * Mp);
  s.mrow.assign(Mp, TA_NEG_INF);
  s.lrow.assign(Mp, 0.f);
  s.alpha.resize(Mp);
  s.nv.resize(Mp);
  s.zero.assign(D, 0.f);
  s.qrow.resize(D);
  if constexpr (!std::is_same_v<T, float>) {
    s.kbuf.resize(KT * D);
    s.vbuf.resize(KT * D);
  }
  float* Qt = s.Qt.data();
  float* Ot = s.Ot.data();
  float* St = s.St.data();
  int max_nv = 0, min_nv = std::numeric_limits<int>::max();
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t t = c.part_q[p0 + i];
    const int nvis = c.part_nvis[p0 + i];
    max_nv = std::max(max_nv, nvis);
    min_nv = std::min(min_nv, nvis);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t m = i * G + g;
      to_f32(c.q + (t * c.Hq + kvh * G + g) * D, s.qrow.data(), D, c.scale);
      for (int64_t d = 0; d < D; ++d) Qt[d * Mp + m] = s.qrow[d];
      s.nv[m] = nvis;
    }
  }
  for (int64_t m = M; m < Mp; ++m) s.nv[m] = max_nv;  // padding queries (zeros) see every key
  const float* kp[KT];
  const float* vp[KT];
  const __m512 ninf = _mm512_set1_ps(TA_NEG_INF);
  KeyTiles<T, KT> tiles(c, w, kvh, max_nv);
  for (int tok = 0, nt; (nt = tiles.advance()) > 0; tok += nt) {
    for (int j = 0; j < nt; ++j) {
      if constexpr (std::is_same_v<T, float>) {
        kp[j] = tiles.k()[j];
        vp[j] = tiles.v()[j];
      } else {
        to_f32(tiles.k()[j], s.kbuf.data() + j * D, D, 1.f);
        to_f32(tiles.v()[j], s.vbuf.data() + j * D, D, 1.f);
        kp[j] = s.kbuf.data() + j * D;
        vp[j] = s.vbuf.data() + j * D;
      }
    }
    const int ntp = (nt + JB - 1) / JB * JB;  // padded with zero keys (their scores are masked)
    for (int j = nt; j < ntp; ++j) kp[j] = s.zero.data();

    int64_t mv = 0;
    for (; mv + 2 <= NV; mv += 2)
      for (int j = 0; j < ntp; j += JB) scores<2>(Qt + 16 * mv, Mp, kp + j, D, St + j * Mp + 16 * mv);
    if (mv < NV)
      for (int j = 0; j < ntp; j += JB) scores<1>(Qt + 16 * mv, Mp, kp + j, D, St + j * Mp + 16 * mv);

    // online softmax over the tile, 16 queries per vector; key j is visible to query m when
    // tok + j < nv[m] (causal extend rows and ragged items): no masks when all see the whole tile
    const bool all_see = tok + nt <= min_nv;
    for (mv = 0; mv < NV; ++mv) {
      const __m512i nvv = _mm512_loadu_si512(s.nv.data() + 16 * mv);
      auto visible = [&](int j) -> __mmask16 {
        return all_see ? __mmask16(0xFFFF) : _mm512_cmpgt_epi32_mask(nvv, _mm512_set1_epi32(tok + j));
      };
      __m512 mx = ninf;
      for (int j = 0; j < nt; ++j) {
        const __mmask16 vis = visible(j);
        mx = _mm512_mask_max_ps(mx, vis, mx, _mm512_loadu_ps(St + j * Mp + 16 * mv));
      }
      const __m512 mold = _mm512_loadu_ps(s.mrow.data() + 16 * mv);
      const __m512 mnew = _mm512_max_ps(mold, mx);
      // a query that has seen no key yet keeps m = -inf: compute with 0 there (its p are masked)
      const __mmask16 fin = _mm512_cmp_ps_mask(mnew, ninf, _CMP_NEQ_OQ);
      const __m512 msafe = _mm512_maskz_mov_ps(fin, mnew);
      const __m512 alpha = _mm512_mask_mov_ps(
          _mm512_set1_ps(1.f), fin, exp512(_mm512_sub_ps(_mm512_maskz_mov_ps(fin, mold), msafe)));
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < nt; ++j) {
        const __mmask16 vis = visible(j);
        float* sj = St + j * Mp + 16 * mv;
        const __m512 p = _mm512_maskz_mov_ps(vis, exp512(_mm512_sub_ps(_mm512_loadu_ps(sj), msafe)));
        sum = _mm512_add_ps(sum, p);
        _mm512_storeu_ps(sj, p);
      }
      const __m512 l = _mm512_loadu_ps(s.lrow.data() + 16 * mv);
      _mm512_storeu_ps(s.lrow.data() + 16 * mv, _mm512_fmadd_ps(l, alpha, sum));
      _mm512_storeu_ps(s.mrow.data() + 16 * mv, mnew);
      _mm512_storeu_ps(s.alpha.data() + 16 * mv, alpha);
    }

    for (int64_t d0 = 0; d0 < D; d0 += DB) {  // D % DB == 0 (checked by the caller)
      for (mv = 0; mv + 2 <= NV; mv += 2)
        accumulate<2>(Ot + 16 * mv, Mp, St + 16 * mv, vp, nt, d0, s.alpha.data() + 16 * mv);
      if (mv < NV)
        accumulate<1>(Ot + 16 * mv, Mp, St + 16 * mv, vp, nt, d0, s.alpha.data() + 16 * mv);
    }
  }

  for (int64_t m = 0; m < M; ++m) {
    const int64_t part = p0 + m / G, h = kvh * G + m % G;
    const float l = s.lrow[m];
    const float inv = 1.f / l;
    float* o = c.o_part + (part * c.Hq + h) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = Ot[d * Mp + m] * inv;
    c.lse_part[part * c.Hq + h] = s.mrow[m] + std::log(l);
  }
}

}  // namespace

template <typename T>
void tree_attention_task_avx512(const TreeAttentionCtx<T>& c, int64_t w, int64_t kvh) {
  run_task_avx512<T>(c, w, kvh);
}

#pragma GCC pop_options

template void tree_attention_task_avx512<float>(const TreeAttentionCtx<float>&, int64_t, int64_t);
template void tree_attention_task_avx512<c10::BFloat16>(const TreeAttentionCtx<c10::BFloat16>&,
                                                        int64_t, int64_t);
template void tree_attention_task_avx512<c10::Half>(const TreeAttentionCtx<c10::Half>&, int64_t,
                                                    int64_t);

}  // namespace npr
