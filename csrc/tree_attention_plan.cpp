// The tree-attention planner (npr.ops.attention.plan) in C++: one batch step's tree -> work items,
// partial lists and merge lists, as one int32 buffer. The numpy version
// (npr.ops.attention.plan_reference) states the same rules step by step and is the tests' oracle;
// this one runs on every engine step (a Python loop over rows and segments cost milliseconds at
// 64+ rows). Bad trees raise ValueError (std::invalid_argument) with the reference's messages.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "tree_attention_plan.h"

namespace npr {
namespace {

[[noreturn]] void bad(const std::string& msg) {
  throw std::invalid_argument("tree_attention plan: " + msg);
}

I64 vec(const at::Tensor& t, const char* name) {
  if (t.dim() != 1) {
    std::ostringstream o;
    o << name << " must be 1-D, got shape " << t.sizes();
    bad(o.str());
  }
  at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return I64(p, p + c.numel());
}

void check_indptr(const I64& a, const char* name, int64_t n = -1) {
  bool ok = !a.empty() && a[0] == 0;
  for (size_t i = 1; ok && i < a.size(); ++i) ok = a[i] >= a[i - 1];
  if (!ok) bad(std::string(name) + " must start at 0 and be non-decreasing");
  if (n >= 0 && a.back() != n)
    bad(std::string(name) + "[-1]=" + std::to_string(a.back()) +
        " but the array it indexes has " + std::to_string(n) + " elements");
}

std::string list_str(const I64& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

struct Item {
  int64_t cost, e0, e1;
  I64 q, nvis;
};

}  // namespace

TreeAttentionPlanData plan_tree_attention(const I64& qi, const I64& si, const I64& sb,
                                          const I64& sf, const I64& ri, const I64& rs,
                                          int64_t block_size, int64_t num_blocks,
                                          int64_t kv_chunk, int64_t max_item_queries) {
  if (block_size < 1 || kv_chunk < 1 || max_item_queries < 1)
    bad("block_size, kv_chunk and max_item_queries must be >= 1, got " +
        std::to_string(block_size) + ", " + std::to_string(kv_chunk) + ", " +
        std::to_string(max_item_queries));
  check_indptr(qi, "q_indptr");
  check_indptr(si, "seg_indptr", static_cast<int64_t>(sb.size()));
  check_indptr(ri, "row_seg_indptr", static_cast<int64_t>(rs.size()));
  if (sf.size() != sb.size())
    bad("seg_fills has " + std::to_string(sf.size()) + " entries, seg_blocks " +
        std::to_string(sb.size()));
  const int64_t R = static_cast<int64_t>(qi.size()) - 1, S = static_cast<int64_t>(si.size()) - 1,
                E = static_cast<int64_t>(sb.size()), T = qi[R];
  if (static_cast<int64_t>(ri.size()) != R + 1)
    bad("row_seg_indptr has " + std::to_string(ri.size()) + " elements, expected R+1=" +
        std::to_string(R + 1) + " (q_indptr has R+1)");
  for (int64_t e = 0; e < E; ++e)
    if (sf[e] < 1 || sf[e] > block_size)
      bad("seg_fills[" + std::to_string(e) + "]=" + std::to_string(sf[e]) +
          " outside 1..block_size=" + std::to_string(block_size));
  for (int64_t e = 0; e < E; ++e)
    if (sb[e] < 0 || (num_blocks >= 0 && sb[e] >= num_blocks))
      bad("seg_blocks[" + std::to_string(e) + "]=" + std::to_string(sb[e]) +
          " is not a block id in [0, " + (num_blocks >= 0 ? std::to_string(num_blocks) : "None") +
          ")");
  for (int64_t s : rs)
    if (s < 0 || s >= S) bad("row_segs holds a segment id outside [0, " + std::to_string(S) + ")");

  I64 cum(E + 1, 0);  // token offset of each entry, global
  for (int64_t e = 0; e < E; ++e) cum[e + 1] = cum[e] + sf[e];
  I64 seg_ntok(S);
  for (int64_t s = 0; s < S; ++s) seg_ntok[s] = cum[si[s + 1]] - cum[si[s]];
  I64 qlen(R), row_len(R, 0);
  for (int64_t r = 0; r < R; ++r) qlen[r] = qi[r + 1] - qi[r];

  // listing: segment s -> [(row, key offset of s in that row)], rows in order
  std::vector<std::vector<std::pair<int64_t, int64_t>>> listing(S);
  I64 stamp(S, -1);
  for (int64_t r = 0; r < R; ++r) {
    int64_t off = 0;
    for (int64_t j = ri[r]; j < ri[r + 1]; ++j) {
      const int64_t s = rs[j];
      if (stamp[s] == r)
        bad("row " + std::to_string(r) + " lists a segment twice: " +
            list_str(I64(rs.begin() + ri[r], rs.begin() + ri[r + 1])));
      stamp[s] = r;
      listing[s].emplace_back(r, off);
      off += seg_ntok[s];
    }
    row_len[r] = off;
    if (qlen[r] > row_len[r])
      bad("row " + std::to_string(r) + " has " + std::to_string(qlen[r]) +
          " queries but only " + std::to_string(row_len[r]) +
          " key tokens (its queries are its last positions)");
  }
  for (int64_t s = 0; s < S; ++s) {
    if (listing[s].size() <= 1) continue;
    for (auto [r, o] : listing[s]) {
      if (o + seg_ntok[s] > row_len[r] - qlen[r]) {
        I64 rows;
        for (auto [x, _] : listing[s]) rows.push_back(x);
        bad("segment " + std::to_string(s) + " is shared by rows " + list_str(rows) +
            " but reaches into row " + std::to_string(r) + "'s query positions (segment ends at key " +
            std::to_string(o + seg_ntok[s]) + ", row " + std::to_string(r) +
            "'s queries start at " + std::to_string(row_len[r] - qlen[r]) +
            "); a shared segment must lie before every sharing row's queries");
      }
    }
  }

  std::vector<Item> items;
  I64 tok_in_seg, chunk_starts, chunk_ends, qs, rel;
  for (int64_t s = 0, s_end; s < S; s = s_end + 1) {
    // A run of consecutive segments that one row alone reads, one after the other in its
    // path (a plain row's prompt and trunk), is one segment to the items: half the tasks.
    s_end = s;
    while (listing[s_end].size() == 1 && s_end + 1 < S && listing[s_end + 1].size() == 1 &&
           listing[s_end + 1][0].first == listing[s][0].first &&
           listing[s_end + 1][0].second == listing[s_end][0].second + seg_ntok[s_end])
      ++s_end;
    const int64_t e_lo = si[s], e_hi = si[s_end + 1];
    qs.clear();
    rel.clear();
    // queries of the rows listing s: each one's key position minus s's offset in its row
    for (auto [r, o] : listing[s])
      for (int64_t i = 0; i < qlen[r]; ++i) {
        qs.push_back(qi[r] + i);
        rel.push_back(row_len[r] - qlen[r] - o + i);
      }
    if (e_lo == e_hi || qs.empty()) continue;
    tok_in_seg.assign(e_hi - e_lo + 1, 0);  // entry start offsets within s, + end
    for (int64_t e = e_lo; e <= e_hi; ++e) tok_in_seg[e - e_lo] = cum[e] - cum[e_lo];
    // chunk c = the entries whose start lies in [c * kv_chunk, (c + 1) * kv_chunk)
    chunk_starts.assign(1, 0);
    chunk_ends.clear();
    for (int64_t j = 1; j < e_hi - e_lo; ++j)
      if (tok_in_seg[j] / kv_chunk != tok_in_seg[j - 1] / kv_chunk) {
        chunk_ends.push_back(j);
        chunk_starts.push_back(j);
      }
    chunk_ends.push_back(e_hi - e_lo);
    const int64_t nq = static_cast<int64_t>(qs.size());
    for (int64_t g0 = 0; g0 < nq; g0 += max_item_queries) {
      const int64_t g1 = std::min(nq, g0 + max_item_queries);
      for (size_t c = 0; c < chunk_starts.size(); ++c) {
        const int64_t c0 = chunk_starts[c], c1 = chunk_ends[c];
        const int64_t t0 = tok_in_seg[c0], t1 = tok_in_seg[c1];
        Item it{0, 0, 0, {}, {}};
        int64_t nmax = 0;
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t nv = std::clamp<int64_t>(rel[g] - t0 + 1, 0, t1 - t0);
          if (nv > 0) {
            it.q.push_back(qs[g]);
            it.nvis.push_back(nv);
            nmax = std::max(nmax, nv);
          }
        }
        if (it.q.empty()) continue;
        // drop trailing entries no query of this item sees (causal prefill chunks)
        int64_t k = c0;
        while (k <= c1 && tok_in_seg[k] - t0 < nmax) ++k;
        it.cost = nmax * static_cast<int64_t>(it.q.size());
        it.e0 = e_lo + c0;
        it.e1 = e_lo + k;
        items.push_back(std::move(it));
      }
    }
  }
  // most expensive first: the CPU kernel hands items out dynamically (longest-first balance)
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });

  const int64_t W = static_cast<int64_t>(items.size());
  int64_t P = 0, max_parts = 0, kv_read = 0;
  for (const Item& it : items) {
    P += static_cast<int64_t>(it.q.size());
    max_parts = std::max<int64_t>(max_parts, static_cast<int64_t>(it.q.size()));
    kv_read += cum[it.e1] - cum[it.e0];
  }
  const I64 sizes = {R + 1, S + 1, E, E, R + 1, static_cast<int64_t>(rs.size()), 2 * W, W + 1,
                     P, P, T + 1, P};
  at::Tensor buf = at::empty({std::accumulate(sizes.begin(), sizes.end(), int64_t(0))},
                             at::TensorOptions().dtype(at::kInt));
  int32_t* out = buf.mutable_data_ptr<int32_t>();
  auto put = [&](const I64& v) {
    for (int64_t x : v) *out++ = static_cast<int32_t>(x);
  };
  put(qi), put(si), put(sb), put(sf), put(ri), put(rs);
  for (const Item& it : items) *out++ = static_cast<int32_t>(it.e0), *out++ = static_cast<int32_t>(it.e1);
  *out++ = 0;  // item_part_indptr
  for (const Item& it : items) *out = out[-1] + static_cast<int32_t>(it.q.size()), ++out;
  int32_t* part_q = out;
  for (const Item& it : items) put(it.q);
  for (const Item& it : items) put(it.nvis);
  // merge lists: the partials of each query, in partial order (a stable argsort of part_q)
  I64 counts(T + 1, 0);
  for (int64_t p = 0; p < P; ++p) ++counts[part_q[p] + 1];
  for (int64_t t = 0; t < T; ++t)
    if (counts[t + 1] < 1)  // cannot happen for a valid tree (query i sees key L - qlen + i)
      throw std::logic_error("tree_attention plan: query " + std::to_string(t) + " got no work");
  for (int64_t t = 0; t < T; ++t) counts[t + 1] += counts[t];
  put(counts);
  int32_t* q_parts = out;
  for (int64_t p = 0; p < P; ++p) q_parts[counts[part_q[p]]++] = static_cast<int32_t>(p);
  return {buf, sizes, max_parts, row_len, kv_read};
}

