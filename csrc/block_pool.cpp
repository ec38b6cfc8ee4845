// npr::BlockPool implementation; the semantics are documented in block_pool.h.
#include "block_pool.h"

#include <algorithm>
#include <sstream>

namespace npr {

namespace {

std::string table_str(int64_t id) { return "table " + std::to_string(id); }

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("BlockPool." + msg); }

}  // namespace

BlockPool::BlockPool(int32_t num_blocks, int32_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks < 0) bad("BlockPool: num_blocks must be >= 0, got " + std::to_string(num_blocks));
  if (block_size < 1)
    bad("BlockPool: block_size must be >= 1, got " + std::to_string(block_size));
  // Slots are block * block_size + offset in int64; keep block ids within int32.
  refcount_.assign(static_cast<size_t>(num_blocks), 0);
  free_list_.reserve(static_cast<size_t>(num_blocks));
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_list_.push_back(b);  // block 0 on top
}

BlockPool::Table& BlockPool::get(int64_t table, const char* op) {
  auto it = tables_.find(table);
  if (it == tables_.end()) bad(std::string(op) + ": unknown " + table_str(table));
  return it->second;
}

const BlockPool::Table& BlockPool::get(int64_t table, const char* op) const {
  auto it = tables_.find(table);
  if (it == tables_.end()) bad(std::string(op) + ": unknown " + table_str(table));
  return it->second;
}

int32_t BlockPool::alloc() {
  const int32_t b = free_list_.back();
  free_list_.pop_back();
  refcount_[b] = 1;
  return b;
}

void BlockPool::decref(int32_t block) {
  if (--refcount_[block] == 0) free_list_.push_back(block);
}

int64_t BlockPool::create() {
  const int64_t id = next_id_++;
  tables_.emplace(id, Table{});
  return id;
}

int64_t BlockPool::blocks_needed(int64_t table, int64_t n) const {
  const Table& t = get(table, "blocks_needed");
  if (n < 0) bad("blocks_needed: n must be >= 0, got " + std::to_string(n));
  if (n == 0) return 0;
  int64_t rest = n, need = 0;
  if (!t.sealed && !t.entries.empty() && t.entries.back().fill < block_size_) {
    const BlockEntry& last = t.entries.back();
    if (refcount_[last.block] > 1) need += 1;  // copy-on-write of the shared last block
    rest -= std::min<int64_t>(rest, block_size_ - last.fill);
  }
  return need + (rest + block_size_ - 1) / block_size_;
}

AppendResult BlockPool::append(int64_t table, int64_t n) {
  Table& t = get(table, "append");
  if (n < 0) bad("append: n must be >= 0, got " + std::to_string(n));
  if (!t.children.empty())
    bad("append: " + table_str(table) + " is frozen: it has " + std::to_string(t.children.size()) +
        " live children (join or free them first)");
  AppendResult res;
  if (n == 0) return res;
  const int64_t need = blocks_needed(table, n);
  if (need > num_free()) {
    throw OutOfBlocks("BlockPool.append: out of KV blocks: " + table_str(table) + " needs " +
                          std::to_string(need) + " blocks for " + std::to_string(n) +
                          " tokens, " + std::to_string(num_free()) + " free of " +
                          std::to_string(num_blocks_),
                      need, num_free());
  }
  // From here on nothing can fail except std::bad_alloc of the small result vectors.
  res.slots.reserve(static_cast<size_t>(n));
  int64_t rest = n;
  if (!t.sealed && !t.entries.empty() && t.entries.back().fill < block_size_) {
    BlockEntry& last = t.entries.back();
    if (refcount_[last.block] > 1) {
      const int32_t fresh = alloc();
      res.copies.emplace_back(last.block, fresh);
      decref(last.block);  // still >= 1: someone else holds it
      last.block = fresh;
    }
    const int32_t take = static_cast<int32_t>(std::min<int64_t>(rest, block_size_ - last.fill));
    const int64_t base = static_cast<int64_t>(last.block) * block_size_;
    for (int32_t i = 0; i < take; ++i) res.slots.push_back(base + last.fill + i);
    last.fill += take;
    rest -= take;
  }
  while (rest > 0) {
    const int32_t b = alloc();
    const int32_t take = static_cast<int32_t>(std::min<int64_t>(rest, block_size_));
    const int64_t base = static_cast<int64_t>(b) * block_size_;
    for (int32_t i = 0; i < take; ++i) res.slots.push_back(base + i);
    t.entries.push_back(BlockEntry{b, take});
    rest -= take;
  }
  t.num_tokens += n;
  t.sealed = false;
  return res;
}

