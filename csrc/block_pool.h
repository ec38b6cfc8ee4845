// npr::BlockPool — the paged KV cache's block allocator: a fixed pool of KV blocks with reference
// counts, and block tables that fork (share every block), append (copy-on-write of a shared partly
// filled last block), and join (stitch children back into the parent, moving references, copying
// nothing). Plain C++ (no torch, no pybind11): the scheduler drives it directly; Python gets it
// through csrc/block_pool_bind.cpp as npr._C.BlockPool.
//
// Semantics (the test tests/test_block_pool.py holds a Python model of exactly these rules):
// - A table is a list of entries {block, fill}, fill = tokens used in that block (1..block_size).
//   Partly filled entries may sit in the middle of a table (after a join).
// - Token i of an entry {b, f} lives at physical slot b * block_size + i (i < f).
// - append(t, n) fills the last entry first when it is partly filled and the table is not sealed
//   (copy-on-write of that block first when it is shared, refcount > 1: the only copy a fork can
//   ever cost), then takes fresh blocks. Any append of n > 0 tokens clears the sealed flag.
// - seal(t): the next append starts a fresh block. Seal before fork so children never copy and the
//   join can stitch without copying.
// - fork(t, n): n children sharing all of t's entries (each block's refcount += n); children
//   inherit the sealed flag. While t has live children it is frozen: append/join-into-others fail.
//   A frozen table may be forked again (more children) and sealed.
// - join(parent, children): `children` must list every live child of parent exactly once (free the
//   ones you drop first). Each child's table must start with exactly the parent's entries (same
//   blocks and fills) and the child must have no live children of its own. The parent becomes its
//   entries + each child's entries beyond the prefix, in the given order; the children are
//   released. Afterwards the parent is sealed iff its last entry is partly filled and that block is
//   still shared (refcount > 1, only possible when a child added nothing and the parent's last
//   block is shared with an ancestor): otherwise the next append fills the last block in place
//   (no copy, least memory). The parent is unfrozen.
// - free(t): error when t has live children (use free_tree to release a whole subtree).
// - Allocation order is deterministic: the free list is a stack (LIFO); initially block 0 is
//   taken first. Blocks are pushed when their refcount reaches 0, in the order of the entries
//   released (a table's entries front to back; join: children in order).
// - Errors: OutOfBlocks when a request needs more free blocks than there are — thrown before
//   anything changes (strong guarantee). std::invalid_argument for unknown table ids and bad
//   arguments. Not thread-safe: one owner (the scheduler) drives it.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace npr {

// The pool has fewer free blocks than the operation needs; the pool is unchanged.
class OutOfBlocks : public std::runtime_error {
 public:
  OutOfBlocks(const std::string& what, int64_t needed, int64_t available)
      : std::runtime_error(what), needed(needed), available(available) {}
  int64_t needed;
  int64_t available;
};

struct BlockEntry {
  int32_t block;  // physical block id in [0, num_blocks)
  int32_t fill;   // tokens used in this block, 1..block_size
  bool operator==(const BlockEntry& o) const { return block == o.block && fill == o.fill; }
};

struct AppendResult {
  std::vector<int64_t> slots;                          // physical slot of each new token, in order
  // (src_block, dst_block) copy-on-write copies: apply to the KV cache BEFORE writing the slots
  std::vector<std::pair<int32_t, int32_t>> copies;
};

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks, int32_t block_size = 16);

  int64_t create();                                    // a new empty table
  AppendResult append(int64_t table, int64_t n);       // n >= 0 new tokens
  void seal(int64_t table);
  std::vector<int64_t> fork(int64_t table, int32_t n); // n >= 1 children
  void join(int64_t parent, const std::vector<int64_t>& children);
  void free(int64_t table);                            // error if it has live children
  void free_tree(int64_t table);                       // frees its live descendants, then it

  const std::vector<BlockEntry>& entries(int64_t table) const;
  std::vector<int64_t> slots(int64_t table) const;     // physical slot of every token, table order
  int64_t num_tokens(int64_t table) const;
  int64_t blocks_needed(int64_t table, int64_t n) const;  // free blocks append(table, n) takes
  bool sealed(int64_t table) const;
  bool frozen(int64_t table) const;                    // has live children
  int64_t parent(int64_t table) const;                 // -1 for a root or a parent already freed
  std::vector<int64_t> children(int64_t table) const;  // live children, in fork order
  bool has_table(int64_t table) const;

  int32_t num_free() const { return static_cast<int32_t>(free_list_.size()); }
  int32_t num_used() const { return num_blocks_ - num_free(); }
  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  int32_t refcount(int32_t block) const;
  int64_t num_tables() const { return static_cast<int64_t>(tables_.size()); }
  std::vector<int64_t> table_ids() const;              // live tables, ascending

  // Throws std::logic_error naming the first violated invariant: free + used == total; each
  // block's refcount == number of table entries holding it; the free list has no duplicates and
  // only refcount-0 blocks; fills in 1..block_size; cached token counts; parent/child links.
  void check_invariants() const;

 private:
  struct Table {
    std::vector<BlockEntry> entries;
    int64_t num_tokens = 0;
    bool sealed = false;
    int64_t parent = -1;
    std::vector<int64_t> children;  // live children, fork order
  };

  Table& get(int64_t table, const char* op);
  const Table& get(int64_t table, const char* op) const;
  int32_t alloc();              // caller checked num_free() first
  void decref(int32_t block);
  void release(int64_t id);     // drop a table: decref its entries, unlink from its parent

  int32_t num_blocks_;
  int32_t block_size_;
  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_list_;  // stack: back() is allocated next
  std::unordered_map<int64_t, Table> tables_;
  int64_t next_id_ = 0;
};

}  // namespace npr
