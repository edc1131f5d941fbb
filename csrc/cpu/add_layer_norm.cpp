// add_layer_norm: residual_out = x + residual; out = layer_norm(residual_out)
// over the last dim; and its backward.
//
// One task handles whole rows: a row (C <= a few thousand elements) stays in
// L1 between the passes, so the kernel reads x and residual once and writes
// out and residual_out once. Inputs are made contiguous first.
//
// NOTE: [Recomputed statistics]
// The op returns only (out, residual_out), the two tensors a pre-LN block
// uses, so the schema and the pure-PyTorch reference stay interchangeable.
// The backward recomputes mean and rstd from residual_out: one more pass
// over a row it has to load anyway, with bit-identical results because it
// calls the same row_moments() as the forward.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

// (mean, 1 / sqrt(var + eps)) of one row; two passes for a stable variance.
template <typename T>
std::pair<acc_t<T>, acc_t<T>> row_moments(const T* s, int64_t C, double eps) {
  using Acc = acc_t<T>;
  const Acc mean = sum_row(s, C, [](const auto& v) { return v; }) / Acc(C);
  const Acc var = sum_row(s, C, [mean](const auto& v) {
                    using V = std::decay_t<decltype(v)>;
                    const V d = v - V(mean);
                    return d * d;
                  }) / Acc(C);
  return {mean, Acc(1) / std::sqrt(var + Acc(eps))};
}

template <typename T>
void forward_kernel(
    const T* x, const T* residual, const T* weight, const T* bias, T* out, T* residual_out,
    int64_t rows, int64_t C, double eps) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  at::parallel_for(0, rows, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * C;
      T* s = residual_out + o;
      // NOTE: statistics are taken from residual_out as stored (rounded to T),
      // which is what layer_norm(x + residual) sees in the reference.
      map2_row(x + o, residual + o, s, C, [](const auto& u, const auto& v) { return u + v; });
      const auto [mean, rstd] = row_moments(s, C, eps);
      const Vec vmean(mean), vrstd(rstd);
      int64_t c = 0;
      for (; c + kStep<T> <= C; c += kStep<T>) {
        Vec s0, s1, w0, w1, b0, b1;
        load2(s + c, s0, s1);
        load2(weight + c, w0, w1);
        load2(bias + c, b0, b1);
        store2(
            out + o + c, at::vec::fmadd((s0 - vmean) * vrstd, w0, b0),
            at::vec::fmadd((s1 - vmean) * vrstd, w1, b1));
      }
      for (; c < C; ++c) {
        out[o + c] = static_cast<T>((Acc(s[c]) - mean) * rstd * Acc(weight[c]) + Acc(bias[c]));
      }
    }
  });
}

