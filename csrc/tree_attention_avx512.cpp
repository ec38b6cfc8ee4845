// npr::tree_attention: the wide CPU kernel (tree_attention_wide.h) built for AVX-512, 16 queries
// per register and 32 registers (16 accumulators per block).
//
// Every header is included before the target pragma, so only the functions defined after it
// (the vector wrapper below and the kernel template instantiated from it) are built for
// AVX-512; the caller checks the CPU first (use_avx512, cpu_isa.h). tests/test_build.py checks
// the binary for AVX-512 instructions anywhere else.
#include <ATen/core/Tensor.h>

#include "tree_attention_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
// GCC 12 warns that the intrinsics' internal _mm512_undefined_* operand "may be used
// uninitialized" (a false positive, GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "tree_attention_wide.h"

namespace npr {
namespace {

struct Avx512 {
  using reg = __m512;
  static constexpr int kLanes = 16, kMaxQueryRegs = 2, kAccumulators = 16, kTileKeys = 64;
  static constexpr int value_cols(int) { return 8; }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg bcast(const float* p) { return _mm512_set1_ps(*p); }  // folds into the FMA
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static __m512i load_int(const int32_t* p) { return _mm512_loadu_si512(p); }
  static __mmask16 all_true() { return 0xFFFF; }
  static __mmask16 greater(__m512i a, int32_t b) {
    return _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(b));
  }
  static __mmask16 not_equal(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_OQ); }
  static reg select(__mmask16 m, reg a, reg b) { return _mm512_mask_mov_ps(b, m, a); }  // m ? a : b
  // e^x: the polynomial of simd.h's exp256 (NaN passes the clamp: x is the second operand)
  static reg exp(reg x) {
    x = _mm512_min_ps(set1(88.3762626647949f), _mm512_max_ps(set1(-87.0f), x));
    const reg n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    reg p = set1(1.9875691500E-4f);
    p = fma(p, r, set1(1.3981999507E-3f));
    p = fma(p, r, set1(8.3334519073E-3f));
    p = fma(p, r, set1(4.1665795894E-2f));
    p = fma(p, r, set1(1.6666665459E-1f));
    p = fma(p, r, set1(5.0000001201E-1f));
    p = fma(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, set1(1.0f)));
    const __m512i e =
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  }
};

}  // namespace

template <typename T>
void tree_attention_task_avx512(const TreeAttentionCtx<T>& c, int64_t w, int64_t kvh,
                                WideScratch& s) {
  Wide<Avx512>::task<T>(c, w, kvh, s);
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

template void tree_attention_task_avx512<float>(const TreeAttentionCtx<float>&, int64_t, int64_t,
                                                WideScratch&);
template void tree_attention_task_avx512<c10::BFloat16>(const TreeAttentionCtx<c10::BFloat16>&,
                                                        int64_t, int64_t, WideScratch&);
template void tree_attention_task_avx512<c10::Half>(const TreeAttentionCtx<c10::Half>&, int64_t,
                                                    int64_t, WideScratch&);

}  // namespace npr
