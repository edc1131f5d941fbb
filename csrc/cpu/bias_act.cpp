// bias_act: y = act(x + bias), bias broadcast along one dim, and its backward.
//
// The tensor is viewed as [outer, C, inner] around the bias dim (see
// SplitDims). Two loop shapes cover the cases that matter:
//   inner == 1  (linear epilogue, or NCHW channels_last with dim=1):
//               each row of C elements meets the whole bias vector;
//   inner > 1   (NCHW contiguous with dim=1): each plane of `inner` elements
//               meets one bias scalar.
// Inputs that are neither contiguous nor channels_last are copied to
// contiguous first (NOTE: [Memory format rule] in common.h).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "../common.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kTanhCoeff = 0.044715;

// Each activation gives value(z) and derivative(z) for V in {float, double,
// Vectorized<float>, Vectorized<double>}.
struct NoAct {
  template <typename V>
  static V value(const V& z) { return z; }
  template <typename V>
  static V derivative(const V&) { return V(1); }
};

struct Relu {
  template <typename V>
  static V value(const V& z) { return relu(z); }
  template <typename V>
  static V derivative(const V& z) { return where_positive(z, V(1)); }
};

// Exact GELU: z * Phi(z), Phi the standard normal CDF.
struct Gelu {
  template <typename V>
  static V value(const V& z) {
    return V(0.5) * z * (V(1) + verf(z * V(kSqrtHalf)));
  }
  template <typename V>
  static V derivative(const V& z) {  // Phi(z) + z * phi(z)
    const V cdf = V(0.5) * (V(1) + verf(z * V(kSqrtHalf)));
    return cdf + z * V(kInvSqrt2Pi) * vexp(V(-0.5) * z * z);
  }
};

// GELU with the tanh approximation (F.gelu(approximate="tanh")).
// NOTE: 0.5 * (1 + tanh(u)) == sigmoid(2u), so the value is z * sigmoid(2u):
// one exp and one division instead of a (much slower) vectorised tanh.
struct GeluTanh {
  template <typename V>
  static V two_u(const V& z) {
    return V(2 * kSqrt2OverPi) * (z + V(kTanhCoeff) * z * z * z);
  }
  template <typename V>
  static V value(const V& z) {
    return z / (V(1) + vexp(V(0) - two_u(z)));
  }
  template <typename V>
  static V derivative(const V& z) {  // s + z * s * (1 - s) * d(2u)/dz
    const V s = V(1) / (V(1) + vexp(V(0) - two_u(z)));
    const V dtwo_u = V(2 * kSqrt2OverPi) * (V(1) + V(3 * kTanhCoeff) * z * z);
    return s + z * s * (V(1) - s) * dtwo_u;
  }
};

// SiLU: z * sigmoid(z).
struct Silu {
  template <typename V>
  static V sigmoid(const V& z) { return V(1) / (V(1) + vexp(V(0) - z)); }
  template <typename V>
  static V value(const V& z) { return z * sigmoid(z); }
  template <typename V>
  static V derivative(const V& z) {
    const V s = sigmoid(z);
    return s * (V(1) + z * (V(1) - s));
  }
};

// Calls fn(ActTag{}) with the functor type for `act`, so each activation gets
// its own fully inlined loop instead of a per-element switch.
template <typename Fn>
void dispatch_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::kNone: return fn(NoAct{});
    case Activation::kRelu: return fn(Relu{});
    case Activation::kGelu: return fn(Gelu{});
    case Activation::kGeluTanh: return fn(GeluTanh{});
    case Activation::kSilu: return fn(Silu{});
  }
  TORCH_INTERNAL_ASSERT(false, "bias_act: unhandled activation");
}

template <typename T, typename Act>
void forward_kernel(const T* x, const T* bias, T* y, SplitDims s) {
  const auto op = [](const auto& xv, const auto& bv) { return Act::value(xv + bv); };
  if (s.inner == 1) {
    at::parallel_for(0, s.outer, grain_rows(s.size), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        map2_row(x + r * s.size, bias, y + r * s.size, s.size, op);
      }
    });
  } else {
    at::parallel_for(0, s.outer * s.size, grain_rows(s.inner), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const acc_t<T> b = bias[p % s.size];
        map1_row_scalar(x + p * s.inner, b, y + p * s.inner, s.inner, op);
      }
    });
  }
}

