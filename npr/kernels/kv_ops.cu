// npr::write_kv and npr::copy_blocks on CUDA. Both are pure byte copies, so one kernel per op
// serves fp32 / bf16 / fp16: it moves the widest unit (16/8/4/2 bytes) that the row size, the base
// pointers and the strides all allow. Out-of-range slots / block ids are skipped in the kernel
// (checking them on the host would cost a device sync per call).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>

#include "kv_ops.h"

namespace npr {
namespace {

constexpr int kThreads = 128;

// The widest copy unit (bytes) dividing every value (row size, addresses, byte strides).
int64_t pick_unit(std::initializer_list<int64_t> values) {
  for (int64_t u : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t v : values) ok = ok && (v % u == 0);
    if (ok) return u;
  }
  return 1;
}

// One thread block per token; its threads stride over the token's Hkv rows of row_units units.
template <typename U>
__global__ void write_kv_kernel(const char* __restrict__ k, const char* __restrict__ v,
                                char* __restrict__ kc, char* __restrict__ vc,
                                const int64_t* __restrict__ slots, int64_t H, int64_t row_units,
                                int64_t block_size, int64_t num_slots, int64_t ks0, int64_t ks1,
                                int64_t vs0, int64_t vs1, int64_t kcs0, int64_t kcs1,
                                int64_t kcs2, int64_t vcs0, int64_t vcs1, int64_t vcs2) {
  const int64_t t = blockIdx.x;
  const int64_t s = slots[t];
  if (s < 0 || s >= num_slots) return;  // padding (or an id the host did not check)
  const int64_t blk = s / block_size, off = s % block_size;
  const int64_t n = H * row_units;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t h = i / row_units, u = i % row_units;
    reinterpret_cast<U*>(kc + blk * kcs0 + h * kcs1 + off * kcs2)[u] =
        reinterpret_cast<const U*>(k + t * ks0 + h * ks1)[u];
    reinterpret_cast<U*>(vc + blk * vcs0 + h * vcs1 + off * vcs2)[u] =
        reinterpret_cast<const U*>(v + t * vs0 + h * vs1)[u];
  }
}

// grid (N, Hkv, 2): pair i, head h, cache z (0 = k, 1 = v); rows of row_units units each.
template <typename U>
__global__ void copy_blocks_kernel(char* __restrict__ kc, char* __restrict__ vc,
                                   const int64_t* __restrict__ src,
                                   const int64_t* __restrict__ dst, int64_t num_blocks,
                                   int64_t rows, int64_t row_units, int64_t kcs0, int64_t kcs1,
                                   int64_t kcs2, int64_t vcs0, int64_t vcs1, int64_t vcs2) {
  const int64_t i = blockIdx.x, h = blockIdx.y;
  const int64_t s = src[i], d = dst[i];
  if (s < 0 || s >= num_blocks || d < 0 || d >= num_blocks || s == d) return;
  const bool is_k = blockIdx.z == 0;
  char* base = is_k ? kc : vc;
  const int64_t c0 = is_k ? kcs0 : vcs0, c1 = is_k ? kcs1 : vcs1, c2 = is_k ? kcs2 : vcs2;
  const char* from = base + s * c0 + h * c1;
  char* to = base + d * c0 + h * c1;
  const int64_t n = rows * row_units;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t o = j / row_units, u = j % row_units;
    reinterpret_cast<U*>(to + o * c2)[u] = reinterpret_cast<const U*>(from + o * c2)[u];
  }
}

