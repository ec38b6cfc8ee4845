// npr::linear_fused — one op for a decode step's "elementwise op + linear (+ residual)":
//   norm_weight given: x' = rms_norm(x, norm_weight, eps)       (input norm -> qkv, gate_up)
//   silu_mul:          x' = silu(x[..., :K]) * x[..., K:]       (MLP activation -> down)
//   rope_cos/sin given: rotary embedding on the first rope_heads heads of y (q and k of a
//                      fused qkv projection), y_h = y_h * cos + rotate_half(y_h) * sin
//   residual given:    y  = y + residual                        (o, down -> residual stream)
// Why: with weights streamed at DRAM speed a SmolLM2 decode step is 9-20 ms, and each separate
// small op costs 2-12 us of dispatch + Python wrapper (measured: rms_norm 4-8 us, silu*mul
// 7-13 us, add ~1.5 us, HF-style RoPE of q and k ~45 us); one layer has ~8 of them besides its
// 4 linears. Folding them in took the step (1 row) 8-9% faster with fp32 weights and 16-19%
// with bf16 (`npr bench linear`, smollm2-step packed vs packed+fused).
// x' lives in a small scratch buffer [M, K]; the linear is the same kernel as
// npr::linear_small / npr::linear_packed.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu_isa.h"
#include "cpu_ops.h"
#include "gemm_avx512.h"
#include "linear_run.h"
#include "simd.h"

namespace npr {
namespace {
using namespace linear_kernel;


// out[0, K) = silu(g) * u = g / (1 + e^-g) * u.
void silu_mul_row(const float* g, const float* u, float* out, int64_t K) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 gv = _mm256_loadu_ps(g + k);
    const __m256 den = _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + k)));
  }
  for (; k < K; ++k) out[k] = g[k] / (1.0f + std::exp(-g[k])) * u[k];
}


// Rotary embedding in place on heads [0, H) of one row y (head size D, halves rotated as in
// HF's rotate_half): y_h = y_h * c + rotate_half(y_h) * s, c / s: [D].
void rope_row(float* y, const float* c, const float* s, int64_t H, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < H; ++h) {
    float* a = y + h * D;
    float* b = a + half;
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
      const __m256 av = _mm256_loadu_ps(a + i), bv = _mm256_loadu_ps(b + i);
      _mm256_storeu_ps(a + i, _mm256_fnmadd_ps(bv, _mm256_loadu_ps(s + i),
                                               _mm256_mul_ps(av, _mm256_loadu_ps(c + i))));
      _mm256_storeu_ps(b + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(s + half + i),
                                              _mm256_mul_ps(bv, _mm256_loadu_ps(c + half + i))));
    }
    for (; i < half; ++i) {
      const float av = a[i], bv = b[i];
      a[i] = av * c[i] - bv * s[i];
      b[i] = bv * c[half + i] + av * s[half + i];
    }
  }
}

}  // namespace