// With xhat = (s - mean) * rstd and g = grad_out * weight:
//   grad_s = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_residual_out
//   grad_weight = sum over rows of grad_out * xhat, grad_bias = sum of grad_out
// The column sums go to per-block partials (NOTE: [Deterministic partial sums]).
template <typename T>
void backward_kernel(
    const T* grad_out, const T* grad_res /* may be null */, const T* s, const T* weight,
    T* grad_s, acc_t<T>* weight_partials, acc_t<T>* bias_partials, int64_t blocks,
    int64_t rows, int64_t C, double eps) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kVec = Vec::size();
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      Acc* part_w = weight_partials + block * C;
      Acc* part_b = bias_partials + block * C;
      const auto [row_begin, row_end] = block_range(rows, blocks, block);
      for (int64_t r = row_begin; r < row_end; ++r) {
        const int64_t o = r * C;
        const auto [mean, rstd] = row_moments(s + o, C, eps);
        const Vec vmean(mean), vrstd(rstd);

        // Pass 1: the two row means of the formula, and the column partials.
        Vec acc_g(0), acc_gx(0);
        int64_t c = 0;
        for (; c + kStep<T> <= C; c += kStep<T>) {
          Vec dy[2], sv[2], w[2];
          load2(grad_out + o + c, dy[0], dy[1]);
          load2(s + o + c, sv[0], sv[1]);
          load2(weight + c, w[0], w[1]);
          for (int h = 0; h < 2; ++h) {
            const Vec xhat = (sv[h] - vmean) * vrstd;
            const Vec g = dy[h] * w[h];
            acc_g = acc_g + g;
            acc_gx = acc_gx + g * xhat;
            Acc* pw = part_w + c + h * kVec;
            Acc* pb = part_b + c + h * kVec;
            (Vec::loadu(pw) + dy[h] * xhat).store(pw);
            (Vec::loadu(pb) + dy[h]).store(pb);
          }
        }
        Acc sum_g = reduce_add(acc_g);
        Acc sum_gx = reduce_add(acc_gx);
        for (; c < C; ++c) {
          const Acc dy = grad_out[o + c];
          const Acc xhat = (Acc(s[o + c]) - mean) * rstd;
          const Acc g = dy * Acc(weight[c]);
          sum_g += g;
          sum_gx += g * xhat;
          part_w[c] += dy * xhat;
          part_b[c] += dy;
        }

        // Pass 2: grad_s.
        const Acc mean_g = sum_g / Acc(C), mean_gx = sum_gx / Acc(C);
        const Vec vmean_g(mean_g), vmean_gx(mean_gx);
        c = 0;
        for (; c + kStep<T> <= C; c += kStep<T>) {
          Vec dy[2], sv[2], w[2], dr[2] = {Vec(0), Vec(0)}, ds[2];
          load2(grad_out + o + c, dy[0], dy[1]);
          load2(s + o + c, sv[0], sv[1]);
          load2(weight + c, w[0], w[1]);
          if (grad_res != nullptr) load2(grad_res + o + c, dr[0], dr[1]);
          for (int h = 0; h < 2; ++h) {
            const Vec xhat = (sv[h] - vmean) * vrstd;
            ds[h] = vrstd * (dy[h] * w[h] - vmean_g - xhat * vmean_gx) + dr[h];
          }
          store2(grad_s + o + c, ds[0], ds[1]);
        }
        for (; c < C; ++c) {
          const Acc xhat = (Acc(s[o + c]) - mean) * rstd;
          const Acc g = Acc(grad_out[o + c]) * Acc(weight[c]);
          const Acc dr = grad_res != nullptr ? Acc(grad_res[o + c]) : Acc(0);
          grad_s[o + c] = static_cast<T>(rstd * (g - mean_g - xhat * mean_gx) + dr);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cpu(
    const at::Tensor& x,
    const at::Tensor& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  check_add_layer_norm(x, residual, weight, bias, eps);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu(), "add_layer_norm_cpu: x must be a CPU tensor");

  const at::Tensor x_dense = x.contiguous();
  const at::Tensor residual_dense = residual.contiguous();
  const at::Tensor w = param_or(weight, x, 1);
  const at::Tensor b = param_or(bias, x, 0);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor residual_out = at::empty(x.sizes(), x.options());
  const int64_t C = x.size(-1);
  if (x.numel() == 0) return {out, residual_out};

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_layer_norm_cpu", [&] {
    forward_kernel<scalar_t>(
        x_dense.const_data_ptr<scalar_t>(), residual_dense.const_data_ptr<scalar_t>(),
        w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), residual_out.mutable_data_ptr<scalar_t>(),
        x.numel() / C, C, eps);
  });
  return {out, residual_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cpu(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out,
    const std::optional<at::Tensor>& weight,
    double eps) {
  const int64_t C =
      check_add_layer_norm_backward(grad_out, grad_residual_out, residual_out, weight);
  TORCH_INTERNAL_ASSERT(
      residual_out.device().is_cpu(), "add_layer_norm_backward_cpu: tensors must be on the CPU");

  const at::Tensor grad_out_dense = grad_out.contiguous();
  const at::Tensor s_dense = residual_out.contiguous();
  at::Tensor grad_res_dense;
  if (grad_residual_out.has_value()) grad_res_dense = grad_residual_out->contiguous();
  const at::Tensor w = param_or(weight, residual_out, 1);
  at::Tensor grad_s = at::empty(residual_out.sizes(), residual_out.options());

  const at::ScalarType dtype = residual_out.scalar_type();
  const int64_t rows = C == 0 ? 0 : residual_out.numel() / C;
  const int64_t blocks = rows == 0 ? 1 : num_row_blocks(rows, C);
  const auto acc_options = residual_out.options().dtype(at::toOpMathType(dtype));
  at::Tensor weight_partials = at::zeros({blocks, C}, acc_options);
  at::Tensor bias_partials = at::zeros({blocks, C}, acc_options);

  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "add_layer_norm_backward_cpu", [&] {
      using Acc = acc_t<scalar_t>;
      backward_kernel<scalar_t>(
          grad_out_dense.const_data_ptr<scalar_t>(),
          grad_res_dense.defined() ? grad_res_dense.const_data_ptr<scalar_t>() : nullptr,
          s_dense.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          grad_s.mutable_data_ptr<scalar_t>(), weight_partials.mutable_data_ptr<Acc>(),
          bias_partials.mutable_data_ptr<Acc>(), blocks, rows, C, eps);
    });
  }
  return {grad_s, weight_partials.sum(0).to(dtype), bias_partials.sum(0).to(dtype)};
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("add_layer_norm", &add_layer_norm_cpu);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cpu);
}

}  // namespace torchgraph::cpu
