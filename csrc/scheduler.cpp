// The engine's scheduler: see scheduler.h for the model of requests as branch trees.
#include "scheduler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace npr {

namespace {
const float kNaN = std::numeric_limits<float>::quiet_NaN();
const char* kTagNames[kNumTags] = {"<guideline>", "</guideline>", "<plan>",     "</plan>",
                                   "<step>",      "</step>",      "<takeaway>", "</takeaway>"};
}  // namespace

Scheduler::Scheduler(SchedulerConfig cfg) : cfg_(std::move(cfg)), pool_(cfg_.num_blocks, cfg_.block_size) {
  if (cfg_.max_rows < 1) throw std::invalid_argument("Scheduler: max_rows must be >= 1");
  if (cfg_.max_tokens_per_step < 1)
    throw std::invalid_argument("Scheduler: max_tokens_per_step must be >= 1");
  if (cfg_.max_branches < 1) throw std::invalid_argument("Scheduler: max_branches must be >= 1");
  if (!cfg_.tag_ids.empty()) {
    if (cfg_.tag_ids.size() != kNumTags)
      throw std::invalid_argument("Scheduler: tag_ids must hold the 8 tag ids in npr.tags order");
    if (static_cast<int64_t>(cfg_.step_labels.size()) < cfg_.max_branches)
      throw std::invalid_argument("Scheduler: step_labels must hold the ids of \"k:\" for k = 1..max_branches");
  }
}

int32_t Scheduler::new_node(int64_t request, int32_t kind, int32_t parent, int32_t sample) {
  auto n = std::make_unique<Node>();
  n->id = next_node_++;
  n->request = request;
  n->kind = kind;
  n->parent = parent;
  n->sample = sample;
  const int32_t id = n->id;
  nodes_.emplace(id, std::move(n));
  return id;
}

int32_t Scheduler::tag_of(int32_t token) const {
  for (int32_t i = 0; i < static_cast<int32_t>(cfg_.tag_ids.size()); ++i)
    if (cfg_.tag_ids[i] == token) return i;
  return -1;
}

bool Scheduler::is_stop(const Request& r, int32_t token) const {
  return std::find(r.spec.stop_ids.begin(), r.spec.stop_ids.end(), token) != r.spec.stop_ids.end();
}

void Scheduler::add_request(RequestSpec spec) {
  if (requests_.count(spec.id)) throw std::invalid_argument("Scheduler: duplicate request id " + std::to_string(spec.id));
  if (spec.prompt.empty()) throw std::invalid_argument("Scheduler: empty prompt");
  if (spec.n < 1) throw std::invalid_argument("Scheduler: n must be >= 1");
  if (spec.max_new_tokens < 1) throw std::invalid_argument("Scheduler: max_new_tokens must be >= 1");
  if (spec.mode != Mode::Off && cfg_.tag_ids.empty())
    throw std::invalid_argument("Scheduler: parallel decoding needs the tag token ids (tokenizer without tags?)");
  auto r = std::make_unique<Request>();
  r->spec = std::move(spec);
  r->arrival = arrivals_++;
  const int64_t id = r->spec.id;
  // The root holds the prompt but its last token; each sample's trunk starts with that token, so
  // every sample gets its own first logits while all share the prompt's KV.
  const auto& prompt = r->spec.prompt;
  const int64_t P = static_cast<int64_t>(prompt.size());
  r->root = new_node(id, 0, -1, -1);
  Node& root = node(r->root);
  for (int64_t i = 0; i + 1 < P; ++i) append_token(root, prompt[i], static_cast<int32_t>(i), false, kNaN);
  for (int32_t s = 0; s < r->spec.n; ++s) {
    const int32_t t = new_node(id, 1, r->root, s);
    Node& tr = node(t);
    append_token(tr, prompt[P - 1], static_cast<int32_t>(P - 1), false, kNaN);
    tr.live = true;
    r->trunks.push_back(t);
  }
  requests_.emplace(id, std::move(r));
  waiting_.push_back(id);
}

void Scheduler::append_token(Node& n, int32_t token, int32_t position, bool injected, float logprob) {
  n.tokens.push_back(token);
  n.positions.push_back(position);
  n.injected.push_back(injected ? 1 : 0);
  n.logprobs.push_back(logprob);
}

// ---------------------------------------------------------------------------------------------
// schedule

