// The engine's scheduler (spec/NPR.md §3): requests become branch trees; all live branches of all
// requests decode as rows of one batch over the copy-on-write block pool.
//
// Data flow, one step:  schedule() -> Plan (flat arrays) -> Python runs the model and samples ->
// update(sampled ids, logprobs) -> fork / join / finish bookkeeping.
//
// Every node (prompt root, sample trunk, step child) keeps the full list of its tokens and how
// many of them have KV in the cache (num_computed). Prefill, injected tags, decode and recompute
// after preemption are then one mechanism: a row computes a node's pending tokens, and samples
// when the node is live and the row reaches its last token.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "block_pool.h"

namespace npr {

enum class Mode : int32_t { Native = 0, Sequential = 1, Off = 2 };
enum class Finish : int32_t { None = 0, Stop = 1, Length = 2, Abort = 3, InvalidStructure = 4 };

// Tag order as in npr/tags.py.
enum Tag : int32_t {
  kGuidelineOpen = 0, kGuidelineClose, kPlanOpen, kPlanClose,
  kStepOpen, kStepClose, kTakeawayOpen, kTakeawayClose, kNumTags
};

struct SchedulerConfig {
  int64_t num_blocks = 0;
  int64_t block_size = 16;
  int64_t max_rows = 256;               // rows (branches) per step
  int64_t max_tokens_per_step = 4096;   // tokens per step (long prefills are chunked)
  int64_t max_branches = 8;             // N_max
  int64_t max_model_len = 1 << 30;      // positions must stay below this (the model's context)
  std::vector<int32_t> tag_ids;         // kNumTags ids, or empty (only parallel="off" then)
  std::vector<std::vector<int32_t>> step_labels;  // step_labels[k-1] = token ids of "k:"
};

struct RequestSpec {
  int64_t id = 0;
  std::vector<int32_t> prompt;
  int32_t n = 1;                        // samples sharing the prompt's KV
  int64_t max_new_tokens = 1024;        // every token of every branch, injected included
  int64_t max_branch_tokens = 1 << 30;  // per step child, injected included
  Mode mode = Mode::Native;
  std::vector<int32_t> stop_ids;        // EOS and stop_token_ids
};

struct Fork {
  int64_t offset = 0;     // trunk tokens before the children (the trunk's </guideline> is last)
  int32_t p = 0;          // position id of that </guideline>
  std::vector<int32_t> children;  // node ids, step order
  bool tables_live = false;       // children forked in the pool (false again after preemption)
  bool joined = false;            // children's KV stitched into the trunk's table
};

enum class TrunkState : int32_t { Free = 0, Guideline, InPlan, Waiting, Takeaway };

struct Node {
  int32_t id = -1;
  int32_t kind = 0;       // 0 prompt root, 1 sample trunk, 2 step child
  int32_t parent = -1;    // node id
  int32_t sample = -1;
  int64_t request = -1;
  int32_t branch_id = 0;  // 0 for root/trunk; step children: 1, 2, ... per sample
  int32_t next_branch_id = 1;  // trunk: the id of its next step child
  std::vector<int32_t> tokens, positions;
  std::vector<uint8_t> injected;
  std::vector<float> logprobs;
  int64_t num_computed = 0;
  int64_t table = -1;
  int64_t parent_entries = 0;  // entries of the parent's table when this node was forked
  bool live = false;           // samples a token once its pending tokens are computed
  // trunk
  TrunkState state = TrunkState::Free;
  int32_t plan_count = 0;
  std::vector<Fork> forks;
  int64_t generated = 0;       // token ledger of the sample
  Finish finish = Finish::None;
  std::string finish_detail;
  // child
  bool ended = false;
};

struct Request {
  RequestSpec spec;
  int32_t root = -1;
  std::vector<int32_t> trunks;
  int64_t arrival = 0;
  int64_t num_preemptions = 0;
  bool finished = false;
  bool running = false;
};

// A batch step as flat arrays (T tokens, R rows, S segments, E segment entries).
struct Plan {
  std::vector<int32_t> input_ids, positions;   // [T]
  std::vector<int64_t> slots;                  // [T] physical KV slot
  std::vector<int32_t> q_indptr;               // [R+1]
  std::vector<int32_t> seg_indptr;             // [S+1]
  std::vector<int32_t> seg_blocks, seg_fills;  // [E]
  std::vector<int32_t> row_seg_indptr;         // [R+1]
  std::vector<int32_t> row_segs;               // row r's segments, root first
  std::vector<int32_t> row_node;               // [R]
  std::vector<int32_t> sample_rows;            // rows that sample, in update() order
  std::vector<int32_t> logits_indices;         // token index of each sampling row's last token
  std::vector<int64_t> sample_request;         // per sampling row
  std::vector<int32_t> sample_index, sample_node, sample_branch, sample_in_step;
  std::vector<int32_t> copy_src, copy_dst;     // copy-on-write block copies to apply first
  int64_t num_preempted = 0;
};

struct SampleOutput {
  std::vector<int32_t> token_ids, positions, branch_ids;
  std::vector<uint8_t> injected;
  std::vector<float> logprobs;   // NaN where injected
  Finish finish = Finish::None;
  std::string finish_detail;
  int64_t generated_tokens = 0;  // critical-path tokens: npr.format.critical_path_tokens
  int64_t forks = 0;
};

class Scheduler {
 public:
  explicit Scheduler(SchedulerConfig cfg);

