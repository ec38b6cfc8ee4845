// Pieces shared by the CPU kernels of npr::tree_attention (tree_attention.cpp: the row kernel,
// any shape, and the wide kernel built for AVX2; tree_attention_avx512.cpp: the wide kernel
// built for AVX-512): the kernel arguments, the walk over an item's keys in tiles, the fp32
// widening of a row, and the wide kernel's per-thread buffers.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"
#include "tree_attention_check.h"

namespace npr {

constexpr float TA_NEG_INF = -std::numeric_limits<float>::infinity();

// Everything one task (work item, kv head) reads and writes.
template <typename T>
using TreeAttentionCtx = TreeAttentionArgs<T, int64_t>;

// dst[0..D) = fp32(src[0..D)) * mul
template <typename T>
inline void to_f32(const T* src, float* dst, int64_t D, float mul) {
  const __m256 vm = _mm256_set1_ps(mul);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 x;
    if constexpr (std::is_same_v<T, float>) {
      x = _mm256_loadu_ps(src + d);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      x = load_bf16x8(reinterpret_cast<const uint16_t*>(src + d));
    } else {
      x = load_fp16x8(reinterpret_cast<const uint16_t*>(src + d));
    }
    _mm256_storeu_ps(dst + d, _mm256_mul_ps(x, vm));
  }
  for (; d < D; ++d) dst[d] = static_cast<float>(src[d]) * mul;
}

// The first `total` keys of item w for kv head kvh, in tiles of up to KT rows. Rows of one cache
// block are contiguous but consecutive blocks of a head are far apart, so tiles are gathered one
// ahead and tile i+1's rows are prefetched into L2 (measured best of T0 / T1 / NTA here) while
// tile i is computed: the kernel calls prefetch_share(calls) at `calls` points of each tile's
// compute, and each call issues its share of the next tile's lines. Issued as one burst per
// tile instead (128 lines for 8 keys of D = 128 fp32), the prefetches bought little overlap: the
// row kernel took longer than its compute plus a bare walk of the same lines, one after the
// other (17-18 vs 5.5 + 7.6 ms, 8 flat rows of 8K tokens); spread, it takes 11 ms (one 8K- or
// 32K-token row: 1.45-1.6x faster; the wide kernel's memory-heavy cascades 1.15-1.4x).
template <typename T, int KT>
class KeyTiles {
 public:
  KeyTiles(const TreeAttentionCtx<T>& c, int64_t w, int64_t kvh, int total)
      : c_(c), kvh_(kvh), e_(c.item_ents[2 * w]), total_(total),
        row_bytes_(c.D * static_cast<int64_t>(sizeof(T))) {
    next_n_ = gather(kn_, vn_);
  }
  // Moves to the next tile; returns its size (0 at the end). k()[j], v()[j]: its rows.
  int advance() {
    std::swap(k_, kn_);
    std::swap(v_, vn_);
    n_ = next_n_;
    next_n_ = gather(kn_, vn_);
    pf_row_ = 0;
    pf_byte_ = 0;
    return n_;
  }
  // Issues about 1/calls of the next tile's prefetches; call it `calls` times per tile (lines
  // left when the tile ends are not prefetched: those rows will be demand-loaded).
  void prefetch_share(int calls) {
    calls = std::max(calls, 1);
    const int64_t lines = 2 * next_n_ * ((row_bytes_ + 63) / 64);
    prefetch_lines(static_cast<int>((lines + calls - 1) / calls));
  }
  const T* const* k() const { return k_; }
  const T* const* v() const { return v_; }

 private:
  int gather(const T** kr, const T** vr) {  // walks the entries (ragged fills)
    int nt = 0;
    while (nt < KT && gathered_ + nt < total_) {
      const int64_t blk = c_.seg_blocks[e_];
      const int fill = c_.seg_fills[e_];
      const int take = std::min({fill - off_, KT - nt, total_ - gathered_ - nt});
      const T* kb = c_.k + blk * c_.k_sb + kvh_ * c_.k_sh + off_ * c_.k_ss;
      const T* vb = c_.v + blk * c_.v_sb + kvh_ * c_.v_sh + off_ * c_.v_ss;
      for (int j = 0; j < take; ++j) {
        kr[nt + j] = kb + j * c_.k_ss;
        vr[nt + j] = vb + j * c_.v_ss;
      }
      nt += take;
      off_ += take;
      if (off_ == fill) {
        ++e_;
        off_ = 0;
      }
    }
    gathered_ += nt;
    return nt;
  }

  // Prefetches up to `lines` cache lines (K and V in turn) of the next tile from the cursor on.
  void prefetch_lines(int lines) {
    for (; lines > 0 && pf_row_ < next_n_; lines -= 2) {
      const char* k = reinterpret_cast<const char*>(kn_[pf_row_]);
      const char* v = reinterpret_cast<const char*>(vn_[pf_row_]);
      _mm_prefetch(k + pf_byte_, _MM_HINT_T1);
      _mm_prefetch(v + pf_byte_, _MM_HINT_T1);
      if ((pf_byte_ += 64) >= row_bytes_) {
        // a row that does not start on a line boundary ends in one more line (bf16 D = 20...)
        if (misaligned(k)) _mm_prefetch(k + row_bytes_ - 1, _MM_HINT_T1);
        if (misaligned(v)) _mm_prefetch(v + row_bytes_ - 1, _MM_HINT_T1);
        pf_byte_ = 0;
        ++pf_row_;
      }
    }
  }
  // Whether the row at p spans more lines than ceil(row_bytes / 64) from its start covers.
  bool misaligned(const char* p) const {
    const int64_t off = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 63);
    return off + row_bytes_ > (row_bytes_ + 63) / 64 * 64;
  }

  const TreeAttentionCtx<T>& c_;
  int64_t kvh_, e_;
  int off_ = 0, gathered_ = 0, total_, n_ = 0, next_n_ = 0;
  int64_t row_bytes_, pf_byte_ = 0;
  int pf_row_ = 0;
  const T* bufs_[4][KT];
  const T** k_ = bufs_[0];
  const T** v_ = bufs_[1];
  const T** kn_ = bufs_[2];
  const T** vn_ = bufs_[3];
};

// Buffers of the wide kernel (tree_attention_wide.h), one per worker thread. Defined here, outside the
// AVX-512 file's target pragma: its inline special members are shared by both builds.
struct WideScratch {
  std::vector<float> Qt, Ot, St, mrow, lrow, alpha, zero, kbuf, vbuf, qrow;
  std::vector<int32_t> nv;
};

// Tasks run by each CPU kernel since the last reset: {row, AVX2 wide, AVX-512 wide}. Lets tests
// check which kernel a shape reaches (tree_attention.cpp; npr._C.tree_attention_task_counts).
std::array<int64_t, 3> tree_attention_task_counts(bool reset);

// The wide kernel built for AVX-512 (tree_attention_avx512.cpp); call only when use_avx512()
// (cpu_isa.h).
template <typename T>
void tree_attention_task_avx512(const TreeAttentionCtx<T>& c, int64_t w, int64_t kvh,
                                WideScratch& s);

}  // namespace npr
