// max_pool2d_inference on CUDA: one thread per output element, no indices.
//
// NCHW: consecutive threads take consecutive output columns of one plane.
// NHWC (channels_last): consecutive threads take consecutive channels of one
// output pixel, so every window tap is a coalesced read of C channels.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"
#include "cuda_utils.cuh"

namespace torchgraph::cuda {
namespace {

// Pooling geometry passed by value to the kernels.
struct PoolGeometry {
  int64_t H, W, OH, OW;
  int kH, kW, sH, sW, pH, pW, dH, dW;
};

// max that propagates NaN like torch.max_pool2d.
template <typename A>
__device__ __forceinline__ A max_nan(A current, A value) {
  return (value > current || value != value) ? value : current;
}

template <typename T>
__global__ void max_pool2d_nchw_kernel(
    const T* __restrict__ x, T* __restrict__ y, int64_t n, PoolGeometry g) {
  using A = acc_t<T>;
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const int64_t ow = i % g.OW;
    const int64_t oh = (i / g.OW) % g.OH;
    const int64_t plane = i / (g.OW * g.OH);
    const T* in = x + plane * g.H * g.W;
    A m = -static_cast<A>(INFINITY);
    for (int kh = 0; kh < g.kH; ++kh) {
      const int64_t ih = oh * g.sH - g.pH + kh * g.dH;
      if (ih < 0 || ih >= g.H) continue;
      for (int kw = 0; kw < g.kW; ++kw) {
        const int64_t iw = ow * g.sW - g.pW + kw * g.dW;
        if (iw < 0 || iw >= g.W) continue;
        m = max_nan(m, static_cast<A>(in[ih * g.W + iw]));
      }
    }
    y[i] = static_cast<T>(m);
  }
}

template <typename T>
__global__ void max_pool2d_nhwc_kernel(
    const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t C, PoolGeometry g) {
  using A = acc_t<T>;
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const int64_t c = i % C;
    const int64_t pixel = i / C;  // (batch, oh, ow) flattened
    const int64_t ow = pixel % g.OW;
    const int64_t oh = (pixel / g.OW) % g.OH;
    const int64_t batch = pixel / (g.OW * g.OH);
    const T* in = x + batch * g.H * g.W * C + c;
    A m = -static_cast<A>(INFINITY);
    for (int kh = 0; kh < g.kH; ++kh) {
      const int64_t ih = oh * g.sH - g.pH + kh * g.dH;
      if (ih < 0 || ih >= g.H) continue;
      for (int kw = 0; kw < g.kW; ++kw) {
        const int64_t iw = ow * g.sW - g.pW + kw * g.dW;
        if (iw < 0 || iw >= g.W) continue;
        m = max_nan(m, static_cast<A>(in[(ih * g.W + iw) * C]));
      }
    }
    y[i] = static_cast<T>(m);
  }
}

}  // namespace

at::Tensor max_pool2d_inference_cuda(
    const at::Tensor& x,
    at::IntArrayRef kernel_size,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    bool ceil_mode) {
  const Pool2dParams p = check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda(), "max_pool2d_inference_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::Tensor x4 = x.dim() == 3 ? x.unsqueeze(0) : x;
  const int64_t N = x4.size(0), C = x4.size(1);
  const at::MemoryFormat format = dense_format(x);  // always Contiguous for 3-D x
  const at::Tensor x_dense = x4.contiguous(format);
  at::Tensor y = at::empty({N, C, p.out_size[0], p.out_size[1]}, x.options().memory_format(format));
  const int64_t n = y.numel();

  if (n > 0) {
    // NOTE: kernel, stride, padding and dilation fit in int: a window larger
    // than 2^31 elements per side would be meaningless.
    const PoolGeometry g{
        x4.size(2), x4.size(3), p.out_size[0], p.out_size[1],
        static_cast<int>(p.kernel[0]), static_cast<int>(p.kernel[1]),
        static_cast<int>(p.stride[0]), static_cast<int>(p.stride[1]),
        static_cast<int>(p.padding[0]), static_cast<int>(p.padding[1]),
        static_cast<int>(p.dilation[0]), static_cast<int>(p.dilation[1])};
    const auto stream = at::cuda::getCurrentCUDAStream();
    const auto dtype = x.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "max_pool2d_inference_cuda", [&] {
      const scalar_t* in = x_dense.const_data_ptr<scalar_t>();
      scalar_t* out = y.mutable_data_ptr<scalar_t>();
      if (format == at::MemoryFormat::ChannelsLast) {
        max_pool2d_nhwc_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(in, out, n, C, g);
      } else {
        max_pool2d_nchw_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(in, out, n, g);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return x.dim() == 3 ? y.squeeze(0) : y;
}

TORCH_LIBRARY_IMPL(torchgraph, CUDA, m) {
  m.impl("max_pool2d_inference", &max_pool2d_inference_cuda);
}

}  // namespace torchgraph::cuda