  void add_request(RequestSpec spec);
  Plan schedule();
  // tokens/logprobs: one per sampling row of the last plan, in order. Returns finished ids.
  std::vector<int64_t> update(const std::vector<int32_t>& tokens, const std::vector<float>& logprobs);
  // Ends one sample (stop strings are matched in Python) or all of a request. Allowed between
  // schedule() and update() too (a logits processor failed): that sample's rows then get no
  // token from the update, its KV blocks are freed, the request finishes if it was the last.
  void finish_sample(int64_t request_id, int32_t sample, Finish reason, const std::string& detail);
  std::vector<int64_t> abort(const std::vector<int64_t>& request_ids);
  std::vector<int64_t> take_finished();
  SampleOutput output(int64_t request_id, int32_t sample) const;
  void release(int64_t request_id);   // drop a finished request's record
  // Drops the scheduled-but-not-updated step (an error happened in between) and aborts the
  // requests that had rows in it, so no table is left half-appended. Returns their ids.
  std::vector<int64_t> cancel_step();
  // Frees every table and requeues every running request for recompute (new weights).
  void preempt_all();

  std::vector<int32_t> visible_tokens(int32_t node_id) const;  // canonical order
  std::vector<int32_t> step_tokens(int32_t node_id) const;     // a child's sampled tokens
  bool has_unfinished() const { return !running_.empty() || !waiting_.empty(); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_preemptions() const { return num_preemptions_; }
  BlockPool& pool() { return pool_; }
  const SchedulerConfig& config() const { return cfg_; }

 private:
  struct RowWork {
    int32_t node;
    int64_t start, len;
    bool sample;
    std::vector<int64_t> slots;  // filled by allocate()
    std::vector<std::pair<int32_t, int32_t>> copies;
  };

  Node& node(int32_t id) { return *nodes_.at(id); }
  const Node& node(int32_t id) const { return *nodes_.at(id); }
  int32_t new_node(int64_t request, int32_t kind, int32_t parent, int32_t sample);
  int32_t tag_of(int32_t token) const;
  bool is_stop(const Request& r, int32_t token) const;
  void collect_request(Request& r, std::vector<RowWork>& rows, int64_t& tokens_left);
  void collect_trunk(Request& r, Node& t, std::vector<RowWork>& rows, int64_t& tokens_left);
  void add_row(std::vector<RowWork>& rows, Node& n, bool live_sample, int64_t end,
               int64_t& tokens_left);
  int64_t blocks_needed(const std::vector<RowWork>& rows, size_t from) const;
  void allocate(std::vector<RowWork>& rows, size_t from);
  void preempt(Request& r);
  void free_node_tables(Node& n);
  void handle_token(Request& r, Node& n, int32_t token, float logprob);
  void do_fork(Request& r, Node& trunk);
  void finish(Request& r, Node& trunk, Finish reason, const std::string& detail);
  void maybe_finish_request(Request& r);
  void append_token(Node& n, int32_t token, int32_t position, bool injected, float logprob);
  // Canonical order (spec §2) of trunk tokens [from, upto) with each fork's children before the
  // trunk token at the fork's offset (and at upto itself when forks_at_upto).
  void walk(const Node& t, int64_t from, int64_t upto, bool forks_at_upto,
            std::vector<std::pair<const Node*, int64_t>>& out) const;
  void emit_row(Plan& plan, const RowWork& w, std::unordered_map<int64_t, int32_t>& seg_of);
  std::vector<int32_t> path_of(const Node& n) const;  // root .. n

  SchedulerConfig cfg_;
  BlockPool pool_;
  std::unordered_map<int32_t, std::unique_ptr<Node>> nodes_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::vector<int64_t> running_;         // admission order
  std::deque<int64_t> waiting_;
  std::vector<int64_t> finished_;
  std::vector<RowWork> last_rows_;
  std::vector<int32_t> last_sample_rows_;
  int32_t next_node_ = 0;
  int64_t arrivals_ = 0;
  int64_t num_preemptions_ = 0;
};

}  // namespace npr
