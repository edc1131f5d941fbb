// add_relu on CUDA: out = relu(a + b) over flat dense buffers, and its backward.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common.h"
#include "cuda_utils.cuh"

namespace torchgraph::cuda {
namespace {

template <typename T>
__global__ void add_relu_kernel(
    const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n) {
  using A = acc_t<T>;
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const A sum = static_cast<A>(a[i]) + static_cast<A>(b[i]);
    out[i] = static_cast<T>((sum > A(0) || sum != sum) ? sum : A(0));  // NaN propagates
  }
}

template <typename T>
__global__ void add_relu_backward_kernel(
    const T* __restrict__ grad, const T* __restrict__ out, T* __restrict__ grad_in, int64_t n) {
  using A = acc_t<T>;
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    grad_in[i] = static_cast<A>(out[i]) > A(0) ? grad[i] : static_cast<T>(0);
  }
}

}  // namespace

at::Tensor add_relu_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_add_relu(a, b);
  TORCH_INTERNAL_ASSERT(a.device().is_cuda(), "add_relu_cuda: a must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(a.device());

  const at::MemoryFormat format = dense_format(a);
  const at::Tensor a_dense = a.contiguous(format);
  const at::Tensor b_dense = b.contiguous(format);
  at::Tensor out = at::empty(a.sizes(), a.options().memory_format(format));
  const int64_t n = a.numel();
  if (n == 0) return out;

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "add_relu_cuda", [&] {
    add_relu_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        a_dense.const_data_ptr<scalar_t>(), b_dense.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor add_relu_backward_cuda(const at::Tensor& grad, const at::Tensor& out) {
  check_add_relu_backward(grad, out);
  TORCH_INTERNAL_ASSERT(
      out.device().is_cuda(), "add_relu_backward_cuda: out must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(out.device());

  const at::MemoryFormat format = dense_format(out);
  const at::Tensor grad_dense = grad.contiguous(format);
  const at::Tensor out_dense = out.contiguous(format);
  at::Tensor grad_in = at::empty(out.sizes(), out.options().memory_format(format));
  const int64_t n = out.numel();
  if (n == 0) return grad_in;

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "add_relu_backward_cuda", [&] {
    add_relu_backward_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        grad_dense.const_data_ptr<scalar_t>(), out_dense.const_data_ptr<scalar_t>(),
        grad_in.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
}

TORCH_LIBRARY_IMPL(torchgraph, CUDA, m) {
  m.impl("add_relu", &add_relu_cuda);
  m.impl("add_relu_backward", &add_relu_backward_cuda);
}

}  // namespace torchgraph::cuda
