// npr::sample_rows — one draw per row of [S, V] fp32 logits in one call (CPU): the batched
// sampler's last stage (npr/engine/sampling.py sample_batch) without a dozen tensor ops.
//
// Per row r (the semantics of the torch path, npr.engine.sampling._draw_reference):
//   temperature[r] == 0: greedy — the first maximal logit; logprob = x[tok] - logsumexp(x).
//   else: y = x / temperature[r]; w = exp(y - max y); the row's uniform u (splitmix64 of
//   key ^ sample, ^ branch, ^ counter: the bits of npr.engine.sampling.uniforms) picks the first
//   token whose running sum of w (in double) exceeds min(u * sum(w), the double below sum(w));
//   logprob = y[tok] - logsumexp(y).
// -inf logits (top-k / top-p cuts, processors) have no mass. The running sum is kept per block
// of 64 tokens (block sums first, then one block walked token by token), so a row costs two
// vector passes and one short scalar walk instead of a full sequential cumsum. The torch path
// sums exp(y - logsumexp(y)) one token after another instead: the two differ in the last bits,
// which moves a draw only when its uniform falls within ~1e-7 of a token boundary.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace npr {
namespace {

constexpr int64_t kBlock = 64;

inline uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The row's uniform in [0, 1): 53 random bits, as npr.engine.sampling.uniforms.
inline double row_uniform(uint64_t key, uint64_t sample, uint64_t branch, uint64_t counter) {
  uint64_t h = splitmix64(key ^ sample);
  h = splitmix64(h ^ branch);
  h = splitmix64(h ^ counter);
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}

// y[i] = x[i] / t for i < n: divided, not multiplied by 1 / t, to round as torch's x / t does.
inline void divide_row(const float* x, float t, float* y, int64_t n) {
  const __m256 tv = _mm256_set1_ps(t);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_div_ps(_mm256_loadu_ps(x + i), tv));
  for (; i < n; ++i) y[i] = x[i] / t;
}

// (max, first index of it) over y[0, n); n >= 1.
inline std::pair<float, int64_t> row_argmax(const float* y, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(y + i));
  float best = hmax256(m);
  for (; i < n; ++i) best = y[i] > best ? y[i] : best;
  for (int64_t j = 0; j < n; ++j)
    if (y[j] == best) return {best, j};
  return {best, 0};  // NaN rows (processors' output is checked before; logits should not be NaN)
}

// e^(y - m) for 8 lanes, exactly 0 where y is -inf (a cut token: exp256 clamps its argument at
// -87, which would leave it ~1e-38 of mass).
inline __m256 exp_from(__m256 y, __m256 m) {
  const __m256 cut = _mm256_cmp_ps(y, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  return _mm256_andnot_ps(cut, exp256(_mm256_sub_ps(y, m)));
}

// The last n < 8 values of a row, padded with -inf (no mass).
inline __m256 load_tail(const float* y, int64_t n) {
  alignas(32) float buf[8];
  for (int j = 0; j < 8; ++j) buf[j] = j < n ? y[j] : -std::numeric_limits<float>::infinity();
  return _mm256_load_ps(buf);
}

// sum(e^(y - m)) over y[0, n) in double (fp32 terms; the lanes summed in double).
inline double row_sum_exp(const float* y, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_from(_mm256_loadu_ps(y + i), mv);
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  if (i < n) {
    const __m256 e = exp_from(load_tail(y + i, n - i), mv);
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double d[4];
  _mm256_store_pd(d, _mm256_add_pd(s0, s1));
  return (d[0] + d[1]) + (d[2] + d[3]);
}

// p[i] = e^(y[i] - m) for i < n: the same fp32 values whichever pass computes them.
inline void row_exp(const float* y, int64_t n, float m, float* p) {
  const __m256 mv = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, exp_from(_mm256_loadu_ps(y + i), mv));
  if (i < n) {
    alignas(32) float buf[8];
    _mm256_store_ps(buf, exp_from(load_tail(y + i, n - i), mv));
    for (int64_t j = 0; i + j < n; ++j) p[i + j] = buf[j];
  }
}

// One row: returns (token, logprob). y: the row's logits (divided by temperature unless greedy).
// The weights are w = e^(y - max y) (fp32), their sums in double: block sums of kBlock tokens,
// the row's total from them, then the block where the running sum passes the target walked
// token by token. logsumexp(y) = max + log(total).
std::pair<int64_t, float> draw_row(const float* y, int64_t V, bool greedy, double u,
                                   std::vector<double>& block, float* scratch) {
  const auto [m, arg] = row_argmax(y, V);
  if (m == -std::numeric_limits<float>::infinity()) return {arg, -std::numeric_limits<float>::infinity()};
  const int64_t nb = (V + kBlock - 1) / kBlock;
  block.resize(static_cast<size_t>(nb));
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock;
    block[b] = row_sum_exp(y + lo, std::min(kBlock, V - lo), m);
    total += block[b];
  }
  const float lse = static_cast<float>(static_cast<double>(m) + std::log(total));
  if (greedy) return {arg, y[arg] - lse};
  const double target = std::min(u * total, std::nextafter(total, 0.0));
  double run = 0.0;
  int64_t b = 0;
  while (b < nb - 1 && run + block[b] <= target) run += block[b++];
  for (; b < nb; ++b) {  // normally one block; more only when rounding moved the crossing
    const int64_t lo = b * kBlock, n = std::min(kBlock, V - lo);
    row_exp(y + lo, n, m, scratch);
    for (int64_t i = 0; i < n; ++i) {
      if (scratch[i] > 0.0f && (run += scratch[i]) > target) return {lo + i, y[lo + i] - lse};
    }
  }
  // The sum ended at the target (last-bit rounding): the last token with mass.
  for (int64_t i = V - 1; i >= 0; --i) {
    row_exp(y + i, 1, m, scratch);
    if (scratch[0] > 0.0f) return {i, y[i] - lse};
  }
  return {arg, y[arg] - lse};
}

}  // namespace

