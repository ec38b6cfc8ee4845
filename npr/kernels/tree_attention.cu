// npr::tree_attention on CUDA: branch-tree (cascade) attention over a paged KV cache, decode and
// extend; fp32 / bf16 / fp16 storage, fp32 compute. Same plan as the CPU kernel
// (npr/ops/attention.py): a CUDA block per (work item, kv head, tile of MT query heads) walks the
// item's cache entries in tiles of 32 keys (K, V staged in shared memory as fp32), online softmax,
// writes a partial output + log-sum-exp per (query, head); a merge kernel combines each query's
// partials by log-sum-exp. A shared segment's keys are loaded once per block for all the rows x G
// query heads of the group (up to MT = 64).
//
// Layout inside a block (WARPS = 8): warp w owns query-head rows w*ROWS .. w*ROWS+ROWS-1.
// Scores: lane j = key j of the tile. Output: lane owns columns d = lane + 32 c, c < NPL.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "dtype_convert.cuh"
#include "tree_attention_check.h"

namespace npr {
namespace {

constexpr int KT = 32;      // keys per tile (one per lane in the score phase)
constexpr int WARPS = 8;
constexpr unsigned FULL = 0xffffffffu;

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
  return x;
}

template <typename T>
using PartialParams = TreeAttentionArgs<T, int>;

// Locates tile key x (0-based from the cursor) among the cursor's next 32 entries, whose
// inclusive prefix sums of available tokens are `cum` (one per lane): entry index (0..32) and
// token offset inside that entry. Warp-collective.
__device__ __forceinline__ void locate(int cum, int x, int off_cur, int& ent, int& off) {
  int cnt = 0;
  for (int i = 0; i < 32; ++i) cnt += __shfl_sync(FULL, cum, i) <= x;
  const int before = __shfl_sync(FULL, cum, cnt > 0 ? cnt - 1 : 0);
  ent = cnt;
  off = cnt == 0 ? x + off_cur : x - before;
}

template <typename T, int ROWS, int NPL>
__global__ void __launch_bounds__(WARPS * 32)
    tree_attention_partial_kernel(const PartialParams<T> p) {
  constexpr int MT = WARPS * ROWS;
  extern __shared__ float smem[];
  __shared__ int s_blk[KT];
  __shared__ int s_off[KT];
  __shared__ int s_nt;
  __shared__ int s_maxnv;
  const int D = p.D, DP = D + 1;  // K rows padded: lanes reading K[j][d] hit distinct banks
  float* Qs = smem;               // [MT][D], pre-scaled
  float* Ks = Qs + MT * D;        // [KT][D + 1]
  float* Vs = Ks + KT * DP;       // [KT][D]
  float* Ps = Vs + KT * D;        // [MT][KT]

  const int w = blockIdx.x, kvh = blockIdx.y;
  const int p0 = p.item_part_indptr[w];
  const int M = (p.item_part_indptr[w + 1] - p0) * p.G;
  const int m0 = blockIdx.z * MT;
  if (m0 >= M) return;  // uniform over the block
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = p.G;

  for (int i = threadIdx.x; i < MT * D; i += blockDim.x) {
    const int r = i / D, d = i - r * D, m = m0 + r;
    float x = 0.f;
    if (m < M) {
      const int64_t t = p.part_q[p0 + m / G];
      const int h = kvh * G + m % G;
      x = to_float(p.q[(t * p.Hq + h) * D + d]) * p.scale;
    }
    Qs[i] = x;
  }
  if (threadIdx.x == 0) {
    int mx = 0;
    const int last = min(M, m0 + MT) - 1;
    for (int i = m0 / G; i <= last / G; ++i) mx = max(mx, p.part_nvis[p0 + i]);
    s_maxnv = mx;
  }
  int nv[ROWS];
  float m_i[ROWS], l_i[ROWS], acc[ROWS][NPL];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int m = m0 + warp * ROWS + r;
    nv[r] = m < M ? p.part_nvis[p0 + m / G] : 0;
    m_i[r] = -INFINITY;
    l_i[r] = 0.f;
#pragma unroll
    for (int c = 0; c < NPL; ++c) acc[r][c] = 0.f;
  }
  const bool warp_active = m0 + warp * ROWS < M;
  __syncthreads();
  const int max_nv = s_maxnv;

