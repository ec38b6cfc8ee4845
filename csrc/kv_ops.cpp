// npr::write_kv and npr::copy_blocks: the paged KV cache's two writes (schemas + CPU kernels).
// Both are byte copies (no arithmetic), so one dtype-agnostic kernel serves fp32 / bf16 / fp16.
// Cache layout per layer: [num_blocks, num_kv_heads, block_size, head_dim] (HND per block).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>
#include <unordered_set>

#include "cpu_ops.h"
#include "kv_ops.h"

namespace npr {

// k, v: [T, Hkv, D] -> k_cache/v_cache[slot / bs, :, slot % bs, :]; slots: [T] (< 0 = skip).
// Slots are physical (never positions: positions repeat across forked branches). Non-negative
// slots must be distinct (the block pool guarantees it); duplicates race.
void write_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& slots) {
  check_write_kv(k, v, k_cache, v_cache, slots);
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(2);
  const at::Tensor sl = slots.contiguous();
  const int64_t* sp = sl.const_data_ptr<int64_t>();
  const int64_t total = nb * bs;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(sp[t] < total, "npr::write_kv: slot ", sp[t], " of token ", t,
                      " is out of range for a cache of ", nb, " blocks x ", bs, " = ", total,
                      " slots");
  }
  if (T == 0 || H == 0 || D == 0) return;
  // head_dim must be contiguous in the sources too; other dims may be strided (q/k/v views).
  const at::Tensor kc = k.stride(2) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(2) == 1 ? v : v.contiguous();
  const int64_t es = static_cast<int64_t>(k.element_size());
  const int64_t row = D * es;
  const auto* kp = static_cast<const char*>(kc.const_data_ptr());
  const auto* vp = static_cast<const char*>(vc.const_data_ptr());
  auto* kcp = static_cast<char*>(k_cache.mutable_data_ptr());
  auto* vcp = static_cast<char*>(v_cache.mutable_data_ptr());
  const int64_t ks0 = kc.stride(0) * es, ks1 = kc.stride(1) * es;
  const int64_t vs0 = vc.stride(0) * es, vs1 = vc.stride(1) * es;
  const int64_t kcs0 = k_cache.stride(0) * es, kcs1 = k_cache.stride(1) * es,
                kcs2 = k_cache.stride(2) * es;
  const int64_t vcs0 = v_cache.stride(0) * es, vcs1 = v_cache.stride(1) * es,
                vcs2 = v_cache.stride(2) * es;
  // A second thread only pays off past ~1 MB per chunk: decode steps (a few KB to a few hundred
  // KB) stay on one thread and never wait at a barrier for a core that is busy elsewhere.
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, 2 * H * row));
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t s = sp[t];
      if (s < 0) continue;
      const int64_t blk = s / bs, off = s % bs;
      char* kd = kcp + blk * kcs0 + off * kcs2;
      char* vd = vcp + blk * vcs0 + off * vcs2;
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(kd + h * kcs1, kp + t * ks0 + h * ks1, row);
        std::memcpy(vd + h * vcs1, vp + t * vs0 + h * vs1, row);
      }
    }
  });
}

// k_cache[dst[i]] = k_cache[src[i]] (and v) for every i; src, dst: [N] int64 block ids.
// dst ids must be distinct and not appear in src (copy-on-write copies into fresh blocks), so
// the order of the copies does not matter.
void copy_blocks_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& src,
                     const at::Tensor& dst) {
  check_copy_blocks(k_cache, v_cache, src, dst);
  const int64_t N = src.size(0), nb = k_cache.size(0);
  const at::Tensor sc = src.contiguous(), dc = dst.contiguous();
  const int64_t* sp = sc.const_data_ptr<int64_t>();
  const int64_t* dp = dc.const_data_ptr<int64_t>();
  std::unordered_set<int64_t> dsts;
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(sp[i] >= 0 && sp[i] < nb && dp[i] >= 0 && dp[i] < nb,
                      "npr::copy_blocks: pair ", i, " (src ", sp[i], ", dst ", dp[i],
                      ") is out of range [0, ", nb, ")");
    TORCH_CHECK_VALUE(dsts.insert(dp[i]).second, "npr::copy_blocks: dst block ", dp[i],
                      " appears twice");
  }
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(sp[i] == dp[i] || !dsts.count(sp[i]), "npr::copy_blocks: block ", sp[i],
                      " is both a src and a dst (the result would depend on the copy order)");
  }
  const int64_t H = k_cache.size(1), bs = k_cache.size(2), D = k_cache.size(3);
  if (N == 0 || H == 0 || bs == 0 || D == 0) return;
  const int64_t es = static_cast<int64_t>(k_cache.element_size());
  const int64_t row = D * es;
  auto copy_one = [&](const at::Tensor& cache, int64_t s, int64_t d) {
    if (s == d) return;
    auto* base = static_cast<char*>(cache.mutable_data_ptr());
    const int64_t s0 = cache.stride(0) * es, s1 = cache.stride(1) * es, s2 = cache.stride(2) * es;
    if (s2 == row && s1 == bs * row) {  // the block is one contiguous run of bytes
      std::memcpy(base + d * s0, base + s * s0, H * bs * row);
      return;
    }
    for (int64_t h = 0; h < H; ++h)
      for (int64_t o = 0; o < bs; ++o)
        std::memcpy(base + d * s0 + h * s1 + o * s2, base + s * s0 + h * s1 + o * s2, row);
  };
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, 2 * H * bs * row));
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      copy_one(k_cache, sp[i], dp[i]);
      copy_one(v_cache, sp[i], dp[i]);
    }
  });
}

}  // namespace npr

TORCH_LIBRARY_FRAGMENT(npr, m) {
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
  m.def("copy_blocks(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor src, Tensor dst) -> ()");
}

TORCH_LIBRARY_IMPL(npr, CPU, m) {
  m.impl("write_kv", &npr::write_kv_cpu);
  m.impl("copy_blocks", &npr::copy_blocks_cpu);
}
