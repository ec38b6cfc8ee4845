// make_step_plan: the scheduler's Plan + the tree attention's work items -> StepPlan.
#include "step_plan.h"

#include <ATen/ops/empty.h>

#include <cstring>
#include <numeric>

namespace npr {
namespace {

template <typename T>
I64 widen(const std::vector<T>& v) {
  return I64(v.begin(), v.end());
}

}  // namespace

StepPlan make_step_plan(const Plan& p, int64_t block_size, int64_t num_blocks, int64_t kv_chunk,
                        int64_t max_item_queries) {
  TreeAttentionPlanData att = plan_tree_attention(
      widen(p.q_indptr), widen(p.seg_indptr), widen(p.seg_blocks), widen(p.seg_fills),
      widen(p.row_seg_indptr), widen(p.row_segs), block_size, num_blocks, kv_chunk,
      max_item_queries);
  StepPlan s;
  const int64_t T = static_cast<int64_t>(p.input_ids.size());
  s.sizes = {T, T, static_cast<int64_t>(p.logits_indices.size()),
             static_cast<int64_t>(p.copy_src.size()), static_cast<int64_t>(p.copy_dst.size())};
  s.sizes.insert(s.sizes.end(), att.sizes.begin(), att.sizes.end());
  s.ints = at::empty({std::accumulate(s.sizes.begin(), s.sizes.end(), int64_t(0))},
                     at::TensorOptions().dtype(at::kInt));
  int32_t* out = s.ints.mutable_data_ptr<int32_t>();
  for (const auto* v : {&p.input_ids, &p.positions, &p.logits_indices, &p.copy_src, &p.copy_dst}) {
    if (!v->empty()) std::memcpy(out, v->data(), v->size() * sizeof(int32_t));
    out += v->size();
  }
  if (att.buffer.numel())
    std::memcpy(out, att.buffer.const_data_ptr<int32_t>(), att.buffer.numel() * sizeof(int32_t));
  s.slots = at::empty({T}, at::TensorOptions().dtype(at::kLong));
  if (T) std::memcpy(s.slots.mutable_data_ptr<int64_t>(), p.slots.data(), T * sizeof(int64_t));
  s.max_item_parts = att.max_item_parts;
  s.kv_tokens_read = att.kv_tokens_read;
  s.row_lens = std::move(att.row_lens);
  s.row_node = p.row_node;
  s.sample_request = p.sample_request;
  s.sample_index = p.sample_index;
  s.sample_node = p.sample_node;
  s.sample_branch = p.sample_branch;
  s.sample_in_step = p.sample_in_step;
  s.sample_position.resize(p.logits_indices.size());
  for (size_t i = 0; i < p.logits_indices.size(); ++i)
    s.sample_position[i] = p.positions[static_cast<size_t>(p.logits_indices[i])];
  s.num_tokens = T;
  s.num_rows = static_cast<int64_t>(p.row_node.size());
  s.num_preempted = p.num_preempted;
  return s;
}

}  // namespace npr
