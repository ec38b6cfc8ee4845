// npr._C.llama_layers: the engine's whole layer stack of a Llama-family model in one call, on CPU
// with fp32 activations and no autograd — the CPU counterpart of a captured decode graph. Per
// layer: the input norm, qkv projection and RoPE (one npr::linear_fused), the step's K/V into the
// paged cache (npr::write_kv), branch-tree attention (npr::tree_attention), the output projection
// plus residual, the post norm and gate/up projection, SiLU-mul, down projection plus residual —
// the same kernels LlamaLayer._forward_fused calls from Python, called here directly. Why: a
// 64-row step of the demo-size model spent ~0.5 ms of ~2 ms in Python and op dispatch between
// these kernels (measured on a 2-vCPU VM).
#include <ATen/core/Tensor.h>
#include <ATen/ops/index_select.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "bindings.h"
#include "cpu_ops.h"

namespace npr {
namespace {

using OptTensor = std::optional<at::Tensor>;

// x: [T, H] fp32; cos, sin: [T, D] fp32; per layer l: weights[4l..4l+4) = qkv [(Hq+2Hkv)D, H],
// o [H, Hq D], gate_up [2I, H], down [H, I] (plain fp32, packed: npr.ops.pack_linear_weight, or
// GEMM panels: npr.ops.pack_gemm_weight),
// biases likewise (None = none), norms[2l], norms[2l+1] = input / post-attention norm [H];
// k_caches[l], v_caches[l]: [NB, Hkv, BS, D] fp32; slots: [T] int64; plan: the 12 tensors of a
// TreeAttentionPlan (shared by all layers); keep: rows kept after the last layer's attention
// (None = all) -> [len(keep) or T, H]
at::Tensor llama_layers(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                        const std::vector<at::Tensor>& weights, const std::vector<OptTensor>& biases,
                        const std::vector<at::Tensor>& norms, int64_t hq, int64_t hkv, int64_t d,
                        int64_t intermediate, double eps, const std::vector<at::Tensor>& k_caches,
                        const std::vector<at::Tensor>& v_caches, const at::Tensor& slots,
                        const std::vector<at::Tensor>& plan, int64_t max_item_parts, double scale,
                        const OptTensor& keep) {
  const size_t L = k_caches.size();
  TORCH_CHECK_VALUE(weights.size() == 4 * L && biases.size() == 4 * L && norms.size() == 2 * L &&
                        v_caches.size() == L,
                    "llama_layers: per layer 4 weights, 4 biases, 2 norms, a K and a V cache; got ",
                    weights.size(), ", ", biases.size(), ", ", norms.size(), ", ", k_caches.size(),
                    ", ", v_caches.size(), " for ", L, " layers");
  TORCH_CHECK_VALUE(plan.size() == 12, "llama_layers: a TreeAttentionPlan has 12 tensors, got ",
                    plan.size());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kFloat,
                    "llama_layers: x must be fp32 [T, H], got ", x.scalar_type(), " ", x.sizes());
  const int64_t H = x.size(1), nq = hq * d, nkv = hkv * d;
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[4 * l];
    const OptTensor* b = &biases[4 * l];
    const at::Tensor& kc = k_caches[l];
    const at::Tensor& vc = v_caches[l];
    const at::Tensor qkv = linear_fused_cpu(x, w[0], nq + 2 * nkv, b[0], norms[2 * l], eps, false,
                                            std::nullopt, cos, sin, hq + hkv);  // [T, nq + 2nkv]
    const int64_t T = qkv.size(0);
    const at::Tensor q = qkv.narrow(1, 0, nq).view({T, hq, d});
    const at::Tensor k = qkv.narrow(1, nq, nkv).view({T, hkv, d});
    const at::Tensor v = qkv.narrow(1, nq + nkv, nkv).view({T, hkv, d});
    write_kv_cpu(k, v, kc, vc, slots);  // checks the cache (fp32, shapes)
    at::Tensor o = tree_attention_cpu(q, kc, vc, plan[0], plan[1], plan[2], plan[3], plan[4],
                                      plan[5], plan[6], plan[7], plan[8], plan[9], plan[10],
                                      plan[11], max_item_parts, scale);  // [T, hq, d]
    if (keep.has_value() && l + 1 == L) {  // the last layer: only the rows that give logits
      o = at::index_select(o, 0, *keep);
      x = at::index_select(x, 0, *keep);
    }
    x = linear_fused_cpu(o.view({o.size(0), nq}), w[1], H, b[1], std::nullopt, eps, false, x,
                         std::nullopt, std::nullopt, 0);
    const at::Tensor gu = linear_fused_cpu(x, w[2], 2 * intermediate, b[2], norms[2 * l + 1], eps,
                                           false, std::nullopt, std::nullopt, std::nullopt, 0);
    x = linear_fused_cpu(gu, w[3], H, b[3], std::nullopt, eps, true, x, std::nullopt,
                         std::nullopt, 0);
  }
  if (L == 0 && keep.has_value()) x = at::index_select(x, 0, *keep);
  return x;
}

}  // namespace

void bind_llama_layers(pybind11::module_& m) {
  m.def("llama_layers", &llama_layers, pybind11::arg("x"), pybind11::arg("cos"),
        pybind11::arg("sin"), pybind11::arg("weights"), pybind11::arg("biases"),
        pybind11::arg("norms"), pybind11::arg("num_heads"), pybind11::arg("num_kv_heads"),
        pybind11::arg("head_dim"), pybind11::arg("intermediate_size"), pybind11::arg("eps"),
        pybind11::arg("k_caches"), pybind11::arg("v_caches"), pybind11::arg("slots"),
        pybind11::arg("plan"), pybind11::arg("max_item_parts"), pybind11::arg("scale"),
        pybind11::arg("keep"),
        "A Llama-family layer stack over the paged KV cache in one call (CPU, fp32, no autograd):"
        " LlamaDecoder.forward_flat's engine path. x: [T, H] -> [len(keep) or T, H].");
}

}  // namespace npr