void BlockPool::seal(int64_t table) { get(table, "seal").sealed = true; }

std::vector<int64_t> BlockPool::fork(int64_t table, int32_t n) {
  get(table, "fork");
  if (n < 1) bad("fork: n must be >= 1, got " + std::to_string(n));
  std::vector<int64_t> ids;
  ids.reserve(static_cast<size_t>(n));
  for (int32_t k = 0; k < n; ++k) {
    const int64_t id = next_id_++;
    Table child;
    const Table& t = tables_.at(table);  // re-find: emplace may rehash
    child.entries = t.entries;
    child.num_tokens = t.num_tokens;
    child.sealed = t.sealed;
    child.parent = table;
    for (const BlockEntry& e : child.entries) ++refcount_[e.block];
    tables_.emplace(id, std::move(child));
    tables_.at(table).children.push_back(id);
    ids.push_back(id);
  }
  return ids;
}

void BlockPool::join(int64_t parent, const std::vector<int64_t>& children) {
  Table& p = get(parent, "join");
  if (children.empty()) bad("join: needs at least one child of " + table_str(parent));
  // Validate everything before changing anything.
  if (children.size() != p.children.size()) {
    bad("join: " + table_str(parent) + " has " + std::to_string(p.children.size()) +
        " live children but " + std::to_string(children.size()) +
        " were given: join must list every live child once (free the dropped ones first)");
  }
  for (size_t i = 0; i < children.size(); ++i) {
    const int64_t c = children[i];
    for (size_t j = 0; j < i; ++j)
      if (children[j] == c) bad("join: " + table_str(c) + " is listed twice");
    const Table& ct = get(c, "join");
    if (ct.parent != parent)
      bad("join: " + table_str(c) + " is not a child of " + table_str(parent));
    if (!ct.children.empty())
      bad("join: child " + table_str(c) + " has live children of its own (join them first)");
    bool prefix_ok = ct.entries.size() >= p.entries.size();
    for (size_t k = 0; prefix_ok && k < p.entries.size(); ++k)
      prefix_ok = ct.entries[k] == p.entries[k];
    if (!prefix_ok) {
      bad("join: child " + table_str(c) + " does not start with exactly the parent's entries " +
          "(its shared last block was copied on write: seal the parent before fork)");
    }
  }
  const size_t np = p.entries.size();
  for (int64_t c : children) {
    Table& ct = tables_.at(c);
    for (size_t k = np; k < ct.entries.size(); ++k) p.entries.push_back(ct.entries[k]);
    p.num_tokens += ct.num_tokens;
    for (size_t k = 0; k < np; ++k) {
      p.num_tokens -= ct.entries[k].fill;
      decref(ct.entries[k].block);  // the child's reference to the shared prefix
    }
    tables_.erase(c);
  }
  p.children.clear();
  p.sealed = !p.entries.empty() && p.entries.back().fill < block_size_ &&
             refcount_[p.entries.back().block] > 1;
}

void BlockPool::release(int64_t id) {
  Table& t = tables_.at(id);
  for (const BlockEntry& e : t.entries) decref(e.block);
  if (t.parent >= 0) {
    auto it = tables_.find(t.parent);
    if (it != tables_.end()) {
      auto& ch = it->second.children;
      ch.erase(std::find(ch.begin(), ch.end(), id));
    }
  }
  tables_.erase(id);
}

void BlockPool::free(int64_t table) {
  const Table& t = get(table, "free");
  if (!t.children.empty())
    bad("free: " + table_str(table) + " has " + std::to_string(t.children.size()) +
        " live children (free or join them first, or use free_tree)");
  release(table);
}

void BlockPool::free_tree(int64_t table) {
  get(table, "free_tree");
  // Post-order without recursion: children are freed before their parent.
  std::vector<int64_t> stack{table};
  while (!stack.empty()) {
    const int64_t id = stack.back();
    const Table& t = tables_.at(id);
    if (t.children.empty()) {
      release(id);
      stack.pop_back();
    } else {
      stack.push_back(t.children.front());
    }
  }
}