void Scheduler::add_row(std::vector<RowWork>& rows, Node& n, bool live_sample, int64_t end,
                        int64_t& tokens_left) {
  if (static_cast<int64_t>(rows.size()) >= cfg_.max_rows) return;
  const int64_t len = std::min(end - n.num_computed, tokens_left);
  if (len <= 0) return;
  rows.push_back({n.id, n.num_computed, len, live_sample && n.num_computed + len == end});
  tokens_left -= len;
}

void Scheduler::collect_trunk(Request& r, Node& t, std::vector<RowWork>& rows, int64_t& tokens_left) {
  for (;;) {
    Fork* f = nullptr;
    for (auto& fk : t.forks)
      if (!fk.joined) { f = &fk; break; }
    const int64_t end = f ? f->offset : static_cast<int64_t>(t.tokens.size());
    if (t.num_computed < end) {
      add_row(rows, t, f == nullptr && t.live, end, tokens_left);
      return;
    }
    if (f == nullptr) return;
    if (!f->tables_live) {
      // Seal first: children start fresh blocks, so the join stitches without copying.
      pool_.seal(t.table);
      const auto tables = pool_.fork(t.table, static_cast<int64_t>(f->children.size()));
      const int64_t parent_entries = static_cast<int64_t>(pool_.entries(t.table).size());
      for (size_t k = 0; k < f->children.size(); ++k) {
        Node& c = node(f->children[k]);
        c.table = tables[k];
        c.parent_entries = parent_entries;
        c.num_computed = 0;
      }
      f->tables_live = true;
    }
    bool all_done = true;
    for (int32_t cid : f->children) {
      Node& c = node(cid);
      const int64_t size = static_cast<int64_t>(c.tokens.size());
      if (c.ended && c.num_computed == size) continue;
      all_done = false;
      if (c.num_computed < size) add_row(rows, c, !c.ended, size, tokens_left);
      if (r.spec.mode == Mode::Sequential) break;  // one branch after another
    }
    if (!all_done) return;
    std::vector<int64_t> tables;
    for (int32_t cid : f->children) {
      Node& c = node(cid);
      tables.push_back(c.table);
      c.table = -1;
    }
    pool_.join(t.table, tables);
    f->joined = true;
  }
}

void Scheduler::collect_request(Request& r, std::vector<RowWork>& rows, int64_t& tokens_left) {
  Node& root = node(r.root);
  if (root.table < 0) root.table = pool_.create();
  if (root.num_computed < static_cast<int64_t>(root.tokens.size())) {
    add_row(rows, root, false, static_cast<int64_t>(root.tokens.size()), tokens_left);
    return;
  }
  std::vector<int32_t> unforked;
  for (int32_t tid : r.trunks) {
    const Node& t = node(tid);
    if (t.finish == Finish::None && t.table < 0) unforked.push_back(tid);
  }
  if (!unforked.empty()) {
    pool_.seal(root.table);
    const auto tables = pool_.fork(root.table, static_cast<int64_t>(unforked.size()));
    const int64_t parent_entries = static_cast<int64_t>(pool_.entries(root.table).size());
    for (size_t i = 0; i < unforked.size(); ++i) {
      Node& t = node(unforked[i]);
      t.table = tables[i];
      t.parent_entries = parent_entries;
    }
  }
  for (int32_t tid : r.trunks) {
    Node& t = node(tid);
    if (t.finish != Finish::None) continue;
    if (static_cast<int64_t>(rows.size()) >= cfg_.max_rows || tokens_left <= 0) break;
    collect_trunk(r, t, rows, tokens_left);
  }
}

int64_t Scheduler::blocks_needed(const std::vector<RowWork>& rows, size_t from) const {
  int64_t need = 0;
  for (size_t i = from; i < rows.size(); ++i) need += pool_.blocks_needed(node(rows[i].node).table, rows[i].len);
  return need;
}

void Scheduler::allocate(std::vector<RowWork>& rows, size_t from) {
  for (size_t i = from; i < rows.size(); ++i) {
    auto res = pool_.append(node(rows[i].node).table, rows[i].len);
    rows[i].slots = std::move(res.slots);
    rows[i].copies = std::move(res.copies);
  }
}

