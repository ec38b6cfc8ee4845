// npr::layout_attention(_backward) — attention under the training layout (spec §2), CPU.
//
// Packed row of T tokens cut into runs (npr/ops/layout_attention.py plans them): run r =
// (a, e, k0a, k1a, k0b, k1b) says queries i in [a, e) see keys [k0a, k1a) ∪ [k0b, k1b) ∪ [a, i]
// (both extra ranges end at or before a). FlashAttention-2 style: a task is (kv head, tile of
// kQTile queries of one run); its G query heads per token are stacked into one [M = tokens * G,
// D] matrix that meets each key tile once. Key tiles are either fully visible (no mask) or the
// tile's own diagonal block (causal mask); nothing outside the visible ranges is touched.
// GEMMs on tiles go through at::native::cpublas::gemm (MKL in torch's CPU wheel); softmax
// statistics are fp32 (fp64 for fp64 inputs, for gradcheck).
//
// Forward writes out [T, Hq, D] and lse [Hq, T] (log-sum-exp of the scaled scores). Backward
// recomputes P = exp(S - lse) per tile; dq is the task's own, dk/dv accumulate in one buffer per
// worker thread ([T, Hkv, D] each: memory linear in T), summed at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace npr {
namespace {

using at::native::TransposeType;

constexpr int64_t kQTile = 64;   // query tokens per task (M = kQTile * G rows)
constexpr int64_t kKTile = 256;  // keys per tile

struct Dims {
  int64_t T, Hq, Hkv, G, D, R;
};

// One task: kv head h, query tokens [t0, t1) of run r.
struct Task {
  int64_t r, t0, t1, h, cost;
};

// The key ranges a task visits: the run's two full ranges, its full span before the tile
// [a, t0), and the tile's diagonal [t0, t1) (masked).
struct Ranges {
  int64_t lo[4], hi[4];
  bool masked[4];
};

inline Ranges task_ranges(const int64_t* run, int64_t t0, int64_t t1) {
  Ranges g;
  g.lo[0] = run[2], g.hi[0] = run[3], g.masked[0] = false;
  g.lo[1] = run[4], g.hi[1] = run[5], g.masked[1] = false;
  g.lo[2] = run[0], g.hi[2] = t0, g.masked[2] = false;
  g.lo[3] = t0, g.hi[3] = t1, g.masked[3] = true;
  return g;
}

Dims check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& runs) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "layout_attention: q, k, v must be [T, H, D], got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  runs.device().is_cpu(),
              "layout_attention: CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "layout_attention: q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "layout_attention: q, k, v dtypes differ: ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  Dims d{q.size(0), q.size(1), k.size(1), 0, q.size(2), 0};
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == d.T && k.size(2) == d.D,
              "layout_attention: k and v must be [T=", d.T, ", Hkv, D=", d.D, "], got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "layout_attention: ", d.Hq,
              " query heads are not a multiple of ", d.Hkv, " kv heads");
  d.G = d.Hq / d.Hkv;
  TORCH_CHECK(runs.scalar_type() == at::kLong && runs.dim() == 2 && runs.size(1) == 6,
              "layout_attention: runs must be int64 [R, 6], got ", runs.scalar_type(), " ",
              runs.sizes());
  TORCH_CHECK(runs.is_contiguous(), "layout_attention: runs must be contiguous");
  d.R = runs.size(0);
  // runs tile [0, T) in order and their ranges stay inside the keys before them: a bad plan
  // must fail here, not read out of bounds
  const int64_t* p = runs.const_data_ptr<int64_t>();
  int64_t next = 0;
  for (int64_t r = 0; r < d.R; ++r, p += 6) {
    TORCH_CHECK(p[0] == next && p[1] > p[0] && p[1] <= d.T, "layout_attention: run ", r, " [",
                p[0], ", ", p[1], ") does not continue the runs before it (next token ", next,
                ", T = ", d.T, ")");
    TORCH_CHECK(0 <= p[2] && p[2] <= p[3] && p[3] <= p[0] && 0 <= p[4] && p[4] <= p[5] &&
                    p[5] <= p[0],
                "layout_attention: run ", r, "'s key ranges [", p[2], ", ", p[3], ") [", p[4],
                ", ", p[5], ") must lie before its first query ", p[0]);
    next = p[1];
  }
  TORCH_CHECK(next == d.T, "layout_attention: runs cover ", next, " of ", d.T, " tokens");
  return d;
}

