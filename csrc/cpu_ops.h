// The CPU kernels of registered ops that C++ calls directly (csrc/llama_layers.cpp), skipping
// the dispatcher; each checks its arguments as the op does.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace npr {

// npr::linear_fused (csrc/fused_linear.cpp)
at::Tensor linear_fused_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t n,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& norm_weight, double eps,
                            bool silu_mul, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& rope_cos,
                            const std::optional<at::Tensor>& rope_sin, int64_t rope_heads);

// npr::write_kv (csrc/kv_ops.cpp)
void write_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& slots);

// npr::tree_attention (csrc/tree_attention.cpp)
at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& q_indptr,
                              const at::Tensor& seg_indptr, const at::Tensor& seg_blocks,
                              const at::Tensor& seg_fills, const at::Tensor& row_seg_indptr,
                              const at::Tensor& row_segs, const at::Tensor& item_ents,
                              const at::Tensor& item_part_indptr, const at::Tensor& part_q,
                              const at::Tensor& part_nvis, const at::Tensor& q_part_indptr,
                              const at::Tensor& q_parts, int64_t max_item_parts, double scale);

}  // namespace npr
