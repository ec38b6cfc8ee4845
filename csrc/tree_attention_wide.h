// npr::tree_attention, the CPU kernel for tasks with many query rows (>= 16): written once over a
// vector ISA V and built twice, for AVX2 (V = Avx2, 8 lanes; tree_attention.cpp) and for AVX-512
// (V = Avx512, 16 lanes; tree_attention_avx512.cpp, inside its target pragma).
//
// The row kernel (tree_attention.cpp) keeps queries as rows and reduces dot products
// horizontally, ~0.75 loads per FMA. Here a task's queries are stored transposed (Qt[d][m], L
// queries per register) so that
//   scores  St[j][m] += k[j][d] * Qt[d][m]     (a broadcast key element x L queries)
//   output  Ot[d][m] += v[j][d] * Pt[j][m]     (a broadcast value element x L queries)
// are outer products with no horizontal reductions, and the online softmax runs across L queries
// per instruction. Measured on the Zen 4 VM, whole op, P = 8192 shared + 128 own tokens, 2
// threads, interleaved runs: 8 siblings x 4 GQA heads = 32 rows, D = 128: row kernel 5.1 ms,
// AVX2 wide 4.9, AVX-512 wide 4.2; 24 rows (SmolLM2: 8 x 3 heads, D = 64): row 1.27, AVX2 wide
// 1.00 (AVX-512 would pad to 32 rows); 48 rows, D = 64: row 2.55, AVX2 wide 1.94, AVX-512 1.95.
//
// No system header is included here: tree_attention_avx512.cpp includes this file after its
// target pragma, and only functions defined after the pragma may be built for AVX-512.
#pragma once

#include "tree_attention_cpu.h"

namespace npr {

template <class V>
struct Wide {
  static constexpr int L = V::kLanes;
  static constexpr int MVB = V::kMaxQueryRegs;  // query registers per block
  static constexpr int ACC = V::kAccumulators;  // accumulator registers per block
  static constexpr int KT = V::kTileKeys;       // keys per tile, a multiple of ACC / mvb
  using R = typename V::reg;

  // St[j][L * NQ queries] = sum_d k[j][d] * Qt[d][..] for ACC / NQ keys (row stride Mp). Each
  // dot product is summed in chunks of DC terms, then the chunks are added: one fp32 chain over
  // all of D was up to 10x less accurate than the row kernel (8 partial sums) on long heads with
  // a sharp softmax (D = 256: ~1e-5 vs ~1.4e-6 relative); DC = 16 matches the row kernel
  // (1.3-1.6e-6), DC = 32 gave 3-3.6e-6.
  template <int NQ>
  static void scores(const float* Qt, int64_t Mp, const float* const* k, int64_t D, float* St) {
    constexpr int JB = ACC / NQ;
    constexpr int64_t DC = 16;
    for (int64_t d0 = 0; d0 < D; d0 += DC) {
      const int64_t d1 = std::min(D, d0 + DC);
      R c[JB][NQ];
      for (int j = 0; j < JB; ++j)
        for (int i = 0; i < NQ; ++i) c[j][i] = V::zero();
      for (int64_t d = d0; d < d1; ++d) {
        R q[NQ];
        for (int i = 0; i < NQ; ++i) q[i] = V::load(Qt + d * Mp + L * i);
        for (int j = 0; j < JB; ++j) {
          const R b = V::bcast(k[j] + d);
          for (int i = 0; i < NQ; ++i) c[j][i] = V::fma(b, q[i], c[j][i]);
        }
      }
      for (int j = 0; j < JB; ++j)
        for (int i = 0; i < NQ; ++i) {
          float* sj = St + j * Mp + L * i;
          V::store(sj, d0 == 0 ? c[j][i] : V::add(V::load(sj), c[j][i]));
        }
    }
  }

  // Ot[d0 + dd][..] = Ot[..] * alpha + sum_{j < nt} v[j][d0 + dd] * Pt[j][..] for DB columns
  // (D % 8 == 0, checked by the caller; DB divides 8).
  template <int NQ, int DB>
  static void accumulate(float* Ot, int64_t Mp, const float* Pt, const float* const* v, int nt,
                         int64_t d0, const float* alpha) {
    R c[DB][NQ];
    for (int i = 0; i < NQ; ++i) {
      const R a = V::load(alpha + L * i);
      for (int dd = 0; dd < DB; ++dd) c[dd][i] = V::mul(V::load(Ot + (d0 + dd) * Mp + L * i), a);
    }
    for (int j = 0; j < nt; ++j) {
      R p[NQ];
      for (int i = 0; i < NQ; ++i) p[i] = V::load(Pt + j * Mp + L * i);
      const float* vr = v[j] + d0;
      for (int dd = 0; dd < DB; ++dd) {
        const R b = V::bcast(vr + dd);
        for (int i = 0; i < NQ; ++i) c[dd][i] = V::fma(b, p[i], c[dd][i]);
      }
    }
    for (int dd = 0; dd < DB; ++dd)
      for (int i = 0; i < NQ; ++i) V::store(Ot + (d0 + dd) * Mp + L * i, c[dd][i]);
  }