template <typename F>
void with_unit(int64_t unit, F&& f) {
  switch (unit) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

inline int64_t addr(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

void write_kv_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& slots) {
  check_write_kv(k, v, k_cache, v_cache, slots);
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2);
  if (T == 0 || H == 0 || D == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor kx = k.stride(2) == 1 ? k : k.contiguous();
  const at::Tensor vx = v.stride(2) == 1 ? v : v.contiguous();
  const at::Tensor sl = slots.contiguous();
  const int64_t es = static_cast<int64_t>(k.element_size());
  const int64_t row = D * es;
  const int64_t ks0 = kx.stride(0) * es, ks1 = kx.stride(1) * es;
  const int64_t vs0 = vx.stride(0) * es, vs1 = vx.stride(1) * es;
  const int64_t kcs0 = k_cache.stride(0) * es, kcs1 = k_cache.stride(1) * es,
                kcs2 = k_cache.stride(2) * es;
  const int64_t vcs0 = v_cache.stride(0) * es, vcs1 = v_cache.stride(1) * es,
                vcs2 = v_cache.stride(2) * es;
  const char* kp = static_cast<const char*>(kx.const_data_ptr());
  const char* vp = static_cast<const char*>(vx.const_data_ptr());
  char* kcp = static_cast<char*>(k_cache.mutable_data_ptr());
  char* vcp = static_cast<char*>(v_cache.mutable_data_ptr());
  const int64_t unit = pick_unit({row, addr(kp), addr(vp), addr(kcp), addr(vcp), ks0, ks1, vs0,
                                  vs1, kcs0, kcs1, kcs2, vcs0, vcs1, vcs2});
  const int64_t num_slots = k_cache.size(0) * k_cache.size(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  with_unit(unit, [&](auto u) {
    using U = decltype(u);
    write_kv_kernel<U><<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
        kp, vp, kcp, vcp, sl.const_data_ptr<int64_t>(), H, row / unit, k_cache.size(2), num_slots,
        ks0, ks1, vs0, vs1, kcs0, kcs1, kcs2, vcs0, vcs1, vcs2);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy_blocks_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& src,
                      const at::Tensor& dst) {
  check_copy_blocks(k_cache, v_cache, src, dst);
  const int64_t N = src.size(0);
  const int64_t nb = k_cache.size(0), H = k_cache.size(1), bs = k_cache.size(2),
                D = k_cache.size(3);
  if (N == 0 || H == 0 || bs == 0 || D == 0) return;
  TORCH_CHECK_VALUE(H <= 65535, "npr::copy_blocks: at most 65535 kv heads on CUDA, got ", H);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor sc = src.contiguous(), dc = dst.contiguous();
  const int64_t es = static_cast<int64_t>(k_cache.element_size());
  const int64_t row = D * es;
  const int64_t kcs0 = k_cache.stride(0) * es, kcs1 = k_cache.stride(1) * es,
                kcs2 = k_cache.stride(2) * es;
  const int64_t vcs0 = v_cache.stride(0) * es, vcs1 = v_cache.stride(1) * es,
                vcs2 = v_cache.stride(2) * es;
  // A head's [block_size, D] tile is usually one contiguous run: copy it as one row.
  const bool flat = kcs2 == row && vcs2 == row;
  const int64_t rows = flat ? 1 : bs, row_bytes = flat ? bs * row : row;
  char* kcp = static_cast<char*>(k_cache.mutable_data_ptr());
  char* vcp = static_cast<char*>(v_cache.mutable_data_ptr());
  const int64_t unit = pick_unit({row_bytes, addr(kcp), addr(vcp), kcs0, kcs1, vcs0, vcs1,
                                  flat ? row_bytes : kcs2, flat ? row_bytes : vcs2});
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(H), 2);
  with_unit(unit, [&](auto u) {
    using U = decltype(u);
    copy_blocks_kernel<U><<<grid, kThreads, 0, stream>>>(
        kcp, vcp, sc.const_data_ptr<int64_t>(), dc.const_data_ptr<int64_t>(), nb, rows,
        row_bytes / unit, kcs0, kcs1, kcs2, vcs0, vcs1, vcs2);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace npr

TORCH_LIBRARY_IMPL(npr, CUDA, m) {
  m.impl("write_kv", &npr::write_kv_cuda);
  m.impl("copy_blocks", &npr::copy_blocks_cuda);
}
