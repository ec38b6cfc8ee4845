// The tree-attention planner (csrc/tree_attention_plan.cpp): one batch step's branch tree ->
// the work items, partials and merge lists of npr::tree_attention, as one int32 buffer.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace npr {

using I64 = std::vector<int64_t>;

struct TreeAttentionPlanData {
  // int32 [sum(sizes)]: q_indptr, seg_indptr, seg_blocks, seg_fills, row_seg_indptr, row_segs,
  // item_ents [W, 2], item_part_indptr, part_q, part_nvis, q_part_indptr, q_parts, back to back
  at::Tensor buffer;
  I64 sizes;                // the 12 parts' lengths
  int64_t max_item_parts;   // most queries in one item
  I64 row_lens;             // keys of each row
  int64_t kv_tokens_read;   // key tokens the items read per kv head
};

// The tree as in npr.ops.attention.plan (int64 lists). num_blocks < 0: block ids not bounded.
// Throws std::invalid_argument (ValueError in Python) naming what is wrong with a bad tree.
TreeAttentionPlanData plan_tree_attention(const I64& q_indptr, const I64& seg_indptr,
                                          const I64& seg_blocks, const I64& seg_fills,
                                          const I64& row_seg_indptr, const I64& row_segs,
                                          int64_t block_size, int64_t num_blocks,
                                          int64_t kv_chunk, int64_t max_item_queries);

}  // namespace npr