  int e_cur = p.item_ents[2 * w], off_cur = 0;  // warp 0's cursor into the entries
  const int e_end = p.item_ents[2 * w + 1];
  for (int tok = 0; tok < max_nv;) {
    if (warp == 0) {
      const int ei = e_cur + lane;
      int cum = ei < e_end ? p.seg_fills[ei] : 0;
      if (lane == 0) cum -= off_cur;
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(FULL, cum, o);
        if (lane >= o) cum += y;
      }
      const int total = __shfl_sync(FULL, cum, 31);
      const int nt = min(KT, min(total, max_nv - tok));
      int ent, off;
      locate(cum, lane, off_cur, ent, off);
      if (lane < nt) {
        s_blk[lane] = p.seg_blocks[e_cur + ent];
        s_off[lane] = off;
      }
      locate(cum, nt, off_cur, ent, off);
      e_cur += ent;
      off_cur = off;
      if (lane == 0) s_nt = nt;
    }
    __syncthreads();
    const int nt = s_nt;
    if (nt <= 0) break;  // only on a plan that promises more keys than its entries hold
    for (int i = threadIdx.x; i < KT * D; i += blockDim.x) {
      const int j = i / D, d = i - j * D;
      float kx = 0.f, vx = 0.f;
      if (j < nt) {
        const int64_t b = s_blk[j], o = s_off[j];
        kx = to_float(p.k[b * p.k_sb + kvh * p.k_sh + o * p.k_ss + d]);
        vx = to_float(p.v[b * p.v_sb + kvh * p.v_sh + o * p.v_ss + d]);
      }
      Ks[j * DP + d] = kx;
      Vs[j * D + d] = vx;
    }
    __syncthreads();
    if (warp_active) {
      float s[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) s[r] = 0.f;
      const float* kr = Ks + lane * DP;
      const float* qw = Qs + warp * ROWS * D;
      for (int d = 0; d < D; ++d) {
        const float kd = kr[d];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) s[r] = fmaf(qw[r * D + d], kd, s[r]);
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const bool valid = lane < nt && tok + lane < nv[r];
        const float x = valid ? s[r] : -INFINITY;
        const float m_new = fmaxf(m_i[r], warp_max(x));
        float pj = 0.f, alpha = 1.f;
        if (m_new != -INFINITY) {  // else the row has seen no key yet: nothing to add
          alpha = expf(m_i[r] - m_new);
          pj = valid ? expf(x - m_new) : 0.f;
        }
        l_i[r] = l_i[r] * alpha + warp_sum(pj);
        m_i[r] = m_new;
#pragma unroll
        for (int c = 0; c < NPL; ++c) acc[r][c] *= alpha;
        Ps[(warp * ROWS + r) * KT + lane] = pj;
      }
      __syncwarp();
      for (int j = 0; j < nt; ++j) {
        float vv[NPL];
#pragma unroll
        for (int c = 0; c < NPL; ++c) {
          const int d = lane + 32 * c;
          vv[c] = d < D ? Vs[j * D + d] : 0.f;
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float pr = Ps[(warp * ROWS + r) * KT + j];
#pragma unroll
          for (int c = 0; c < NPL; ++c) acc[r][c] = fmaf(pr, vv[c], acc[r][c]);
        }
      }
    }
    tok += nt;
    __syncthreads();  // the next tile overwrites Ks, Vs, s_blk
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int m = m0 + warp * ROWS + r;
    if (m >= M) continue;
    const int64_t part = p0 + m / G;
    const int h = kvh * G + m % G;
    const float inv = 1.f / l_i[r];
    float* o = p.o_part + (part * p.Hq + h) * D;
#pragma unroll
    for (int c = 0; c < NPL; ++c) {
      const int d = lane + 32 * c;
      if (d < D) o[d] = acc[r][c] * inv;
    }
    if (lane == 0) p.lse_part[part * p.Hq + h] = m_i[r] + logf(l_i[r]);
  }
}

// One block per query: out[t, h, d] = sum_i w_i o_part[i, h, d] / sum_i w_i over t's partials.
template <typename T>
__global__ void tree_attention_merge_kernel(const float* __restrict__ o_part,
                                            const float* __restrict__ lse_part,
                                            const int* __restrict__ q_part_indptr,
                                            const int* __restrict__ q_parts, T* __restrict__ out,
                                            int Hq, int D) {
  const int64_t t = blockIdx.x;
  const int a = q_part_indptr[t], b = q_part_indptr[t + 1];
  for (int i = threadIdx.x; i < Hq * D; i += blockDim.x) {
    const int h = i / D, d = i - h * D;
    float mx = -INFINITY;
    for (int k = a; k < b; ++k) mx = fmaxf(mx, lse_part[(int64_t)q_parts[k] * Hq + h]);
    float wsum = 0.f, acc = 0.f;
    for (int k = a; k < b; ++k) {
      const int64_t pp = q_parts[k];
      const float wgt = expf(lse_part[pp * Hq + h] - mx);
      wsum += wgt;
      acc = fmaf(wgt, o_part[(pp * Hq + h) * D + d], acc);
    }
    out[(t * Hq + h) * D + d] = from_float<T>(acc / wsum);
  }
}