void Scheduler::free_node_tables(Node& t) {
  for (auto& f : t.forks) {
    if (f.tables_live && !f.joined)
      for (int32_t cid : f.children) {
        Node& c = node(cid);
        if (c.table >= 0) pool_.free(c.table);
        c.table = -1;
      }
    f.tables_live = false;
  }
  if (t.table >= 0) pool_.free(t.table);
  t.table = -1;
}

void Scheduler::preempt(Request& r) {
  // Recompute later: drop every table, keep every token; the next schedules replay the tree.
  for (int32_t tid : r.trunks) {
    Node& t = node(tid);
    free_node_tables(t);
    t.num_computed = 0;
    for (auto& f : t.forks) {
      f.joined = false;
      for (int32_t cid : f.children) node(cid).num_computed = 0;
    }
  }
  Node& root = node(r.root);
  if (root.table >= 0) pool_.free(root.table);
  root.table = -1;
  root.num_computed = 0;
  r.num_preemptions++;
  num_preemptions_++;
}

std::vector<int32_t> Scheduler::path_of(const Node& n) const {
  std::vector<int32_t> path;
  for (const Node* x = &n; x != nullptr; x = x->parent >= 0 ? &node(x->parent) : nullptr) path.push_back(x->id);
  std::reverse(path.begin(), path.end());
  return path;
}

void Scheduler::emit_row(Plan& plan, const RowWork& w, std::unordered_map<int64_t, int32_t>& seg_of) {
  const Node& n = node(w.node);
  for (const auto& cp : w.copies) {
    plan.copy_src.push_back(cp.first);
    plan.copy_dst.push_back(cp.second);
  }
  for (int64_t i = 0; i < w.len; ++i) {
    plan.input_ids.push_back(n.tokens[w.start + i]);
    plan.positions.push_back(n.positions[w.start + i]);
    plan.slots.push_back(w.slots[i]);
  }
  plan.q_indptr.push_back(static_cast<int32_t>(plan.input_ids.size()));
  const auto path = path_of(n);
  for (size_t i = 0; i < path.size(); ++i) {
    const Node& x = node(path[i]);
    auto it = seg_of.find(x.id);
    if (it != seg_of.end()) {
      if (i + 1 == path.size()) throw std::logic_error("Scheduler: a node is both a row and an ancestor in one step");
      plan.row_segs.push_back(it->second);
      continue;
    }
    const auto& ents = pool_.entries(x.table);
    const int64_t begin = x.parent_entries, end = static_cast<int64_t>(ents.size());
    if (begin >= end) continue;
    const int32_t sid = static_cast<int32_t>(plan.seg_indptr.size()) - 1;
    for (int64_t e = begin; e < end; ++e) {
      plan.seg_blocks.push_back(ents[e].block);
      plan.seg_fills.push_back(ents[e].fill);
    }
    plan.seg_indptr.push_back(static_cast<int32_t>(plan.seg_blocks.size()));
    seg_of[x.id] = sid;
    plan.row_segs.push_back(sid);
  }
  plan.row_seg_indptr.push_back(static_cast<int32_t>(plan.row_segs.size()));
  const int32_t row = static_cast<int32_t>(plan.row_node.size());
  plan.row_node.push_back(n.id);
  if (w.sample) {
    plan.sample_rows.push_back(row);
    plan.logits_indices.push_back(static_cast<int32_t>(plan.input_ids.size()) - 1);
    plan.sample_index.push_back(n.sample);
    plan.sample_node.push_back(n.id);
    plan.sample_branch.push_back(n.branch_id);
    plan.sample_in_step.push_back(n.kind == 2 ? 1 : 0);
  }
}