// Tasks of all runs and kv heads, most expensive first (run_tasks deals them out to the slots).
std::vector<Task> make_tasks(const Dims& d, const int64_t* runs) {
  std::vector<Task> tasks;
  for (int64_t r = 0; r < d.R; ++r) {
    const int64_t* run = runs + 6 * r;
    for (int64_t t0 = run[0]; t0 < run[1]; t0 += kQTile) {
      const int64_t t1 = std::min(t0 + kQTile, run[1]);
      const int64_t keys = (run[3] - run[2]) + (run[5] - run[4]) + (t1 - run[0]);
      for (int64_t h = 0; h < d.Hkv; ++h) tasks.push_back({r, t0, t1, h, (t1 - t0) * keys});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& x, const Task& y) { return x.cost > y.cost; });
  return tasks;
}

// s[0, n) = exp(s - m) in place; returns the sum.
inline float exp_sub_sum(float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum256(acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

inline double exp_sub_sum(double* s, int64_t n, double m) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// The BLAS of torch's CPU wheel (MKL's sgemm_/dgemm_, Fortran LP64 interface), looked up weakly:
// a torch built without them falls back to at::addmm on views (dispatcher overhead per tile).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

// Column-major C[m, n] = alpha op(A) op(B) + beta C (BLAS convention).
template <typename T>
inline void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  auto* blas = [] {
    if constexpr (std::is_same_v<T, float>) return sgemm_; else return dgemm_;
  }();
  if (blas != nullptr) {
    const char ca = ta == TransposeType::Transpose ? 'T' : 'N';
    const char cb = tb == TransposeType::Transpose ? 'T' : 'N';
    const int im = int(m), in = int(n), ik = int(k), ia = int(lda), ib = int(ldb), ic = int(ldc);
    blas(&ca, &cb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
    return;
  }
  // column-major X [r, c] with leading dimension ld = a tensor [r, c] of strides (1, ld)
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const bool tA = ta == TransposeType::Transpose, tB = tb == TransposeType::Transpose;
  at::Tensor A = at::from_blob(const_cast<T*>(a), {tA ? k : m, tA ? m : k}, {1, lda}, opt);
  at::Tensor B = at::from_blob(const_cast<T*>(b), {tB ? n : k, tB ? k : n}, {1, ldb}, opt);
  at::Tensor C = at::from_blob(c, {m, n}, {1, ldc}, opt);
  at::addmm_out(C, C, tA ? A.t() : A, tB ? B.t() : B, beta, alpha);
}

constexpr TransposeType N_ = TransposeType::NoTranspose;
constexpr TransposeType T_ = TransposeType::Transpose;

// S[M, N] (row-major, ld N) = A[M, D] (ld D) . B[N, D]^T (rows ldb apart).
template <typename T>
inline void mm_abt(int64_t M, int64_t N, int64_t D, const T* A, const T* B, int64_t ldb, T* S) {
  gemm<T>(T_, N_, N, M, D, T(1), B, ldb, A, D, T(0), S, N);
}

// C[M, D] (ld D) += P[M, N] (ld N) . B[N, D] (rows ldb apart).
template <typename T>
inline void mm_add_pb(int64_t M, int64_t N, int64_t D, const T* P, const T* B, int64_t ldb, T* C) {
  gemm<T>(N_, N_, D, M, N, T(1), B, ldb, P, N, T(1), C, D);
}

// C[N, D] (rows ldc apart) += P[M, N]^T (ld N) . A[M, D] (ld D).
template <typename T>
inline void mm_add_pta(int64_t M, int64_t N, int64_t D, const T* P, const T* A, T* C,
                       int64_t ldc) {
  gemm<T>(N_, T_, D, N, M, T(1), A, D, P, N, T(1), C, ldc);
}

// Rows of one task: row i * G + g is token t0 + i, query head h * G + g. Copies those rows of
// x [T, Hq, D] into buf [M, D], times mul.
template <typename T>
inline void gather_rows(const T* x, const Dims& d, const Task& t, T mul, T* buf) {
  const int64_t n = (t.t1 - t.t0), w = d.G * d.D;
  for (int64_t i = 0; i < n; ++i) {
    const T* src = x + ((t.t0 + i) * d.Hq + t.h * d.G) * d.D;
    T* dst = buf + i * w;
    for (int64_t j = 0; j < w; ++j) dst[j] = src[j] * mul;
  }
}

// Keys of a tile [c0, c0 + N) that the row of token t sees: all, or on the diagonal tile the
// first t + 1 - c0 (the rest is masked and never exponentiated).
inline int64_t visible(bool diagonal, int64_t t, int64_t c0, int64_t N) {
  return diagonal ? std::clamp<int64_t>(t + 1 - c0, 0, N) : N;
}

inline float row_max(const float* s, int64_t n) {
  __m256 acc = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(s + j));
  float mx = hmax256(acc);
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

inline double row_max(const double* s, int64_t n) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

template <typename T>
struct FwdScratch {
  std::vector<T> q, o, s, m, l;
  explicit FwdScratch(int64_t M, int64_t D)
      : q(M * D), o(M * D), s(M * kKTile), m(M), l(M) {}
};

template <typename T>
void forward_task(const T* q, const T* k, const T* v, const Dims& d, const Task& t,
                  const int64_t* run, T scale, T* out, T* lse, FwdScratch<T>& sc) {
  const int64_t M = (t.t1 - t.t0) * d.G, D = d.D, ldk = d.Hkv * D;
  const T ninf = -std::numeric_limits<T>::infinity();
  gather_rows(q, d, t, scale, sc.q.data());
  std::fill(sc.o.begin(), sc.o.begin() + M * D, T(0));
  std::fill(sc.m.begin(), sc.m.begin() + M, ninf);
  std::fill(sc.l.begin(), sc.l.begin() + M, T(0));
  const Ranges g = task_ranges(run, t.t0, t.t1);
  for (int rg = 0; rg < 4; ++rg) {
    for (int64_t c0 = g.lo[rg]; c0 < g.hi[rg]; c0 += kKTile) {
      const int64_t N = std::min(kKTile, g.hi[rg] - c0);
      T* S = sc.s.data();
      const T* kt = k + c0 * ldk + t.h * D;
      const T* vt = v + c0 * ldk + t.h * D;
      mm_abt<T>(M, N, D, sc.q.data(), kt, ldk, S);
      for (int64_t r = 0; r < M; ++r) {
        T* s = S + r * N;
        const int64_t nv = visible(g.masked[rg], t.t0 + r / d.G, c0, N);
        std::fill(s + nv, s + N, T(0));
        if (nv == 0) continue;
        const T m_new = std::max(sc.m[r], row_max(s, nv));
        const T alpha = std::exp(sc.m[r] - m_new);  // exp(-inf) = 0 on the row's first tile
        sc.l[r] = sc.l[r] * alpha + exp_sub_sum(s, nv, m_new);
        sc.m[r] = m_new;
        if (alpha != T(1)) {
          T* o = sc.o.data() + r * D;
          for (int64_t j = 0; j < D; ++j) o[j] *= alpha;
        }
      }
      mm_add_pb<T>(M, N, D, S, vt, ldk, sc.o.data());
    }
  }
  for (int64_t r = 0; r < M; ++r) {
    const int64_t tok = t.t0 + r / d.G, head = t.h * d.G + r % d.G;
    const T inv = T(1) / sc.l[r];
    const T* o = sc.o.data() + r * D;
    T* dst = out + (tok * d.Hq + head) * D;
    for (int64_t j = 0; j < D; ++j) dst[j] = o[j] * inv;
    lse[head * d.T + tok] = sc.m[r] + std::log(sc.l[r]);
  }
}

template <typename T>
struct BwdScratch {
  std::vector<T> q, go, dq, s, dp, lse, delta;
  explicit BwdScratch(int64_t M, int64_t D)
      : q(M * D), go(M * D), dq(M * D), s(M * kKTile), dp(M * kKTile), lse(M), delta(M) {}
};

template <typename T>
void backward_task(const T* grad, const T* q, const T* k, const T* v, const T* out,
                   const T* lse, const Dims& d, const Task& t, const int64_t* run, T scale, T* dq,
                   T* dk, T* dv, BwdScratch<T>& sc) {
  const int64_t M = (t.t1 - t.t0) * d.G, D = d.D, ldk = d.Hkv * D;
  gather_rows(q, d, t, scale, sc.q.data());
  gather_rows(grad, d, t, T(1), sc.go.data());
  std::fill(sc.dq.begin(), sc.dq.begin() + M * D, T(0));
  for (int64_t r = 0; r < M; ++r) {
    const int64_t tok = t.t0 + r / d.G, head = t.h * d.G + r % d.G;
    const T* o = out + (tok * d.Hq + head) * D;
    const T* go = sc.go.data() + r * D;
    T acc = 0;
    for (int64_t j = 0; j < D; ++j) acc += o[j] * go[j];
    sc.delta[r] = acc;
    sc.lse[r] = lse[head * d.T + tok];
  }
  const Ranges g = task_ranges(run, t.t0, t.t1);
  for (int rg = 0; rg < 4; ++rg) {
    for (int64_t c0 = g.lo[rg]; c0 < g.hi[rg]; c0 += kKTile) {
      const int64_t N = std::min(kKTile, g.hi[rg] - c0);
      T *S = sc.s.data(), *dP = sc.dp.data();
      const T* kt = k + c0 * ldk + t.h * D;
      const T* vt = v + c0 * ldk + t.h * D;
      mm_abt<T>(M, N, D, sc.q.data(), kt, ldk, S);    // scores
      mm_abt<T>(M, N, D, sc.go.data(), vt, ldk, dP);  // dP = dO V^T
      for (int64_t r = 0; r < M; ++r) {
        T* s = S + r * N;
        T* dp = dP + r * N;
        const int64_t nv = visible(g.masked[rg], t.t0 + r / d.G, c0, N);
        exp_sub_sum(s, nv, sc.lse[r]);  // P
        std::fill(s + nv, s + N, T(0));
        const T dl = sc.delta[r];
        for (int64_t j = 0; j < N; ++j) dp[j] = s[j] * (dp[j] - dl);  // dS
      }
      mm_add_pb<T>(M, N, D, dP, kt, ldk, sc.dq.data());                    // dQ += dS K
      mm_add_pta<T>(M, N, D, dP, sc.q.data(), dk + c0 * ldk + t.h * D, ldk);  // dK += dS^T Qs
      mm_add_pta<T>(M, N, D, S, sc.go.data(), dv + c0 * ldk + t.h * D, ldk);  // dV += P^T dO
    }
  }
  for (int64_t r = 0; r < M; ++r) {
    const int64_t tok = t.t0 + r / d.G, head = t.h * d.G + r % d.G;
    const T* s = sc.dq.data() + r * D;
    T* dst = dq + (tok * d.Hq + head) * D;
    for (int64_t j = 0; j < D; ++j) dst[j] = s[j] * scale;
  }
}

// Runs fn(slot, task, scratch) over the tasks: slot s takes tasks s, s + nth, s + 2 nth, ...
// (sorted most expensive first, so the slots' loads stay close). The assignment is static, not
// drained from a shared counter: the backward's dk/dv sums then add the same terms in the same
// order on every run (bitwise reproducible training, e.g. a resumed run equals an uninterrupted
// one), whichever thread runs a slot and however parallel_for splits [0, nth).
template <typename Scratch, typename Fn>
void run_tasks(const std::vector<Task>& tasks, int64_t nth, int64_t M, int64_t D, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, nth, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(M, D);
    for (int64_t me = begin; me < end; ++me)
      for (int64_t i = me; i < n; i += nth) fn(me, tasks[i], sc);
  });
}

