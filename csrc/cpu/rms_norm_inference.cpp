// rms_norm_inference: RMSNorm as LLaMA's code writes it (HF LlamaRMSNorm
// and Mistral's, Qwen2's): in float32, n = x * rsqrt(mean(x^2) + eps)
// over the last dim, rounded to x's dtype, then weight * n in that dtype.
// With weight_in_float32, as torch's own nn.RMSNorm / F.rms_norm compute it
// on CPU: weight * n in float32, rounded once. Without a weight: n.
//
// Why: written out, that is seven elementwise ops and two dtype casts per
// norm (pow, mean, add, rsqrt, mul, to, mul), each a pass over the
// activations; in a bfloat16 graph each cast and op also converts. One task
// handles whole rows here (the row stays in L1 between its two passes), so
// the kernel reads x twice and writes the output once. Forward only.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

void check_rms_norm_inference(const at::Tensor& x, const std::optional<at::Tensor>& weight_opt) {
  constexpr const char* op = "rms_norm_inference";
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dim, got shape ", x.sizes());
  if (!weight_opt.has_value()) {
    return;
  }
  const at::Tensor& weight = *weight_opt;
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape [", x.size(-1),
              "] (x's last dim), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype must equal x dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
}

// weight == nullptr: no weight; kWeightInFloat: weight * n in float32 (torch's rounding), else n is
// rounded to T first (HF's).
template <typename T, bool kWeightInFloat>
void forward_kernel(const T* x, const T* weight, T* out, int64_t rows, int64_t C, float eps) {
  using Vec = AccVec<T>;
  at::parallel_for(0, rows, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * C;
      T* o = out + r * C;
      const float squares = sum_row(xr, C, [](const auto& v) { return v * v; });
      const float rstd = 1.f / std::sqrt(squares / float(C) + eps);
      const Vec vrstd(rstd);
      int64_t c = 0;
      for (; c + kStep<T> <= C; c += kStep<T>) {
        Vec x0, x1, w0, w1, n0, n1;
        load2(xr + c, x0, x1);
        if (weight == nullptr) {
          store2(o + c, x0 * vrstd, x1 * vrstd);
        } else if constexpr (kWeightInFloat) {
          load2(weight + c, w0, w1);
          store2(o + c, w0 * (x0 * vrstd), w1 * (x1 * vrstd));
        } else {
          store2(o + c, x0 * vrstd, x1 * vrstd);  // n rounded to T, as `.to(input_dtype)`
          load2(o + c, n0, n1);
          load2(weight + c, w0, w1);
          store2(o + c, w0 * n0, w1 * n1);
        }
      }
      for (; c < C; ++c) {
        const float n = float(xr[c]) * rstd;
        if (weight == nullptr) {
          o[c] = T(n);
        } else if constexpr (kWeightInFloat) {
          o[c] = T(float(weight[c]) * n);
        } else {
          o[c] = T(float(weight[c]) * float(T(n)));
        }
      }
    }
  });
}

template <typename T>
void dispatch_rounding(const at::Tensor& x, const at::Tensor* weight, at::Tensor& out, double eps,
                       bool weight_in_float32) {
  const int64_t C = x.size(-1), rows = x.numel() / C;
  const T* w = weight == nullptr ? nullptr : weight->const_data_ptr<T>();
  auto* kernel = weight_in_float32 ? &forward_kernel<T, true> : &forward_kernel<T, false>;
  kernel(x.const_data_ptr<T>(), w, out.mutable_data_ptr<T>(), rows, C, static_cast<float>(eps));
}

}  // namespace

at::Tensor rms_norm_inference_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps,
                                  bool weight_in_float32) {
  check_rms_norm_inference(x, weight);
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor* w = weight.has_value() ? &wc : nullptr;
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  if (xc.scalar_type() == at::kBFloat16) {
    dispatch_rounding<at::BFloat16>(xc, w, out, eps, weight_in_float32);
  } else {
    dispatch_rounding<float>(xc, w, out, eps, weight_in_float32);
  }
  return out;
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("rms_norm_inference", &rms_norm_inference_cpu);
}

}  // namespace torchgraph::cpu
