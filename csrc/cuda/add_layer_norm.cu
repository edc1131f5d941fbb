// add_layer_norm on CUDA: residual_out = x + residual, out = layer_norm(residual_out)
// over the last dim; and its backward.
//
// One block per row; block_sum() gives every thread the row sums. The row is
// re-read from global memory in each pass (it is L1/L2-resident for the C of
// a transformer). The backward recomputes mean and rstd with the same code as
// the forward (NOTE: [Recomputed statistics] in cpu/add_layer_norm.cpp), and
// sums grad_weight / grad_bias with one thread per column in a second kernel:
// simple and coalesced across threads, but not tuned for very many rows.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common.h"
#include "cuda_utils.cuh"

namespace torchgraph::cuda {
namespace {

constexpr int kRowThreads = 128;  // threads per row block, a multiple of 32

// Mean and 1 / sqrt(var + eps) of row s[0, C), identical in every thread.
template <typename T, typename A>
__device__ void row_moments(const T* s, int64_t C, A eps, A* shared, A& mean, A& rstd) {
  A sum = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) sum += static_cast<A>(s[c]);
  mean = block_sum(sum, shared) / static_cast<A>(C);
  A sq = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const A d = static_cast<A>(s[c]) - mean;
    sq += d * d;
  }
  rstd = A(1) / ::sqrt(block_sum(sq, shared) / static_cast<A>(C) + eps);
}

template <typename T>
__global__ void add_layer_norm_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
    const T* __restrict__ bias, T* __restrict__ out, T* __restrict__ residual_out, int64_t C,
    double eps) {
  using A = acc_t<T>;
  __shared__ A shared[kWarpSize];
  const int64_t o = static_cast<int64_t>(blockIdx.x) * C;
  T* s = residual_out + o;
  // Each thread later re-reads only the elements it wrote itself, so no
  // barrier is needed between this write and row_moments().
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    s[c] = static_cast<T>(static_cast<A>(x[o + c]) + static_cast<A>(residual[o + c]));
  }
  A mean, rstd;
  row_moments(s, C, static_cast<A>(eps), shared, mean, rstd);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const A xhat = (static_cast<A>(s[c]) - mean) * rstd;
    out[o + c] = static_cast<T>(xhat * static_cast<A>(weight[c]) + static_cast<A>(bias[c]));
  }
}

// grad_s = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_residual_out,
// with g = grad_out * weight. Also stores each row's mean and rstd.
template <typename T>
__global__ void add_layer_norm_backward_rows_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ grad_res /* may be null */,
    const T* __restrict__ s, const T* __restrict__ weight, T* __restrict__ grad_s,
    acc_t<T>* __restrict__ row_mean, acc_t<T>* __restrict__ row_rstd, int64_t C, double eps) {
  using A = acc_t<T>;
  __shared__ A shared[kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t o = row * C;
  A mean, rstd;
  row_moments(s + o, C, static_cast<A>(eps), shared, mean, rstd);
  A sum_g = 0, sum_gx = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const A g = static_cast<A>(grad_out[o + c]) * static_cast<A>(weight[c]);
    sum_g += g;
    sum_gx += g * (static_cast<A>(s[o + c]) - mean) * rstd;
  }
  const A mean_g = block_sum(sum_g, shared) / static_cast<A>(C);
  const A mean_gx = block_sum(sum_gx, shared) / static_cast<A>(C);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const A xhat = (static_cast<A>(s[o + c]) - mean) * rstd;
    const A g = static_cast<A>(grad_out[o + c]) * static_cast<A>(weight[c]);
    const A dr = grad_res != nullptr ? static_cast<A>(grad_res[o + c]) : A(0);
    grad_s[o + c] = static_cast<T>(rstd * (g - mean_g - xhat * mean_gx) + dr);
  }
  if (threadIdx.x == 0) {
    row_mean[row] = mean;
    row_rstd[row] = rstd;
  }
}