// x: [..., K] (or [..., 2K] with silu_mul) fp32; weight: [N, K] or packed [ceil(N/8), K, 8],
// fp32 | bf16 | fp16, or GEMM panels [ceil(N/32), K, 32] fp32; n: N; bias: [N] | None;
// norm_weight: [K] | None; residual: [..., N] | None; rope_cos, rope_sin: [..., D] | None (one
// row per x row), rope_heads: heads of size D rotated from column 0 -> [..., N] fp32
at::Tensor linear_fused_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t n,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& norm_weight, double eps,
                            bool silu_mul, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& rope_cos,
                            const std::optional<at::Tensor>& rope_sin, int64_t rope_heads) {
  const char* op = "npr::linear_fused";
  const at::Tensor bc = check_x_bias(op, x, bias, n);
  TORCH_CHECK(!(silu_mul && norm_weight.has_value()), op,
              ": norm_weight and silu_mul are exclusive (one prologue per op)");
  const int64_t Kx = x.size(-1);
  TORCH_CHECK(!silu_mul || Kx % 2 == 0, op, ": silu_mul needs x = [..., 2K] (gate | up), got ",
              x.sizes());
  const int64_t K = silu_mul ? Kx / 2 : Kx;
  // [ceil(N/32), K, 32]: panels of the AVX-512 many-row GEMM (npr.ops.pack_gemm_weight)
  const bool panels = weight.dim() == 3 && weight.size(2) == gemm_avx512::kPanel;
  if (panels) {
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.device().is_cpu() &&
                    weight.size(1) == K && n >= 0 &&
                    weight.size(0) == (n + gemm_avx512::kPanel - 1) / gemm_avx512::kPanel,
                op, ": GEMM panels must be float32 CPU [ceil(N/32), K, 32] ",
                "(npr.ops.pack_gemm_weight) with K = ", K, " and N = ", n, "; got ",
                weight.scalar_type(), " ", weight.sizes());
    TORCH_CHECK(use_avx512(), op, ": weight packed in GEMM panels needs a CPU with AVX-512 "
                "(npr._C.cpu_isa() is not 'avx512'); pass the plain weight");
  } else {
    check_weight(op, weight, K, n);
  }
  at::Tensor nw;
  if (norm_weight.has_value()) {
    TORCH_CHECK(norm_weight->scalar_type() == at::kFloat && norm_weight->dim() == 1 &&
                    norm_weight->size(0) == K && norm_weight->device().is_cpu(),
                op, ": norm_weight must be a float32 CPU [K] with K = ", K, "; got ",
                norm_weight->scalar_type(), " ", norm_weight->sizes());
    nw = norm_weight->contiguous();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->device().is_cpu() &&
                    residual->sizes() == at::IntArrayRef(shape),
                op, ": residual must be a float32 CPU tensor of the output shape ",
                at::IntArrayRef(shape), "; got ", residual->scalar_type(), " ",
                residual->sizes());
    rc = residual->contiguous();
  }
  at::Tensor cc, sc;
  int64_t D = 0;
  TORCH_CHECK(rope_cos.has_value() == rope_sin.has_value(), op,
              ": rope_cos and rope_sin go together");
  if (rope_cos.has_value()) {
    D = rope_cos->size(-1);
    const bool ok = rope_cos->scalar_type() == at::kFloat &&
                    rope_sin->scalar_type() == at::kFloat && rope_cos->device().is_cpu() &&
                    rope_sin->device().is_cpu() && rope_cos->sizes() == rope_sin->sizes() &&
                    rope_cos->dim() == x.dim() &&
                    rope_cos->sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1);
    TORCH_CHECK(ok, op, ": rope_cos and rope_sin must be float32 CPU [..., D] with the leading ",
                "dims of x ", x.sizes(), "; got ", rope_cos->sizes(), " and ", rope_sin->sizes());
    TORCH_CHECK(D % 2 == 0 && rope_heads >= 0 && rope_heads * D <= n, op,
                ": rope needs an even head size D and rope_heads * D <= N; got D = ", D,
                ", rope_heads = ", rope_heads, ", N = ", n);
    cc = rope_cos->contiguous();
    sc = rope_sin->contiguous();
  }
  at::Tensor y = at::empty(shape, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t M = rows_of(x);
  const float* xp = xc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  if (K == 0) {
    const float* bp = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
    for (int64_t i = 0; i < M * n; ++i) yp[i] = bp ? bp[i % n] : 0.f;
  } else {
    // Past kGemmRowsMin rows of a plain fp32 weight torch's GEMM (MKL) beats the streaming
    // kernel; the prologue and epilogues stay fused here (one op instead of ~5 small ones).
    const bool gemm = panels || (wc.dim() == 2 && wc.scalar_type() == at::kFloat && M > kGemmRowsMin);
    const bool prologue = silu_mul || nw.defined();
    // x' [M, K]; without a prologue every kernel reads x itself.
    at::Tensor xs = prologue ? at::empty({M, K}, x.options()) : xc.view({M, K});
    if (prologue) {
      float* xsp = xs.mutable_data_ptr<float>();
      npr::parallel_for(0, M, grain_for(Kx * int64_t(sizeof(float))), [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) {
          const float* xr = xp + m * Kx;
          float* out = xsp + m * K;
          if (silu_mul) {
            silu_mul_row(xr, xr + K, out, K);
          } else {
            rms_norm_row(xr, nw.const_data_ptr<float>(), out, K, static_cast<float>(eps));
          }
        }
      });
    }
    if (panels) {
      gemm_avx512::gemm_panels(xs.const_data_ptr<float>(), K, M, K, wc.const_data_ptr<float>(), n,
                               bc.defined() ? bc.const_data_ptr<float>() : nullptr, yp, n);
    } else if (gemm) {
      at::Tensor y2 = y.view({M, n});
      if (bc.defined())
        at::addmm_out(y2, bc, xs, wc.t());
      else
        at::mm_out(y2, xs, wc.t());
    } else {
      run_linear(xs.const_data_ptr<float>(), K, M, K, wc, n,
                 bc.defined() ? bc.const_data_ptr<float>() : nullptr, yp);
    }
  }
  // Epilogues, by rows (a prefill has thousands).
  const int64_t row_grain = grain_for(n * int64_t(sizeof(float)));
  if (cc.defined() && rope_heads > 0) {
    const float* cp = cc.const_data_ptr<float>();
    const float* sp = sc.const_data_ptr<float>();
    npr::parallel_for(0, M, row_grain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) rope_row(yp + m * n, cp + m * D, sp + m * D, rope_heads, D);
    });
  }
  if (rc.defined()) {
    const float* rp = rc.const_data_ptr<float>();
    npr::parallel_for(0, M, row_grain, [&](int64_t m0, int64_t m1) {
      const int64_t end = m1 * n;
      int64_t i = m0 * n;
      for (; i + 8 <= end; i += 8)
        _mm256_storeu_ps(yp + i, _mm256_add_ps(_mm256_loadu_ps(yp + i), _mm256_loadu_ps(rp + i)));
      for (; i < end; ++i) yp[i] += rp[i];
    });
  }
  return y;
}

}  // namespace npr

TORCH_LIBRARY_FRAGMENT(npr, m) {
  m.def(
      "linear_fused(Tensor x, Tensor weight, int n, Tensor? bias, Tensor? norm_weight, "
      "float eps, bool silu_mul, Tensor? residual, Tensor? rope_cos=None, Tensor? rope_sin=None, "
      "int rope_heads=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(npr, CPU, m) { m.impl("linear_fused", &npr::linear_fused_cpu); }