Plan Scheduler::schedule() {
  if (!last_rows_.empty()) throw std::logic_error("Scheduler: schedule() called twice without update()");
  std::vector<RowWork> rows;
  std::vector<int64_t> row_request;
  int64_t tokens_left = cfg_.max_tokens_per_step;
  Plan plan;
  const int64_t preemptions_before = num_preemptions_;

  // 1) running requests, oldest first; the youngest are preempted when blocks run out.
  size_t i = 0;
  while (i < running_.size()) {
    if (static_cast<int64_t>(rows.size()) >= cfg_.max_rows || tokens_left <= 0) break;
    Request& r = *requests_.at(running_[i]);
    const size_t from = rows.size();
    const int64_t saved_tokens = tokens_left;
    collect_request(r, rows, tokens_left);
    bool removed = false;
    while (blocks_needed(rows, from) > pool_.num_free()) {
      if (running_.size() > i + 1) {
        const int64_t victim = running_.back();
        running_.pop_back();
        preempt(*requests_.at(victim));
        requests_.at(victim)->running = false;
        waiting_.push_front(victim);
        continue;
      }
      rows.resize(from);
      tokens_left = saved_tokens;
      if (i == 0) {
        // Alone and still too big: it can never fit this pool.
        for (int32_t tid : r.trunks)
          finish(r, node(tid), Finish::Length, "the KV cache is too small for this request");
      } else {
        running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(i));
        preempt(r);
        r.running = false;
        waiting_.push_front(r.spec.id);
      }
      removed = true;
      break;
    }
    if (removed) continue;
    allocate(rows, from);
    row_request.resize(rows.size(), r.spec.id);
    ++i;
  }

  // 2) admit waiting requests while rows, tokens and blocks allow (no preemption to admit, and
  // none at all in a step that had to preempt: the victims would be re-admitted at once).
  while (num_preemptions_ == preemptions_before && !waiting_.empty() && static_cast<int64_t>(rows.size()) < cfg_.max_rows && tokens_left > 0) {
    Request& r = *requests_.at(waiting_.front());
    const size_t from = rows.size();
    const int64_t saved_tokens = tokens_left;
    collect_request(r, rows, tokens_left);
    const int64_t need = blocks_needed(rows, from);
    if (need > pool_.num_free()) {
      rows.resize(from);
      tokens_left = saved_tokens;
      preempt(r);  // undo table set-up; counts no preemption below
      r.num_preemptions--;
      num_preemptions_--;
      if (running_.empty() && rows.empty()) {
        // Nothing else holds blocks: it can never fit.
        waiting_.pop_front();
        running_.push_back(r.spec.id);
        for (int32_t tid : r.trunks)
          finish(r, node(tid), Finish::Length, "the KV cache is too small for this request");
        continue;
      }
      break;
    }
    waiting_.pop_front();
    running_.push_back(r.spec.id);
    r.running = true;
    allocate(rows, from);
    row_request.resize(rows.size(), r.spec.id);
  }

  // 3) allocate slots and emit the flat plan.
  plan.q_indptr.push_back(0);
  plan.seg_indptr.push_back(0);
  plan.row_seg_indptr.push_back(0);
  std::unordered_map<int64_t, int32_t> seg_of;
  for (size_t k = 0; k < rows.size(); ++k) {
    emit_row(plan, rows[k], seg_of);
    if (rows[k].sample) plan.sample_request.push_back(row_request[k]);
  }
  plan.num_preempted = num_preemptions_ - preemptions_before;
  last_rows_ = std::move(rows);
  last_sample_rows_ = plan.sample_rows;
  return plan;
}

// ---------------------------------------------------------------------------------------------
// update

std::vector<int64_t> Scheduler::update(const std::vector<int32_t>& tokens, const std::vector<float>& logprobs) {
  if (tokens.size() != last_sample_rows_.size() || logprobs.size() != tokens.size())
    throw std::invalid_argument("Scheduler.update: expected " + std::to_string(last_sample_rows_.size()) +
                                " sampled tokens and logprobs, got " + std::to_string(tokens.size()) +
                                " and " + std::to_string(logprobs.size()));
  auto rows = std::move(last_rows_);
  last_rows_.clear();
  for (const auto& w : rows) {
    auto it = nodes_.find(w.node);
    if (it != nodes_.end() && it->second->table >= 0) it->second->num_computed += w.len;
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    auto it = nodes_.find(rows[last_sample_rows_[i]].node);
    if (it == nodes_.end()) continue;
    Node& n = *it->second;
    Node& t = n.kind == 2 ? node(n.parent) : n;
    if (t.finish != Finish::None) continue;  // a sibling ended the sample in this update
    handle_token(*requests_.at(n.request), n, tokens[i], logprobs[i]);
  }
  last_sample_rows_.clear();
  return take_finished();
}

