// npr::rms_norm on CUDA: one block per row, fp32 accumulation; fp32 / fp16 / bf16 storage.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "dtype_convert.cuh"

namespace npr {
namespace {

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                int64_t d, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float v = to_float(xr[i]);
    ss += v * v;
  }
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    ss = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if (threadIdx.x == 0) warp_sums[0] = ss;
  }
  __syncthreads();
  const float inv = rsqrtf(warp_sums[0] / static_cast<float>(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    yr[i] = from_float<T>(to_float(xr[i]) * inv * to_float(w[i]));
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "npr::rms_norm: x and weight dtypes differ");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0),
              "npr::rms_norm: weight must be [D] with D = x.size(-1)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t d = xc.size(-1);
  const int64_t rows = d == 0 ? 0 : xc.numel() / d;
  if (rows == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
  switch (xc.scalar_type()) {
    case at::kFloat:
      rms_norm_kernel<float><<<rows, threads, 0, stream>>>(xc.const_data_ptr<float>(),
          wc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), d, (float)eps);
      break;
    case at::kHalf:
      rms_norm_kernel<__half><<<rows, threads, 0, stream>>>(
          reinterpret_cast<const __half*>(xc.const_data_ptr()),
          reinterpret_cast<const __half*>(wc.const_data_ptr()),
          reinterpret_cast<__half*>(y.mutable_data_ptr()), d, (float)eps);
      break;
    case at::kBFloat16:
      rms_norm_kernel<__nv_bfloat16><<<rows, threads, 0, stream>>>(
          reinterpret_cast<const __nv_bfloat16*>(xc.const_data_ptr()),
          reinterpret_cast<const __nv_bfloat16*>(wc.const_data_ptr()),
          reinterpret_cast<__nv_bfloat16*>(y.mutable_data_ptr()), d, (float)eps);
      break;
    default:
      TORCH_CHECK(false, "npr::rms_norm: unsupported dtype ", xc.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace
}  // namespace npr

TORCH_LIBRARY_IMPL(npr, CUDA, m) { m.impl("rms_norm", &npr::rms_norm_cuda); }