std::tuple<at::Tensor, at::Tensor> layout_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        const at::Tensor& runs, double scale) {
  const Dims d = check_args(q, k, v, runs);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty({d.T, d.Hq, d.D}, qc.options());
  at::Tensor lse = at::empty({d.Hq, d.T}, qc.options());
  if (d.T == 0) return {out, lse};
  const int64_t* rp = runs.const_data_ptr<int64_t>();
  const std::vector<Task> tasks = make_tasks(d, rp);
  const int64_t nth = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size())));
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "layout_attention", [&] {
    using T = scalar_t;
    run_tasks<FwdScratch<T>>(tasks, nth, kQTile * d.G, d.D, [&](int64_t, const Task& t,
                                                                  FwdScratch<T>& sc) {
      forward_task<T>(qc.const_data_ptr<T>(), kc.const_data_ptr<T>(), vc.const_data_ptr<T>(), d,
                      t, rp + 6 * t.r, static_cast<T>(scale), out.mutable_data_ptr<T>(),
                      lse.mutable_data_ptr<T>(), sc);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layout_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& runs, double scale) {
  const Dims d = check_args(q, k, v, runs);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "layout_attention_backward: grad and out must be shaped like q ", q.sizes(),
              ", got ", grad.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == d.Hq && lse.size(1) == d.T,
              "layout_attention_backward: lse must be [Hq, T] = [", d.Hq, ", ", d.T, "], got ",
              lse.sizes());
  TORCH_CHECK(grad.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  lse.scalar_type() == q.scalar_type(),
              "layout_attention_backward: grad, out, lse must be ", q.scalar_type());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor gc = grad.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::empty_like(qc);
  if (d.T == 0) return {dq, at::zeros_like(kc), at::zeros_like(vc)};
  const int64_t* rp = runs.const_data_ptr<int64_t>();
  const std::vector<Task> tasks = make_tasks(d, rp);
  const int64_t nth = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size())));
  // dk/dv: worker slot 0 accumulates into the results, every other slot into a [T, Hkv, D]
  // buffer of its own, added after (memory: (threads - 1) x 2 x T x Hkv x D beyond the results)
  at::Tensor dk = at::zeros_like(kc), dv = at::zeros_like(vc);
  at::Tensor dkb, dvb;
  if (nth > 1) {
    dkb = at::zeros({nth - 1, d.T, d.Hkv, d.D}, qc.options());
    dvb = at::zeros({nth - 1, d.T, d.Hkv, d.D}, qc.options());
  }
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "layout_attention_backward", [&] {
    using T = scalar_t;
    const int64_t per = d.T * d.Hkv * d.D;
    T* dk0 = dk.mutable_data_ptr<T>();
    T* dv0 = dv.mutable_data_ptr<T>();
    T* dkp = nth > 1 ? dkb.mutable_data_ptr<T>() : nullptr;
    T* dvp = nth > 1 ? dvb.mutable_data_ptr<T>() : nullptr;
    run_tasks<BwdScratch<T>>(tasks, nth, kQTile * d.G, d.D, [&](int64_t me, const Task& t,
                                                                  BwdScratch<T>& sc) {
      backward_task<T>(gc.const_data_ptr<T>(), qc.const_data_ptr<T>(), kc.const_data_ptr<T>(),
                       vc.const_data_ptr<T>(), oc.const_data_ptr<T>(), lc.const_data_ptr<T>(), d,
                       t, rp + 6 * t.r, static_cast<T>(scale), dq.mutable_data_ptr<T>(),
                       me == 0 ? dk0 : dkp + (me - 1) * per, me == 0 ? dv0 : dvp + (me - 1) * per,
                       sc);
    });
  });
  for (int64_t i = 0; i + 1 < nth; ++i) {  // in place: no [T, Hkv, D] temporary
    dk.add_(dkb[i]);
    dv.add_(dvb[i]);
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace npr

TORCH_LIBRARY_FRAGMENT(npr, m) {
  m.def("layout_attention(Tensor q, Tensor k, Tensor v, Tensor runs, float scale) -> "
        "(Tensor, Tensor)");
  m.def("layout_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor runs, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(npr, CPU, m) {
  m.impl("layout_attention", &npr::layout_attention_cpu);
  m.impl("layout_attention_backward", &npr::layout_attention_backward_cpu);
}