void Scheduler::handle_token(Request& r, Node& n, int32_t token, float logprob) {
  Node& t = n.kind == 2 ? node(n.parent) : n;
  append_token(n, token, n.positions.back() + 1, false, logprob);
  t.generated += 1;
  const bool stop = is_stop(r, token);
  const int32_t tag = r.spec.mode == Mode::Off ? -1 : tag_of(token);
  auto invalid = [&](const std::string& what) { finish(r, t, Finish::InvalidStructure, what); };
  if (r.spec.mode == Mode::Off) {
    if (stop) return finish(r, t, Finish::Stop, "");
  } else if (n.kind == 1) {
    if (stop) {
      if (t.state == TrunkState::Free) return finish(r, t, Finish::Stop, "");
      return invalid("end of sequence inside an open guideline/plan/takeaway");
    }
    switch (t.state) {
      case TrunkState::Free:
        if (tag == kGuidelineOpen) {
          t.state = TrunkState::Guideline;
          t.plan_count = 0;
        } else if (tag >= 0) {
          return invalid(std::string("unexpected ") + kTagNames[tag] + " outside a block");
        }
        break;
      case TrunkState::Guideline:
        if (tag == kPlanOpen) {
          t.state = TrunkState::InPlan;
          t.plan_count++;
        } else if (tag == kGuidelineClose) {
          do_fork(r, t);
          if (t.finish != Finish::None) return;
        } else if (tag >= 0) {
          return invalid(std::string("unexpected ") + kTagNames[tag] + " inside a guideline");
        }
        break;
      case TrunkState::InPlan:
        if (tag == kPlanClose) t.state = TrunkState::Guideline;
        else if (tag >= 0) return invalid(std::string("unexpected ") + kTagNames[tag] + " inside a plan");
        break;
      case TrunkState::Takeaway:
        if (tag == kTakeawayClose) t.state = TrunkState::Free;
        else if (tag >= 0) return invalid(std::string("unexpected ") + kTagNames[tag] + " inside a takeaway");
        break;
      case TrunkState::Waiting:
        throw std::logic_error("Scheduler: a waiting trunk sampled a token");
    }
  } else {  // step child
    if (stop) return invalid("end of sequence inside a step");
    if (tag == kStepClose) {
      n.ended = true;
      n.live = false;
      Fork& f = t.forks.back();
      int64_t max_len = 0;
      bool all_ended = true;
      for (int32_t cid : f.children) {
        const Node& c = node(cid);
        all_ended = all_ended && c.ended;
        max_len = std::max<int64_t>(max_len, static_cast<int64_t>(c.tokens.size()));
      }
      if (all_ended) {
        // spec §2: <takeaway> sits at p + max_k L_k + 1.
        const int64_t pos = f.p + max_len + 1;
        if (t.generated + 1 > r.spec.max_new_tokens)
          return finish(r, t, Finish::Length, "max_new_tokens reached at the join");
        if (pos + 1 >= cfg_.max_model_len)
          return finish(r, t, Finish::Length, "reached the model's context length");
        append_token(t, cfg_.tag_ids[kTakeawayOpen], static_cast<int32_t>(pos), true, kNaN);
        t.generated += 1;
        t.state = TrunkState::Takeaway;
        t.live = true;
      }
    } else if (tag >= 0) {
      return invalid(std::string("unexpected ") + kTagNames[tag] + " inside a step (nesting is not part of the format)");
    } else if (static_cast<int64_t>(n.tokens.size()) >= r.spec.max_branch_tokens) {
      return finish(r, t, Finish::Length, "a step reached max_branch_tokens");
    }
  }
  if (t.finish == Finish::None && t.generated >= r.spec.max_new_tokens)
    finish(r, t, Finish::Length, "max_new_tokens reached");
  if (t.finish == Finish::None && n.positions.back() + 1 >= cfg_.max_model_len)
    finish(r, t, Finish::Length, "reached the model's context length");
}

