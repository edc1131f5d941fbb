// add_relu: out = relu(a + b) for same-shape a and b, and its backward.
//
// Both inputs are read as flat dense buffers in a's layout (NOTE: [Memory
// format rule] in common.h): b is copied only when its layout differs from a's.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

// out[i] = op(a[i], b[i]) over a flat buffer, split into parallel chunks.
template <typename T, typename Op>
void parallel_map2(const T* a, const T* b, T* out, int64_t n, const Op& op) {
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
    map2_row(a + begin, b + begin, out + begin, end - begin, op);
  });
}

}  // namespace

at::Tensor add_relu_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_add_relu(a, b);
  TORCH_INTERNAL_ASSERT(a.device().is_cpu(), "add_relu_cpu: a must be a CPU tensor");

  const at::MemoryFormat format = dense_format(a);
  const at::Tensor a_dense = a.contiguous(format);
  const at::Tensor b_dense = b.contiguous(format);
  at::Tensor out = at::empty(a.sizes(), a.options().memory_format(format));

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "add_relu_cpu", [&] {
    parallel_map2(
        a_dense.const_data_ptr<scalar_t>(), b_dense.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), a.numel(),
        [](const auto& u, const auto& v) { return relu(u + v); });
  });
  return out;
}

// The gradient of a and of b: grad where out > 0, else 0.
at::Tensor add_relu_backward_cpu(const at::Tensor& grad, const at::Tensor& out) {
  check_add_relu_backward(grad, out);
  TORCH_INTERNAL_ASSERT(out.device().is_cpu(), "add_relu_backward_cpu: out must be a CPU tensor");

  const at::MemoryFormat format = dense_format(out);
  const at::Tensor grad_dense = grad.contiguous(format);
  const at::Tensor out_dense = out.contiguous(format);
  at::Tensor grad_in = at::empty(out.sizes(), out.options().memory_format(format));

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "add_relu_backward_cpu", [&] {
    parallel_map2(
        grad_dense.const_data_ptr<scalar_t>(), out_dense.const_data_ptr<scalar_t>(),
        grad_in.mutable_data_ptr<scalar_t>(), out.numel(),
        [](const auto& g, const auto& y) { return where_positive(y, g); });
  });
  return grad_in;
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("add_relu", &add_relu_cpu);
  m.impl("add_relu_backward", &add_relu_backward_cpu);
}

}  // namespace torchgraph::cpu