  // Calls fn(mv, std::integral_constant<int, NQ>) over the NV query registers in blocks of MVB
  // (the last block smaller).
  template <class Fn>
  static void query_blocks(int64_t NV, Fn&& fn) {
    int64_t mv = 0;
    for (; mv + MVB <= NV; mv += MVB) fn(mv, std::integral_constant<int, MVB>{});
    const int64_t rest = NV - mv;
    if constexpr (MVB > 1) {
      if (rest == 1) fn(mv, std::integral_constant<int, 1>{});
    }
    if constexpr (MVB > 2) {
      if (rest == 2) fn(mv, std::integral_constant<int, 2>{});
    }
    static_assert(MVB <= 3, "query_blocks handles tails of up to 2 registers");
  }

  // One task (item w, kv head kvh); s: the calling thread's buffers. Not inlined into the
  // dispatch loop (a large body; the loop stays small).
  template <typename T>
  __attribute__((noinline)) static void task(const TreeAttentionCtx<T>& c, int64_t w, int64_t kvh, WideScratch& s) {
    const int64_t D = c.D, G = c.G;
    const int64_t p0 = c.item_part_indptr[w], nq = c.item_part_indptr[w + 1] - p0, M = nq * G;
    const int64_t Mp = (M + L - 1) / L * L, NV = Mp / L;
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
    const R ninf = V::set1(TA_NEG_INF);
    KeyTiles<T, KT> tiles(c, w, kvh, max_nv);
    // the next tile's prefetches go out spread over a full tile's score and accumulate calls
    // (only the last tile is partial, and it has no next tile to prefetch)
    int calls = 0;
    query_blocks(NV, [&](int64_t, auto nq_regs) {
      constexpr int NQ = decltype(nq_regs)::value;
      calls += (KT + ACC / NQ - 1) / (ACC / NQ) + static_cast<int>((D + V::value_cols(NQ) - 1) /
                                                                   V::value_cols(NQ));
    });
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
      for (int j = nt; j < KT; ++j) kp[j] = s.zero.data();  // zero keys pad a block (masked)

      query_blocks(NV, [&](int64_t mv, auto nq_regs) {
        constexpr int NQ = decltype(nq_regs)::value;
        constexpr int JB = ACC / NQ;
        for (int j = 0; j < nt; j += JB) {
          scores<NQ>(Qt + L * mv, Mp, kp + j, D, St + j * Mp + L * mv);
          tiles.prefetch_share(calls);
        }
      });

      // online softmax over the tile, L queries per register; key j is visible to query m when
      // tok + j < nv[m] (causal extend rows and ragged items): no masks when all see the tile
      const bool all_see = tok + nt <= min_nv;
      for (int64_t mv = 0; mv < NV; ++mv) {
        const auto nvv = V::load_int(s.nv.data() + L * mv);
        auto visible = [&](int j) { return all_see ? V::all_true() : V::greater(nvv, tok + j); };
        R mx = ninf;
        for (int j = 0; j < nt; ++j)
          mx = V::max(mx, V::select(visible(j), V::load(St + j * Mp + L * mv), ninf));
        const R mold = V::load(s.mrow.data() + L * mv);
        const R mnew = V::max(mold, mx);
        // a query that has seen no key yet keeps m = -inf: compute with 0 there (p are masked)
        const auto fin = V::not_equal(mnew, ninf);
        const R msafe = V::select(fin, mnew, V::zero());
        const R alpha = V::select(fin, V::exp(V::sub(V::select(fin, mold, V::zero()), msafe)),
                                  V::set1(1.f));
        R sum = V::zero();
        for (int j = 0; j < nt; ++j) {
          float* sj = St + j * Mp + L * mv;
          const R p = V::select(visible(j), V::exp(V::sub(V::load(sj), msafe)), V::zero());
          sum = V::add(sum, p);
          V::store(sj, p);
        }
        V::store(s.lrow.data() + L * mv, V::fma(V::load(s.lrow.data() + L * mv), alpha, sum));
        V::store(s.mrow.data() + L * mv, mnew);
        V::store(s.alpha.data() + L * mv, alpha);
      }

      query_blocks(NV, [&](int64_t mv, auto nq_regs) {
        constexpr int NQ = decltype(nq_regs)::value;
        constexpr int DB = V::value_cols(NQ);
        for (int64_t d0 = 0; d0 < D; d0 += DB) {
          accumulate<NQ, DB>(Ot + L * mv, Mp, St + L * mv, vp, nt, d0, s.alpha.data() + L * mv);
          tiles.prefetch_share(calls);
        }
      });
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
};

}  // namespace npr