// grad_x = grad * act'(x + bias); partials[block, c] collects grad_x summed
// over the rows of one block (NOTE: [Deterministic partial sums]).
template <typename T, typename Act>
void backward_kernel(
    const T* grad, const T* x, const T* bias, T* grad_x, acc_t<T>* partials, int64_t blocks,
    SplitDims s) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kVec = Vec::size();
  const int64_t C = s.size;
  if (s.inner == 1) {
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; ++block) {
        Acc* part = partials + block * C;
        const auto [row_begin, row_end] = block_range(s.outer, blocks, block);
        for (int64_t r = row_begin; r < row_end; ++r) {
          const int64_t o = r * C;
          int64_t c = 0;
          for (; c + kStep<T> <= C; c += kStep<T>) {
            Vec g0, g1, x0, x1, b0, b1;
            load2(grad + o + c, g0, g1);
            load2(x + o + c, x0, x1);
            load2(bias + c, b0, b1);
            const Vec d0 = g0 * Act::derivative(x0 + b0);
            const Vec d1 = g1 * Act::derivative(x1 + b1);
            store2(grad_x + o + c, d0, d1);
            (Vec::loadu(part + c) + d0).store(part + c);
            (Vec::loadu(part + c + kVec) + d1).store(part + c + kVec);
          }
          for (; c < C; ++c) {
            const Acc d = Acc(grad[o + c]) * Act::derivative(Acc(x[o + c]) + Acc(bias[c]));
            grad_x[o + c] = static_cast<T>(d);
            part[c] += d;
          }
        }
      }
    });
  } else {
    const int64_t planes = s.outer * C;
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; ++block) {
        Acc* part = partials + block * C;
        const auto [plane_begin, plane_end] = block_range(planes, blocks, block);
        for (int64_t p = plane_begin; p < plane_end; ++p) {
          const int64_t o = p * s.inner;
          const Acc b = bias[p % C];
          const Vec vb(b);
          Vec acc0(0), acc1(0);
          int64_t i = 0;
          for (; i + kStep<T> <= s.inner; i += kStep<T>) {
            Vec g0, g1, x0, x1;
            load2(grad + o + i, g0, g1);
            load2(x + o + i, x0, x1);
            const Vec d0 = g0 * Act::derivative(x0 + vb);
            const Vec d1 = g1 * Act::derivative(x1 + vb);
            store2(grad_x + o + i, d0, d1);
            acc0 = acc0 + d0;
            acc1 = acc1 + d1;
          }
          Acc total = reduce_add(acc0 + acc1);
          for (; i < s.inner; ++i) {
            const Acc d = Acc(grad[o + i]) * Act::derivative(Acc(x[o + i]) + b);
            grad_x[o + i] = static_cast<T>(d);
            total += d;
          }
          part[p % C] += total;
        }
      }
    });
  }
}

}  // namespace

at::Tensor bias_act_cpu(
    const at::Tensor& x, const at::Tensor& bias, c10::string_view act, int64_t dim) {
  const Activation activation = parse_activation(act);
  const int64_t wrapped_dim = check_bias_act(x, bias, dim);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu(), "bias_act_cpu: x must be a CPU tensor");

  const at::MemoryFormat format = dense_format(x);
  const at::Tensor x_dense = x.contiguous(format);
  const at::Tensor bias_dense = bias.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return y;
  const SplitDims split = split_at_dim(x, wrapped_dim, format);

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_act_cpu", [&] {
    dispatch_activation(activation, [&](auto act_tag) {
      forward_kernel<scalar_t, decltype(act_tag)>(
          x_dense.const_data_ptr<scalar_t>(), bias_dense.const_data_ptr<scalar_t>(),
          y.mutable_data_ptr<scalar_t>(), split);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& x,
    const at::Tensor& bias,
    c10::string_view act,
    int64_t dim) {
  const Activation activation = parse_activation(act);
  const int64_t wrapped_dim = check_bias_act(x, bias, dim);
  check_bias_act_backward(grad, x);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu(), "bias_act_backward_cpu: x must be a CPU tensor");

  const at::MemoryFormat format = dense_format(x);
  const at::Tensor grad_dense = grad.contiguous(format);
  const at::Tensor x_dense = x.contiguous(format);
  const at::Tensor bias_dense = bias.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return {grad_x, at::zeros_like(bias)};
  const SplitDims split = split_at_dim(x, wrapped_dim, format);

  const int64_t blocks = split.inner == 1 ? num_row_blocks(split.outer, split.size)
                                          : num_row_blocks(split.outer * split.size, split.inner);
  at::Tensor partials =
      at::zeros({blocks, split.size}, x.options().dtype(at::toOpMathType(x.scalar_type())));

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_act_backward_cpu", [&] {
    dispatch_activation(activation, [&](auto act_tag) {
      backward_kernel<scalar_t, decltype(act_tag)>(
          grad_dense.const_data_ptr<scalar_t>(), x_dense.const_data_ptr<scalar_t>(),
          bias_dense.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
          partials.mutable_data_ptr<acc_t<scalar_t>>(), blocks, split);
    });
  });
  return {grad_x, partials.sum(0).to(x.scalar_type())};
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_act_backward", &bias_act_backward_cpu);
}

}  // namespace torchgraph::cpu