// grad_weight[c] = sum_r grad_out[r, c] * xhat[r, c]; grad_bias[c] = sum_r grad_out[r, c].
template <typename T>
__global__ void add_layer_norm_backward_columns_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ s,
    const acc_t<T>* __restrict__ row_mean, const acc_t<T>* __restrict__ row_rstd,
    T* __restrict__ grad_weight, T* __restrict__ grad_bias, int64_t rows, int64_t C) {
  using A = acc_t<T>;
  for (int64_t c = global_thread_index(); c < C; c += grid_stride()) {
    A dw = 0, db = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const A dy = static_cast<A>(grad_out[r * C + c]);
      dw += dy * (static_cast<A>(s[r * C + c]) - row_mean[r]) * row_rstd[r];
      db += dy;
    }
    grad_weight[c] = static_cast<T>(dw);
    grad_bias[c] = static_cast<T>(db);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cuda(
    const at::Tensor& x,
    const at::Tensor& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  check_add_layer_norm(x, residual, weight, bias, eps);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda(), "add_layer_norm_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::Tensor x_dense = x.contiguous();
  const at::Tensor residual_dense = residual.contiguous();
  const at::Tensor w = param_or(weight, x, 1);
  const at::Tensor b = param_or(bias, x, 0);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor residual_out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {out, residual_out};
  const int64_t C = x.size(-1);
  const int64_t rows = x.numel() / C;
  TORCH_CHECK(
      rows <= INT32_MAX, "add_layer_norm: at most ", INT32_MAX, " rows on CUDA, got ", rows);

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_layer_norm_cuda", [&] {
    add_layer_norm_forward_kernel<scalar_t>
        <<<static_cast<unsigned int>(rows), kRowThreads, 0, stream>>>(
            x_dense.const_data_ptr<scalar_t>(), residual_dense.const_data_ptr<scalar_t>(),
            w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), residual_out.mutable_data_ptr<scalar_t>(), C, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, residual_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cuda(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out,
    const std::optional<at::Tensor>& weight,
    double eps) {
  const int64_t C =
      check_add_layer_norm_backward(grad_out, grad_residual_out, residual_out, weight);
  TORCH_INTERNAL_ASSERT(
      residual_out.device().is_cuda(), "add_layer_norm_backward_cuda: tensors must be on CUDA");
  const c10::cuda::CUDAGuard device_guard(residual_out.device());

  const at::Tensor grad_out_dense = grad_out.contiguous();
  const at::Tensor s_dense = residual_out.contiguous();
  at::Tensor grad_res_dense;
  if (grad_residual_out.has_value()) grad_res_dense = grad_residual_out->contiguous();
  const at::Tensor w = param_or(weight, residual_out, 1);
  at::Tensor grad_s = at::empty(residual_out.sizes(), residual_out.options());
  const int64_t rows = C == 0 ? 0 : residual_out.numel() / C;
  if (rows == 0) {
    return {grad_s, at::zeros({C}, residual_out.options()), at::zeros({C}, residual_out.options())};
  }
  TORCH_CHECK(
      rows <= INT32_MAX, "add_layer_norm_backward: at most ", INT32_MAX, " rows on CUDA, got ", rows);

  const at::ScalarType dtype = residual_out.scalar_type();
  const auto acc_options = residual_out.options().dtype(at::toOpMathType(dtype));
  at::Tensor row_mean = at::empty({rows}, acc_options);
  at::Tensor row_rstd = at::empty({rows}, acc_options);
  at::Tensor grad_weight = at::empty({C}, residual_out.options());
  at::Tensor grad_bias = at::empty({C}, residual_out.options());

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "add_layer_norm_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    add_layer_norm_backward_rows_kernel<scalar_t>
        <<<static_cast<unsigned int>(rows), kRowThreads, 0, stream>>>(
            grad_out_dense.const_data_ptr<scalar_t>(),
            grad_res_dense.defined() ? grad_res_dense.const_data_ptr<scalar_t>() : nullptr,
            s_dense.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            grad_s.mutable_data_ptr<scalar_t>(), row_mean.mutable_data_ptr<A>(),
            row_rstd.mutable_data_ptr<A>(), C, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    add_layer_norm_backward_columns_kernel<scalar_t><<<grid_for(C), kThreads, 0, stream>>>(
        grad_out_dense.const_data_ptr<scalar_t>(), s_dense.const_data_ptr<scalar_t>(),
        row_mean.const_data_ptr<A>(), row_rstd.const_data_ptr<A>(),
        grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(), rows, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_s, grad_weight, grad_bias};
}

TORCH_LIBRARY_IMPL(torchgraph, CUDA, m) {
  m.impl("add_layer_norm", &add_layer_norm_cuda);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cuda);
}

}  // namespace torchgraph::cuda
