// bias_act on CUDA: y = act(x + bias) and its backward.
//
// Same [outer, C, inner] view as the CPU kernel (SplitDims in common.h): the
// bias index of flat element i is (i / inner) % C. grad_bias is a plain ATen
// sum of grad_x, which is already a well-tuned CUDA reduction.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../common.h"
#include "cuda_utils.cuh"

namespace torchgraph::cuda {
namespace {

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kTanhCoeff = 0.044715;

// act(z) and act'(z) for float and double; the same formulas as the CPU functors.
template <Activation kAct, typename A>
__device__ __forceinline__ A act_value(A z) {
  if constexpr (kAct == Activation::kRelu) {
    return (z > A(0) || z != z) ? z : A(0);  // z != z: NaN propagates like torch.relu
  } else if constexpr (kAct == Activation::kGelu) {
    return A(0.5) * z * (A(1) + ::erf(z * A(kSqrtHalf)));
  } else if constexpr (kAct == Activation::kGeluTanh) {
    const A inner = A(kSqrt2OverPi) * (z + A(kTanhCoeff) * z * z * z);
    return A(0.5) * z * (A(1) + ::tanh(inner));
  } else if constexpr (kAct == Activation::kSilu) {
    return z / (A(1) + ::exp(-z));
  } else {
    return z;
  }
}

template <Activation kAct, typename A>
__device__ __forceinline__ A act_derivative(A z) {
  if constexpr (kAct == Activation::kRelu) {
    return z > A(0) ? A(1) : A(0);
  } else if constexpr (kAct == Activation::kGelu) {
    const A cdf = A(0.5) * (A(1) + ::erf(z * A(kSqrtHalf)));
    return cdf + z * A(kInvSqrt2Pi) * ::exp(A(-0.5) * z * z);
  } else if constexpr (kAct == Activation::kGeluTanh) {
    const A t = ::tanh(A(kSqrt2OverPi) * (z + A(kTanhCoeff) * z * z * z));
    const A dinner = A(kSqrt2OverPi) * (A(1) + A(3 * kTanhCoeff) * z * z);
    return A(0.5) * (A(1) + t) + A(0.5) * z * (A(1) - t * t) * dinner;
  } else if constexpr (kAct == Activation::kSilu) {
    const A s = A(1) / (A(1) + ::exp(-z));
    return s * (A(1) + z * (A(1) - s));
  } else {
    return A(1);
  }
}

template <typename T, Activation kAct>
__global__ void bias_act_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int64_t n,
    int64_t channels, int64_t inner) {
  using A = acc_t<T>;
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const A z = static_cast<A>(x[i]) + static_cast<A>(bias[(i / inner) % channels]);
    y[i] = static_cast<T>(act_value<kAct>(z));
  }
}

template <typename T, Activation kAct>
__global__ void bias_act_backward_kernel(
    const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ bias,
    T* __restrict__ grad_x, int64_t n, int64_t channels, int64_t inner) {
  using A = acc_t<T>;
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const A z = static_cast<A>(x[i]) + static_cast<A>(bias[(i / inner) % channels]);
    grad_x[i] = static_cast<T>(static_cast<A>(grad[i]) * act_derivative<kAct>(z));
  }
}

// Calls fn(std::integral_constant<Activation, act>{}) so the activation is a
// compile-time template argument of the kernel.
template <typename Fn>
void dispatch_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::kNone: return fn(std::integral_constant<Activation, Activation::kNone>{});
    case Activation::kRelu: return fn(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kGelu: return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh:
      return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kSilu: return fn(std::integral_constant<Activation, Activation::kSilu>{});
  }
  TORCH_INTERNAL_ASSERT(false, "bias_act: unhandled activation");
}

}  // namespace

at::Tensor bias_act_cuda(
    const at::Tensor& x, const at::Tensor& bias, c10::string_view act, int64_t dim) {
  const Activation activation = parse_activation(act);
  const int64_t wrapped_dim = check_bias_act(x, bias, dim);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda(), "bias_act_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::MemoryFormat format = dense_format(x);
  const at::Tensor x_dense = x.contiguous(format);
  const at::Tensor bias_dense = bias.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format));
  const int64_t n = x.numel();
  if (n == 0) return y;
  const SplitDims split = split_at_dim(x, wrapped_dim, format);
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
    dispatch_activation(activation, [&](auto act_constant) {
      bias_act_forward_kernel<scalar_t, decltype(act_constant)::value>
          <<<grid_for(n), kThreads, 0, stream>>>(
              x_dense.const_data_ptr<scalar_t>(), bias_dense.const_data_ptr<scalar_t>(),
              y.mutable_data_ptr<scalar_t>(), n, split.size, split.inner);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& x,
    const at::Tensor& bias,
    c10::string_view act,
    int64_t dim) {
  const Activation activation = parse_activation(act);
  const int64_t wrapped_dim = check_bias_act(x, bias, dim);
  check_bias_act_backward(grad, x);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda(), "bias_act_backward_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::MemoryFormat format = dense_format(x);
  const at::Tensor grad_dense = grad.contiguous(format);
  const at::Tensor x_dense = x.contiguous(format);
  const at::Tensor bias_dense = bias.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(format));
  const int64_t n = x.numel();
  if (n > 0) {
    const SplitDims split = split_at_dim(x, wrapped_dim, format);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_act_backward_cuda", [&] {
      dispatch_activation(activation, [&](auto act_constant) {
        bias_act_backward_kernel<scalar_t, decltype(act_constant)::value>
            <<<grid_for(n), kThreads, 0, stream>>>(
                grad_dense.const_data_ptr<scalar_t>(), x_dense.const_data_ptr<scalar_t>(),
                bias_dense.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), n,
                split.size, split.inner);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  // grad_bias: sum grad_x over every dim but the bias dim, accumulating in
  // float for bfloat16. NOTE: an empty dim list would mean "all dims" to sum(),
  // so a 1-D x (bias dim is the only dim) is handled separately.
  std::vector<int64_t> reduce_dims;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (d != wrapped_dim) reduce_dims.push_back(d);
  }
  const at::ScalarType acc_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor grad_bias = reduce_dims.empty()
      ? grad_x.clone()
      : grad_x.sum(at::IntArrayRef(reduce_dims), /*keepdim=*/false, acc_dtype).to(x.scalar_type());
  return {grad_x, grad_bias};
}

TORCH_LIBRARY_IMPL(torchgraph, CUDA, m) {
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_backward", &bias_act_backward_cuda);
}

}  // namespace torchgraph::cuda
