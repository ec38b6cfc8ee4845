// Argument checks of npr::tree_attention shared by the CPU and CUDA kernels: shapes, dtypes and
// devices only (no reads of tensor data, so no device sync). The CPU kernel also checks the data.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace npr {

// The kernels' arguments for one call (see the plan in npr/ops/attention.py), the same for the
// CPU kernels (Int = int64_t) and the CUDA kernel (Int = int: 32-bit index math on the device).
// A plain struct, so one definition serves both compilers.
template <typename T, typename Int>
struct TreeAttentionArgs {
  const T* q;  // [T, Hq, D] contiguous
  const T* k;
  const T* v;
  int64_t k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;  // cache strides (elements): block, head, slot
  const int32_t* seg_blocks;
  const int32_t* seg_fills;
  const int32_t* item_ents;
  const int32_t* item_part_indptr;
  const int32_t* part_q;
  const int32_t* part_nvis;
  float* o_part;    // [P, Hq, D]
  float* lse_part;  // [P, Hq]
  Int Hq, G, D;
  float scale;
};

// Internal linkage: this header is compiled both by the host compiler (CPU op) and by nvcc (CUDA
// op); each TU keeps its own copy rather than the linker picking one of two compilers' versions.
namespace {

struct TreeAttentionDims {
  int64_t T, Hq, D, NB, Hkv, BS, G, R, S, E, W, P;
};

inline void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& q,
                               int64_t dim = 1) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "npr::tree_attention: ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "npr::tree_attention: ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == q.device(), "npr::tree_attention: ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK(t.is_contiguous(), "npr::tree_attention: ", name, " must be contiguous");
}

// q: [T, Hq, D]; k_cache, v_cache: [NB, Hkv, BS, D]; the rest int32 (see npr/ops/attention.py).
inline TreeAttentionDims check_tree_attention_args(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& q_indptr, const at::Tensor& seg_indptr, const at::Tensor& seg_blocks,
    const at::Tensor& seg_fills, const at::Tensor& row_seg_indptr, const at::Tensor& row_segs,
    const at::Tensor& item_ents, const at::Tensor& item_part_indptr, const at::Tensor& part_q,
    const at::Tensor& part_nvis, const at::Tensor& q_part_indptr, const at::Tensor& q_parts,
    int64_t max_item_parts) {
  TORCH_CHECK(q.dim() == 3, "npr::tree_attention: q must be [T, Hq, D], got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "npr::tree_attention: k_cache must be [NB, Hkv, BS, D], got "
              "shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "npr::tree_attention: v_cache shape ",
              v_cache.sizes(), " differs from k_cache shape ", k_cache.sizes());
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "npr::tree_attention: q, k_cache, v_cache dtypes differ: ", q.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "npr::tree_attention: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device(),
              "npr::tree_attention: q, k_cache, v_cache must be on one device");
  TreeAttentionDims d{};
  d.T = q.size(0);
  d.Hq = q.size(1);
  d.D = q.size(2);
  d.NB = k_cache.size(0);
  d.Hkv = k_cache.size(1);
  d.BS = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d.D, "npr::tree_attention: head dim of q (", d.D,
              ") and of the cache (", k_cache.size(3), ") differ");
  TORCH_CHECK(d.Hkv >= 1 && d.Hq % d.Hkv == 0, "npr::tree_attention: Hq=", d.Hq,
              " must be a multiple of Hkv=", d.Hkv);
  TORCH_CHECK(d.D >= 1 && d.BS >= 1, "npr::tree_attention: empty head dim or block size");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "npr::tree_attention: the caches' last dim must be contiguous");
  d.G = d.Hq / d.Hkv;
  check_index_tensor(q_indptr, "q_indptr", q);
  check_index_tensor(seg_indptr, "seg_indptr", q);
  check_index_tensor(seg_blocks, "seg_blocks", q);
  check_index_tensor(seg_fills, "seg_fills", q);
  check_index_tensor(row_seg_indptr, "row_seg_indptr", q);
  check_index_tensor(row_segs, "row_segs", q);
  check_index_tensor(item_ents, "item_ents", q, 2);
  check_index_tensor(item_part_indptr, "item_part_indptr", q);
  check_index_tensor(part_q, "part_q", q);
  check_index_tensor(part_nvis, "part_nvis", q);
  check_index_tensor(q_part_indptr, "q_part_indptr", q);
  check_index_tensor(q_parts, "q_parts", q);
  TORCH_CHECK(q_indptr.numel() >= 1, "npr::tree_attention: q_indptr must have R+1 >= 1 elements");
  d.R = q_indptr.numel() - 1;
  TORCH_CHECK(row_seg_indptr.numel() == d.R + 1, "npr::tree_attention: row_seg_indptr has ",
              row_seg_indptr.numel(), " elements, expected R+1=", d.R + 1);
  TORCH_CHECK(seg_indptr.numel() >= 1, "npr::tree_attention: seg_indptr must have S+1 >= 1 "
              "elements");
  d.S = seg_indptr.numel() - 1;
  d.E = seg_blocks.numel();
  TORCH_CHECK(seg_fills.numel() == d.E, "npr::tree_attention: seg_fills has ", seg_fills.numel(),
              " entries, seg_blocks ", d.E);
  TORCH_CHECK(item_ents.size(1) == 2, "npr::tree_attention: item_ents must be [W, 2], got ",
              item_ents.sizes());
  d.W = item_ents.size(0);
  TORCH_CHECK(item_part_indptr.numel() == d.W + 1, "npr::tree_attention: item_part_indptr has ",
              item_part_indptr.numel(), " elements, expected W+1=", d.W + 1);
  d.P = part_q.numel();
  TORCH_CHECK(part_nvis.numel() == d.P && q_parts.numel() == d.P,
              "npr::tree_attention: part_q, part_nvis, q_parts must have one element per partial");
  TORCH_CHECK(q_part_indptr.numel() == d.T + 1, "npr::tree_attention: q_part_indptr has ",
              q_part_indptr.numel(), " elements, expected T+1=", d.T + 1);
  TORCH_CHECK(max_item_parts >= 0, "npr::tree_attention: max_item_parts must be >= 0");
  return d;
}