// logits: [S, V] fp32; temperature: [S] fp64 (0 = greedy); key, sample, branch, counter: [S]
// int64 (key: the request key's uint64 bits) -> (tokens [S] int64, logprobs [S] fp32).
std::tuple<at::Tensor, at::Tensor> sample_rows_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                                   const at::Tensor& key, const at::Tensor& sample,
                                                   const at::Tensor& branch, const at::Tensor& counter) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "npr::sample_rows: logits must be [S, V] float32, got ", logits.sizes(), " ",
              logits.scalar_type());
  const int64_t S = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 || S == 0, "npr::sample_rows: empty vocabulary");
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == S && temperature.scalar_type() == at::kDouble,
              "npr::sample_rows: temperature must be [", S, "] float64, got ", temperature.sizes(),
              " ", temperature.scalar_type());
  const at::Tensor* ints[] = {&key, &sample, &branch, &counter};
  const char* names[] = {"key", "sample", "branch", "counter"};
  for (int j = 0; j < 4; ++j) {
    TORCH_CHECK(ints[j]->dim() == 1 && ints[j]->size(0) == S && ints[j]->scalar_type() == at::kLong &&
                    ints[j]->device().is_cpu(),
                "npr::sample_rows: ", names[j], " must be [", S, "] int64 on the CPU, got ",
                ints[j]->sizes(), " ", ints[j]->scalar_type());
  }
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = temperature.contiguous();
  const at::Tensor k = key.contiguous(), s = sample.contiguous(), b = branch.contiguous(),
                   c = counter.contiguous();
  for (int64_t r = 0; r < S; ++r) {
    const double tr = t.const_data_ptr<double>()[r];
    TORCH_CHECK(std::isfinite(tr) && tr >= 0.0, "npr::sample_rows: row ", r,
                " has temperature ", tr, " (must be finite and >= 0)");
  }
  at::Tensor tok = at::empty({S}, x.options().dtype(at::kLong));
  at::Tensor lp = at::empty({S}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const double* tp = t.const_data_ptr<double>();
  const int64_t *kp = k.const_data_ptr<int64_t>(), *sp = s.const_data_ptr<int64_t>(),
                *bp = b.const_data_ptr<int64_t>(), *cp = c.const_data_ptr<int64_t>();
  int64_t* tokp = tok.mutable_data_ptr<int64_t>();
  float* lpp = lp.mutable_data_ptr<float>();
  // Rows per task: waking a thread costs a few microseconds, a row of 100 tokens far less.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  npr::parallel_for(0, S, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> y(static_cast<size_t>(V));
    std::vector<double> block;
    alignas(32) float scratch[kBlock];
    for (int64_t r = lo; r < hi; ++r) {
      const float* row = xp + r * V;
      const bool greedy = tp[r] == 0.0;
      const float tf = static_cast<float>(tp[r]);  // torch divides by the fp32 temperature
      if (!greedy && tf != 1.0f) {
        divide_row(row, tf, y.data(), V);
        row = y.data();
      }
      const double u = greedy ? 0.0
                              : row_uniform(static_cast<uint64_t>(kp[r]), static_cast<uint64_t>(sp[r]),
                                            static_cast<uint64_t>(bp[r]), static_cast<uint64_t>(cp[r]));
      const auto [tk, l] = draw_row(row, V, greedy, u, block, scratch);
      tokp[r] = tk;
      lpp[r] = l;
    }
  });
  return {tok, lp};
}

}  // namespace npr

TORCH_LIBRARY_FRAGMENT(npr, m) {
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor key, Tensor sample, Tensor branch, "
        "Tensor counter) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(npr, CPU, m) { m.impl("sample_rows", &npr::sample_rows_cpu); }