void Scheduler::do_fork(Request& r, Node& t) {
  const int64_t n = t.plan_count;
  if (n < 1 || n > cfg_.max_branches) {
    return finish(r, t, Finish::InvalidStructure,
                  "guideline with " + std::to_string(n) + " plans (allowed: 1.." + std::to_string(cfg_.max_branches) + ")");
  }
  // Smallest cost of the block: per step <step> "k:" one token </step>; then <takeaway></takeaway>.
  int64_t min_cost = 2;
  for (int64_t k = 1; k <= n; ++k) {
    const int64_t child_min = 1 + static_cast<int64_t>(cfg_.step_labels[k - 1].size()) + 2;
    if (child_min > r.spec.max_branch_tokens)
      return finish(r, t, Finish::Length, "max_branch_tokens is too small for a step");
    min_cost += child_min;
  }
  if (t.generated + min_cost > r.spec.max_new_tokens)
    return finish(r, t, Finish::Length,
                  "a fork of " + std::to_string(n) + " branches does not fit the remaining max_new_tokens");
  Fork f;
  f.offset = static_cast<int64_t>(t.tokens.size());
  f.p = t.positions.back();
  int64_t longest_label = 0;
  for (int64_t k = 1; k <= n; ++k)
    longest_label = std::max<int64_t>(longest_label, static_cast<int64_t>(cfg_.step_labels[k - 1].size()));
  if (f.p + longest_label + 3 >= cfg_.max_model_len)
    return finish(r, t, Finish::Length, "reached the model's context length");
  for (int64_t k = 1; k <= n; ++k) {
    const int32_t cid = new_node(r.spec.id, 2, t.id, t.sample);
    Node& c = node(cid);
    c.branch_id = t.next_branch_id++;  // per sample, in fork order: independent of scheduling
    c.live = true;
    append_token(c, cfg_.tag_ids[kStepOpen], f.p + 1, true, kNaN);
    for (int32_t id : cfg_.step_labels[k - 1])
      append_token(c, id, c.positions.back() + 1, true, kNaN);
    t.generated += static_cast<int64_t>(c.tokens.size());
    f.children.push_back(cid);
  }
  t.forks.push_back(std::move(f));
  t.state = TrunkState::Waiting;
  t.live = false;
}

void Scheduler::finish(Request& r, Node& t, Finish reason, const std::string& detail) {
  if (t.finish != Finish::None) return;
  t.finish = reason;
  t.finish_detail = detail;
  t.live = false;
  free_node_tables(t);
  maybe_finish_request(r);
}

void Scheduler::maybe_finish_request(Request& r) {
  if (r.finished) return;
  for (int32_t tid : r.trunks)
    if (node(tid).finish == Finish::None) return;
  Node& root = node(r.root);
  if (root.table >= 0) pool_.free(root.table);
  root.table = -1;
  r.finished = true;
  r.running = false;
  running_.erase(std::remove(running_.begin(), running_.end(), r.spec.id), running_.end());
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), r.spec.id), waiting_.end());
  finished_.push_back(r.spec.id);
}

void Scheduler::finish_sample(int64_t request_id, int32_t sample, Finish reason, const std::string& detail) {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) throw std::invalid_argument("Scheduler: unknown request id " + std::to_string(request_id));
  Request& r = *it->second;
  if (sample < 0 || sample >= static_cast<int32_t>(r.trunks.size()))
    throw std::invalid_argument("Scheduler: bad sample index " + std::to_string(sample));
  // Mid-step is fine: update() skips the rows of a finished trunk (and of its steps), and only
  // counts computed tokens for nodes that still hold a table.
  finish(r, node(r.trunks[sample]), reason, detail);
}

std::vector<int64_t> Scheduler::abort(const std::vector<int64_t>& request_ids) {
  if (!last_rows_.empty()) throw std::logic_error("Scheduler: abort() between schedule() and update()");
  for (int64_t id : request_ids) {
    auto it = requests_.find(id);
    if (it == requests_.end() || it->second->finished) continue;
    for (int32_t tid : it->second->trunks) finish(*it->second, node(tid), Finish::Abort, "aborted");
  }
  return take_finished();
}

std::vector<int64_t> Scheduler::cancel_step() {
  std::vector<int64_t> ids;
  for (const auto& w : last_rows_) {
    auto it = nodes_.find(w.node);
    if (it == nodes_.end()) continue;
    const int64_t rid = it->second->request;
    if (std::find(ids.begin(), ids.end(), rid) == ids.end()) ids.push_back(rid);
  }
  last_rows_.clear();
  last_sample_rows_.clear();
  for (int64_t id : ids) {
    Request& r = *requests_.at(id);
    if (r.finished) continue;
    for (int32_t tid : r.trunks) finish(r, node(tid), Finish::Abort, "aborted: the step failed");
  }
  return ids;
}

void Scheduler::preempt_all() {
  if (!last_rows_.empty()) throw std::logic_error("Scheduler: preempt_all() between schedule() and update()");
  while (!running_.empty()) {
    const int64_t id = running_.back();
    running_.pop_back();
    Request& r = *requests_.at(id);
    preempt(r);
    r.running = false;
    waiting_.push_front(id);
  }
}