template <typename T, int ROWS, int NPL>
void launch_partial(const PartialParams<T>& prm, int W, int Hkv, int max_m, cudaStream_t stream) {
  constexpr int MT = WARPS * ROWS;
  const int D = prm.D;
  const size_t smem = sizeof(float) * (size_t(MT) * D + size_t(KT) * (D + 1) + size_t(KT) * D +
                                       size_t(MT) * KT);
  auto kernel = tree_attention_partial_kernel<T, ROWS, NPL>;
  if (smem > 48 * 1024) {  // opt in (per device, so on every launch that needs it)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const dim3 grid(W, Hkv, (max_m + MT - 1) / MT);
  kernel<<<grid, WARPS * 32, smem, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NPL>
void launch_rows(const PartialParams<T>& prm, int W, int Hkv, int max_m, cudaStream_t stream) {
  // as few query-head tiles as possible: a tile re-reads the item's keys
  if (max_m <= WARPS * 2) {
    launch_partial<T, 2, NPL>(prm, W, Hkv, max_m, stream);
  } else if (max_m <= WARPS * 4) {
    launch_partial<T, 4, NPL>(prm, W, Hkv, max_m, stream);
  } else {
    launch_partial<T, 8, NPL>(prm, W, Hkv, max_m, stream);
  }
}

template <typename T>
void run(const at::Tensor& qc, const at::Tensor& k, const at::Tensor& v, const TreeAttentionDims& d,
         const at::Tensor& seg_blocks, const at::Tensor& seg_fills, const at::Tensor& item_ents,
         const at::Tensor& item_part_indptr, const at::Tensor& part_q, const at::Tensor& part_nvis,
         const at::Tensor& q_part_indptr, const at::Tensor& q_parts, int64_t max_item_parts,
         double scale, at::Tensor& out) {
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor o_part = at::empty({d.P, d.Hq, d.D}, qc.options().dtype(at::kFloat));
  at::Tensor lse_part = at::empty({d.P, d.Hq}, qc.options().dtype(at::kFloat));
  const PartialParams<T> prm = make_tree_attention_args<T, int>(
      qc, k, v, d, seg_blocks, seg_fills, item_ents, item_part_indptr, part_q, part_nvis, o_part,
      lse_part, scale);
  const int max_m = static_cast<int>(max_item_parts * d.G);
  if (d.W > 0 && max_m > 0) {
    const int W = static_cast<int>(d.W), Hkv = static_cast<int>(d.Hkv);
    if (d.D <= 64) {
      launch_rows<T, 2>(prm, W, Hkv, max_m, stream);
    } else if (d.D <= 128) {
      launch_rows<T, 4>(prm, W, Hkv, max_m, stream);
    } else {
      launch_rows<T, 8>(prm, W, Hkv, max_m, stream);
    }
  }
  tree_attention_merge_kernel<T><<<d.T, 256, 0, stream>>>(
      o_part.const_data_ptr<float>(), lse_part.const_data_ptr<float>(),
      q_part_indptr.const_data_ptr<int>(), q_parts.const_data_ptr<int>(),
      reinterpret_cast<T*>(out.mutable_data_ptr()), prm.Hq, prm.D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The plan's data is trusted on CUDA (checking it would need a device sync); the CPU op and the
// planner check it. Shapes, dtypes and devices are checked here.
at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& q_indptr,
                               const at::Tensor& seg_indptr, const at::Tensor& seg_blocks,
                               const at::Tensor& seg_fills, const at::Tensor& row_seg_indptr,
                               const at::Tensor& row_segs, const at::Tensor& item_ents,
                               const at::Tensor& item_part_indptr, const at::Tensor& part_q,
                               const at::Tensor& part_nvis, const at::Tensor& q_part_indptr,
                               const at::Tensor& q_parts, int64_t max_item_parts, double scale) {
  const TreeAttentionDims d = check_tree_attention_args(
      q, k_cache, v_cache, q_indptr, seg_indptr, seg_blocks, seg_fills, row_seg_indptr, row_segs,
      item_ents, item_part_indptr, part_q, part_nvis, q_part_indptr, q_parts, max_item_parts);
  TORCH_CHECK(d.D <= 256, "npr::tree_attention: CUDA kernel supports head dim <= 256, got ", d.D);
  TORCH_CHECK(max_item_parts <= 65535 * 64 / d.G,
              "npr::tree_attention: max_item_parts too large for the grid");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);
  if (d.T == 0) return out;
  switch (qc.scalar_type()) {
    case at::kFloat:
      run<float>(qc, k_cache, v_cache, d, seg_blocks, seg_fills, item_ents, item_part_indptr,
                 part_q, part_nvis, q_part_indptr, q_parts, max_item_parts, scale, out);
      break;
    case at::kHalf:
      run<__half>(qc, k_cache, v_cache, d, seg_blocks, seg_fills, item_ents, item_part_indptr,
                  part_q, part_nvis, q_part_indptr, q_parts, max_item_parts, scale, out);
      break;
    default:
      run<__nv_bfloat16>(qc, k_cache, v_cache, d, seg_blocks, seg_fills, item_ents,
                         item_part_indptr, part_q, part_nvis, q_part_indptr, q_parts,
                         max_item_parts, scale, out);
      break;
  }
  return out;
}

}  // namespace
}  // namespace npr

TORCH_LIBRARY_IMPL(npr, CUDA, m) { m.impl("tree_attention", &npr::tree_attention_cuda); }