const std::vector<BlockEntry>& BlockPool::entries(int64_t table) const {
  return get(table, "entries").entries;
}

std::vector<int64_t> BlockPool::slots(int64_t table) const {
  const Table& t = get(table, "slots");
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(t.num_tokens));
  for (const BlockEntry& e : t.entries)
    for (int32_t i = 0; i < e.fill; ++i)
      out.push_back(static_cast<int64_t>(e.block) * block_size_ + i);
  return out;
}

int64_t BlockPool::num_tokens(int64_t table) const { return get(table, "num_tokens").num_tokens; }
bool BlockPool::sealed(int64_t table) const { return get(table, "sealed").sealed; }
bool BlockPool::frozen(int64_t table) const { return !get(table, "frozen").children.empty(); }
bool BlockPool::has_table(int64_t table) const { return tables_.count(table) != 0; }

int64_t BlockPool::parent(int64_t table) const {
  const int64_t p = get(table, "parent").parent;
  return tables_.count(p) ? p : -1;
}

std::vector<int64_t> BlockPool::children(int64_t table) const {
  return get(table, "children").children;
}

int32_t BlockPool::refcount(int32_t block) const {
  if (block < 0 || block >= num_blocks_)
    bad("refcount: block " + std::to_string(block) + " out of range [0, " +
        std::to_string(num_blocks_) + ")");
  return refcount_[block];
}

std::vector<int64_t> BlockPool::table_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(tables_.size());
  for (const auto& kv : tables_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

void BlockPool::check_invariants() const {
  auto fail = [](const std::string& m) { throw std::logic_error("BlockPool invariant: " + m); };
  std::vector<int32_t> held(static_cast<size_t>(num_blocks_), 0);
  for (const auto& [id, t] : tables_) {
    int64_t tokens = 0;
    for (const BlockEntry& e : t.entries) {
      if (e.block < 0 || e.block >= num_blocks_)
        fail(table_str(id) + " holds block " + std::to_string(e.block) + " out of range");
      if (e.fill < 1 || e.fill > block_size_)
        fail(table_str(id) + " has fill " + std::to_string(e.fill) + " in block " +
             std::to_string(e.block));
      ++held[e.block];
      tokens += e.fill;
    }
    if (tokens != t.num_tokens)
      fail(table_str(id) + " caches num_tokens " + std::to_string(t.num_tokens) + " but holds " +
           std::to_string(tokens));
    if (t.parent >= 0) {
      auto it = tables_.find(t.parent);
      if (it != tables_.end()) {
        const auto& ch = it->second.children;
        if (std::count(ch.begin(), ch.end(), id) != 1)
          fail(table_str(id) + " is not listed once among its parent's children");
      }
    }
    for (int64_t c : t.children) {
      auto it = tables_.find(c);
      if (it == tables_.end() || it->second.parent != id)
        fail(table_str(id) + " lists child " + std::to_string(c) + " that is not its live child");
    }
  }
  std::vector<char> on_free(static_cast<size_t>(num_blocks_), 0);
  for (int32_t b : free_list_) {
    if (b < 0 || b >= num_blocks_) fail("free list holds out-of-range block " + std::to_string(b));
    if (on_free[b]) fail("free list holds block " + std::to_string(b) + " twice");
    on_free[b] = 1;
    if (refcount_[b] != 0)
      fail("free block " + std::to_string(b) + " has refcount " + std::to_string(refcount_[b]));
  }
  int32_t used = 0;
  for (int32_t b = 0; b < num_blocks_; ++b) {
    if (refcount_[b] != held[b])
      fail("block " + std::to_string(b) + " has refcount " + std::to_string(refcount_[b]) +
           " but " + std::to_string(held[b]) + " table entries hold it");
    if (refcount_[b] > 0) ++used;
    if (refcount_[b] == 0 && !on_free[b])
      fail("block " + std::to_string(b) + " has refcount 0 but is not on the free list");
  }
  if (used + num_free() != num_blocks_)
    fail("free " + std::to_string(num_free()) + " + used " + std::to_string(used) +
         " != total " + std::to_string(num_blocks_));
}

}  // namespace npr