std::vector<int64_t> Scheduler::take_finished() {
  std::vector<int64_t> out;
  out.swap(finished_);
  return out;
}

void Scheduler::release(int64_t request_id) {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return;
  if (!it->second->finished) throw std::invalid_argument("Scheduler: release() of an unfinished request");
  std::vector<int32_t> ids{it->second->root};
  for (int32_t tid : it->second->trunks) {
    ids.push_back(tid);
    for (const auto& f : node(tid).forks) ids.insert(ids.end(), f.children.begin(), f.children.end());
  }
  for (int32_t id : ids) nodes_.erase(id);
  requests_.erase(it);
}

// ---------------------------------------------------------------------------------------------
// outputs

void Scheduler::walk(const Node& t, int64_t from, int64_t upto, bool forks_at_upto,
                     std::vector<std::pair<const Node*, int64_t>>& out) const {
  size_t fi = 0;
  for (int64_t i = from; i <= upto; ++i) {
    for (; fi < t.forks.size() && t.forks[fi].offset <= i; ++fi) {
      const Fork& f = t.forks[fi];
      if (f.offset < from || (f.offset == upto && !forks_at_upto)) continue;
      for (int32_t cid : f.children) {
        const Node& c = node(cid);
        for (int64_t j = 0; j < static_cast<int64_t>(c.tokens.size()); ++j) out.emplace_back(&c, j);
      }
    }
    if (i < upto) out.emplace_back(&t, i);
  }
}

SampleOutput Scheduler::output(int64_t request_id, int32_t sample) const {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) throw std::invalid_argument("Scheduler: unknown request id " + std::to_string(request_id));
  const Request& r = *it->second;
  if (sample < 0 || sample >= static_cast<int32_t>(r.trunks.size()))
    throw std::invalid_argument("Scheduler: bad sample index " + std::to_string(sample));
  const Node& t = node(r.trunks[sample]);
  std::vector<std::pair<const Node*, int64_t>> seq;
  walk(t, 1, static_cast<int64_t>(t.tokens.size()), true, seq);  // token 0 is the prompt's last
  SampleOutput o;
  for (const auto& [x, j] : seq) {
    o.token_ids.push_back(x->tokens[j]);
    o.positions.push_back(x->positions[j]);
    o.branch_ids.push_back(x->branch_id);
    o.injected.push_back(x->injected[j]);
    o.logprobs.push_back(x->logprobs[j]);
  }
  o.finish = t.finish;
  o.finish_detail = t.finish_detail;
  o.generated_tokens = t.generated;
  o.forks = static_cast<int64_t>(t.forks.size());
  return o;
}

std::vector<int32_t> Scheduler::visible_tokens(int32_t node_id) const {
  auto it = nodes_.find(node_id);
  if (it == nodes_.end()) throw std::invalid_argument("Scheduler: unknown node " + std::to_string(node_id));
  const Node& n = *it->second;
  const Request& r = *requests_.at(n.request);
  std::vector<int32_t> out(node(r.root).tokens);
  if (n.kind == 0) return out;
  std::vector<std::pair<const Node*, int64_t>> seq;
  if (n.kind == 1) {
    walk(n, 0, static_cast<int64_t>(n.tokens.size()), true, seq);
  } else {
    const Node& t = node(n.parent);
    int64_t offset = 0;
    for (const auto& f : t.forks)
      if (std::find(f.children.begin(), f.children.end(), n.id) != f.children.end()) offset = f.offset;
    walk(t, 0, offset, false, seq);
    for (int64_t j = 0; j < static_cast<int64_t>(n.tokens.size()); ++j) seq.emplace_back(&n, j);
  }
  for (const auto& [x, j] : seq) out.push_back(x->tokens[j]);
  return out;
}

std::vector<int32_t> Scheduler::step_tokens(int32_t node_id) const {
  auto it = nodes_.find(node_id);
  if (it == nodes_.end()) throw std::invalid_argument("Scheduler: unknown node " + std::to_string(node_id));
  std::vector<int32_t> out;
  const Node& n = *it->second;
  if (n.kind != 2) return out;
  for (size_t j = 0; j < n.tokens.size(); ++j)
    if (!n.injected[j]) out.push_back(n.tokens[j]);
  return out;
}

}  // namespace npr
