// One engine step's plan as the model runner consumes it: the scheduler's Plan (scheduler.h) plus
// the tree attention's work items (tree_attention_plan.h), packed into two host tensors that go
// to the device in one copy each. Built in C++ for every step; no Python loop touches it.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "scheduler.h"
#include "tree_attention_plan.h"

namespace npr {

struct StepPlan {
  // int32, back to back: input_ids [T], positions [T], logits_indices [Ns], copy_src [C],
  // copy_dst [C], then the attention plan's 12 parts (TreeAttentionPlanData::buffer)
  at::Tensor ints;
  at::Tensor slots;  // int64 [T]: each token's KV slot
  I64 sizes;         // lengths of the 17 parts of ints
  int64_t max_item_parts = 0, kv_tokens_read = 0;
  I64 row_lens;
  // host-side bookkeeping of the sampling rows (the engine's sampler and stop strings)
  std::vector<int32_t> row_node, sample_index, sample_node, sample_branch, sample_in_step;
  std::vector<int32_t> sample_position;  // position of each sampling row's input token
  std::vector<int64_t> sample_request;
  int64_t num_tokens = 0, num_rows = 0, num_preempted = 0;
};

// Throws std::invalid_argument if the attention plan rejects the tree (a scheduler bug).
StepPlan make_step_plan(const Plan& p, int64_t block_size, int64_t num_blocks, int64_t kv_chunk,
                        int64_t max_item_queries);

}  // namespace npr