// The arguments of one call: q contiguous, partial outputs o_part [P, Hq, D] and lse_part [P, Hq]
// (fp32) allocated by the caller.
template <typename T, typename Int>
inline TreeAttentionArgs<T, Int> make_tree_attention_args(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const TreeAttentionDims& d,
    const at::Tensor& seg_blocks, const at::Tensor& seg_fills, const at::Tensor& item_ents,
    const at::Tensor& item_part_indptr, const at::Tensor& part_q, const at::Tensor& part_nvis,
    at::Tensor& o_part, at::Tensor& lse_part, double scale) {
  TreeAttentionArgs<T, Int> a{};
  a.q = reinterpret_cast<const T*>(q.const_data_ptr());
  a.k = reinterpret_cast<const T*>(k.const_data_ptr());
  a.v = reinterpret_cast<const T*>(v.const_data_ptr());
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_ss = k.stride(2);
  a.v_sb = v.stride(0);
  a.v_sh = v.stride(1);
  a.v_ss = v.stride(2);
  a.seg_blocks = seg_blocks.const_data_ptr<int32_t>();
  a.seg_fills = seg_fills.const_data_ptr<int32_t>();
  a.item_ents = item_ents.const_data_ptr<int32_t>();
  a.item_part_indptr = item_part_indptr.const_data_ptr<int32_t>();
  a.part_q = part_q.const_data_ptr<int32_t>();
  a.part_nvis = part_nvis.const_data_ptr<int32_t>();
  a.o_part = o_part.mutable_data_ptr<float>();
  a.lse_part = lse_part.mutable_data_ptr<float>();
  a.Hq = static_cast<Int>(d.Hq);
  a.G = static_cast<Int>(d.G);
  a.D = static_cast<Int>(d.D);
  a.scale = static_cast<float>(scale);
  return a;
}

}  // namespace
}  // namespace npr
