// Argument checks shared by the CPU (csrc/kv_ops.cpp) and CUDA (npr/kernels/kv_ops.cu) kernels of
// npr::write_kv and npr::copy_blocks; TORCH_CHECK_VALUE, so Python sees a ValueError.
// Cache layout per layer (HND per block):
//   k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim], head_dim contiguous.
#pragma once

#include <ATen/core/Tensor.h>

namespace npr {

inline bool kv_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_kv_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK_VALUE(k_cache.dim() == 4, op,
                    ": k_cache must be [num_blocks, num_kv_heads, block_size, head_dim], got ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op, ": v_cache shape ", v_cache.sizes(),
                    " differs from k_cache shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(kv_dtype_ok(k_cache.scalar_type()), op,
                    ": cache dtype must be float32, bfloat16 or float16, got ",
                    k_cache.scalar_type());
  TORCH_CHECK_VALUE(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache dtype ",
                    v_cache.scalar_type(), " differs from k_cache dtype ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(v_cache.device() == k_cache.device(), op, ": k_cache on ", k_cache.device(),
                    " but v_cache on ", v_cache.device());
  TORCH_CHECK_VALUE(k_cache.size(3) == 0 || (k_cache.stride(3) == 1 && v_cache.stride(3) == 1), op,
                    ": the caches' head_dim must be contiguous (stride 1), got k_cache strides ",
                    k_cache.strides(), " v_cache strides ", v_cache.strides());
}

inline void check_index(const char* op, const char* name, const at::Tensor& idx,
                        const at::Tensor& cache) {
  TORCH_CHECK_VALUE(idx.dim() == 1, op, ": ", name, " must be 1-D, got shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
                    idx.scalar_type());
  TORCH_CHECK_VALUE(idx.device() == cache.device(), op, ": ", name, " on ", idx.device(),
                    " but the caches on ", cache.device());
}

// k, v: [T, Hkv, D]; slots: [T] int64 (block * block_size + offset; negative = skip).
inline void check_write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& slots) {
  constexpr const char* op = "npr::write_kv";
  check_kv_caches(op, k_cache, v_cache);
  TORCH_CHECK_VALUE(k.dim() == 3, op, ": k must be [T, num_kv_heads, head_dim], got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": v shape ", v.sizes(), " differs from k shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(3), op,
                    ": k is [T, Hkv, D] = ", k.sizes(), " but the cache holds Hkv=",
                    k_cache.size(1), " heads of D=", k_cache.size(3));
  const auto dt = k_cache.scalar_type();
  TORCH_CHECK_VALUE(k.scalar_type() == dt && v.scalar_type() == dt, op, ": k/v dtypes (",
                    k.scalar_type(), ", ", v.scalar_type(), ") must equal the cache dtype ",
                    k_cache.scalar_type());
  TORCH_CHECK_VALUE(k.device() == k_cache.device() && v.device() == k_cache.device(), op, ": k on ",
                    k.device(), ", v on ", v.device(), " but the caches on ", k_cache.device());
  check_index(op, "slots", slots, k_cache);
  TORCH_CHECK_VALUE(slots.size(0) == k.size(0), op, ": slots has ", slots.size(0),
                    " entries but k has T=", k.size(0), " tokens");
}

// src, dst: [N] int64 block ids.
inline void check_copy_blocks(const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& src, const at::Tensor& dst) {
  constexpr const char* op = "npr::copy_blocks";
  check_kv_caches(op, k_cache, v_cache);
  check_index(op, "src", src, k_cache);
  check_index(op, "dst", dst, k_cache);
  TORCH_CHECK_VALUE(src.size(0) == dst.size(0), op, ": src has ", src.size(0),
                    " block ids but dst has ", dst.size(0));
}

}  // namespace npr