namespace {

std::tuple<at::Tensor, I64, int64_t, I64, int64_t> plan_from_tensors(
    const at::Tensor& q_indptr, const at::Tensor& seg_indptr, const at::Tensor& seg_blocks,
    const at::Tensor& seg_fills, const at::Tensor& row_seg_indptr, const at::Tensor& row_segs,
    int64_t block_size, int64_t num_blocks, int64_t kv_chunk, int64_t max_item_queries) {
  TreeAttentionPlanData d = plan_tree_attention(
      vec(q_indptr, "q_indptr"), vec(seg_indptr, "seg_indptr"), vec(seg_blocks, "seg_blocks"),
      vec(seg_fills, "seg_fills"), vec(row_seg_indptr, "row_seg_indptr"),
      vec(row_segs, "row_segs"), block_size, num_blocks, kv_chunk, max_item_queries);
  return {d.buffer, d.sizes, d.max_item_parts, d.row_lens, d.kv_tokens_read};
}

}  // namespace

void bind_tree_attention_plan(pybind11::module_& m) {
  m.def("plan_tree_attention", &plan_from_tensors, pybind11::arg("q_indptr"),
        pybind11::arg("seg_indptr"), pybind11::arg("seg_blocks"), pybind11::arg("seg_fills"),
        pybind11::arg("row_seg_indptr"), pybind11::arg("row_segs"), pybind11::arg("block_size"),
        pybind11::arg("num_blocks"), pybind11::arg("kv_chunk"), pybind11::arg("max_item_queries"),
        "npr.ops.attention.plan's work: (int32 buffer, sizes of its 12 parts, max_item_parts, "
        "row_lens, kv_tokens_read). num_blocks < 0: not checked.");
}

}  // namespace npr
