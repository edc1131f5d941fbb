// Argument checks and shape helpers shared by the CPU and CUDA kernels.
//
// Every check here has a twin in torchgraph/ops.py (the fake kernels and the
// pure-PyTorch references use it), with the same message text, so an op fails
// the same way whether it runs a C++ kernel, a CUDA kernel or the reference.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>

#include <optional>
#include <utility>
#include <vector>

namespace torchgraph {

// ---------------------------------------------------------------- dtypes

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, op, ": ", name,
      " must be float32, float64 or bfloat16, got ", dtype);
}

// `other` must match `x` in dtype and device (no implicit promotion or copies).
inline void check_like(
    const char* op, const char* name, const at::Tensor& other, const at::Tensor& x) {
  TORCH_CHECK(
      other.scalar_type() == x.scalar_type(), op, ": ", name,
      " dtype must equal x dtype ", x.scalar_type(), ", got ", other.scalar_type());
  TORCH_CHECK(
      other.device() == x.device(), op, ": ", name, " must be on x's device ",
      x.device(), ", got ", other.device());
}

// ---------------------------------------------------------------- convolution kernels' arguments
// (the float32 inference convolutions: depthwise, Winograd, implicit GEMM, expansion + depthwise)

inline void check_stride(const char* op, at::IntArrayRef stride) {
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, op,
              ": stride must be two positive ints, got ", stride);
}

inline void check_padding(const char* op, at::IntArrayRef padding) {
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
}

// x (N, C, H, W) padded by `padding` (checked) holds a kh x kw filter; returns the padded height and width.
inline std::pair<int64_t, int64_t> check_padded_map(
    const char* op, const at::Tensor& x, at::IntArrayRef padding, int64_t kh, int64_t kw) {
  const int64_t height = x.size(2) + 2 * padding[0], width = x.size(3) + 2 * padding[1];
  TORCH_CHECK(height >= kh && width >= kw, op, ": the padded input ", height, "x", width,
              " is smaller than the ", kh, "x", kw, " filter");
  return {height, width};
}

// A float32 bias of `channels` elements, where one is given.
inline void check_float32_bias(
    const char* op, const char* name, const std::optional<at::Tensor>& bias, int64_t channels) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == channels, op, ": ", name, " must have shape [",
              channels, "], got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              bias->scalar_type());
}

// ---------------------------------------------------------------- layout

// NOTE: [Memory format rule]
// Elementwise kernels work on dense buffers. A 4-D input that is channels_last
// (and not also plain contiguous) keeps that layout, so ResNet-style
// channels_last activations are not transposed twice; anything else is made
// contiguous. _dense_format() in torchgraph/ops.py is the same rule for the fake
// kernels: the two must agree exactly or opcheck reports a stride mismatch.
inline at::MemoryFormat dense_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() &&
      x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// A dense tensor seen as [outer, size, inner] around logical dim `dim`, in the
// physical (memory) order of `format`: element (o, c, i) is at o*size*inner +
// c*inner + i. For NCHW channels_last and dim=1 this gives inner=1.
struct SplitDims {
  int64_t outer;
  int64_t size;
  int64_t inner;
};

inline SplitDims split_at_dim(const at::Tensor& x, int64_t dim, at::MemoryFormat format) {
  std::vector<int64_t> order(x.dim());  // logical dims, outermost first in memory
  for (int64_t d = 0; d < x.dim(); ++d) order[d] = d;
  if (format == at::MemoryFormat::ChannelsLast) order = {0, 2, 3, 1};
  SplitDims split{1, x.size(dim), 1};
  bool after = false;
  for (int64_t d : order) {
    if (d == dim) {
      after = true;
    } else {
      (after ? split.inner : split.outer) *= x.size(d);
    }
  }
  return split;
}

// ---------------------------------------------------------------- bias_act

enum class Activation { kNone, kRelu, kGelu, kGeluTanh, kSilu };

inline Activation parse_activation(c10::string_view act) {
  if (act == "none") return Activation::kNone;
  if (act == "relu") return Activation::kRelu;
  if (act == "gelu") return Activation::kGelu;
  if (act == "gelu_tanh") return Activation::kGeluTanh;
  if (act == "silu") return Activation::kSilu;
  TORCH_CHECK(
      false, "bias_act: act must be one of 'none', 'relu', 'gelu', 'gelu_tanh', 'silu', got '",
      act, "'");
}

// Validates bias_act's arguments; returns `dim` wrapped into [0, x.dim()).
inline int64_t check_bias_act(const at::Tensor& x, const at::Tensor& bias, int64_t dim) {
  check_float_dtype("bias_act", "x", x);
  check_like("bias_act", "bias", bias, x);
  const int64_t ndim = x.dim();
  TORCH_CHECK(ndim >= 1, "bias_act: x must have at least one dimension, got shape ", x.sizes());
  TORCH_CHECK(
      dim >= -ndim && dim < ndim, "bias_act: dim must be in [", -ndim, ", ", ndim - 1,
      "] for x of shape ", x.sizes(), ", got ", dim);
  const int64_t wrapped = dim < 0 ? dim + ndim : dim;
  TORCH_CHECK(
      bias.dim() == 1 && bias.size(0) == x.size(wrapped), "bias_act: bias must have shape [",
      x.size(wrapped), "] (x.size(", dim, ")), got ", bias.sizes());
  return wrapped;
}

// ---------------------------------------------------------------- add_relu

inline void check_add_relu(const at::Tensor& a, const at::Tensor& b) {
  check_float_dtype("add_relu", "a", a);
  TORCH_CHECK(
      b.scalar_type() == a.scalar_type(), "add_relu: b dtype must equal a dtype ",
      a.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK(
      b.device() == a.device(), "add_relu: b must be on a's device ", a.device(), ", got ",
      b.device());
  TORCH_CHECK(
      a.sizes() == b.sizes(), "add_relu: b must have a's shape ", a.sizes(), ", got ",
      b.sizes(), " (add_relu does not broadcast)");
}

// ---------------------------------------------------------------- add_layer_norm

inline void check_add_layer_norm(
    const at::Tensor& x,
    const at::Tensor& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  check_float_dtype("add_layer_norm", "x", x);
  check_like("add_layer_norm", "residual", residual, x);
  TORCH_CHECK(
      x.dim() >= 1, "add_layer_norm: x must have at least one dimension, got shape ", x.sizes());
  TORCH_CHECK(
      residual.sizes() == x.sizes(), "add_layer_norm: residual must have x's shape ", x.sizes(),
      ", got ", residual.sizes());
  const int64_t channels = x.size(-1);
  auto check_param = [&](const char* name, const std::optional<at::Tensor>& param) {
    if (!param.has_value()) return;
    check_like("add_layer_norm", name, *param, x);
    TORCH_CHECK(
        param->dim() == 1 && param->size(0) == channels, "add_layer_norm: ", name,
        " must have shape [", channels, "] (x.size(-1)), got ", param->sizes());
  };
  check_param("weight", weight);
  check_param("bias", bias);
  TORCH_CHECK(eps >= 0, "add_layer_norm: eps must be non-negative, got ", eps);
}

// A missing LayerNorm weight/bias as a C-sized ones/zeros tensor (C = x.size(-1)), so the
// kernels have a single code path; C elements are noise next to rows * C.
inline at::Tensor param_or(const std::optional<at::Tensor>& param, const at::Tensor& x, double fill) {
  if (param.has_value()) return param->contiguous();
  return fill == 0 ? at::zeros({x.size(-1)}, x.options()) : at::ones({x.size(-1)}, x.options());
}

// ---------------------------------------------------------------- max_pool2d_inference

struct Pool2dParams {
  int64_t kernel[2];
  int64_t stride[2];
  int64_t padding[2];
  int64_t dilation[2];
  int64_t out_size[2];  // output (height, width)
};

// ---------------------------------------------------------------- qkv_attention

// Validates qkv_attention's arguments; returns D, the size of one head.
inline int64_t check_qkv_attention(const at::Tensor& qkv, int64_t heads) {
  constexpr const char* op = "qkv_attention";
  check_float_dtype(op, "qkv", qkv);
  TORCH_CHECK(
      qkv.dim() == 3, op, ": qkv must be 3-D (batch, seq, 3 * embed), got shape ", qkv.sizes());
  TORCH_CHECK(heads > 0, op, ": heads must be positive, got ", heads);
  TORCH_CHECK(
      qkv.size(2) % (3 * heads) == 0 && qkv.size(2) > 0, op,
      ": qkv.size(2) must be 3 * heads * head_dim with head_dim >= 1, got ", qkv.size(2),
      " for heads=", heads);
  TORCH_CHECK(
      qkv.size(1) <= 32768 && qkv.size(2) <= (int64_t{1} << 30), op,
      ": qkv is too large for this kernel (seq <= 32768), got shape ", qkv.sizes());
  return qkv.size(2) / (3 * heads);
}

// Argument checks of the backward ops (shared by the CPU and CUDA kernels, like the forward ones).
inline void check_bias_act_backward(const at::Tensor& grad, const at::Tensor& x) {
  check_like("bias_act_backward", "grad", grad, x);
  TORCH_CHECK(
      grad.sizes() == x.sizes(), "bias_act_backward: grad must have x's shape ", x.sizes(),
      ", got ", grad.sizes());
}

inline void check_add_relu_backward(const at::Tensor& grad, const at::Tensor& out) {
  check_float_dtype("add_relu_backward", "out", out);
  TORCH_CHECK(
      grad.scalar_type() == out.scalar_type() && grad.device() == out.device(),
      "add_relu_backward: grad must have out's dtype and device (", out.scalar_type(), ", ",
      out.device(), "), got ", grad.scalar_type(), ", ", grad.device());
  TORCH_CHECK(
      grad.sizes() == out.sizes(), "add_relu_backward: grad must have out's shape ", out.sizes(),
      ", got ", grad.sizes());
}

// Returns C, the normalized (last) dim.
inline int64_t check_add_layer_norm_backward(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out,
    const std::optional<at::Tensor>& weight) {
  constexpr const char* op = "add_layer_norm_backward";
  check_float_dtype(op, "residual_out", residual_out);
  check_like(op, "grad_out", grad_out, residual_out);
  TORCH_CHECK(
      residual_out.dim() >= 1 && grad_out.sizes() == residual_out.sizes(), op,
      ": grad_out must have residual_out's shape ", residual_out.sizes(), ", got ",
      grad_out.sizes());
  if (grad_residual_out.has_value()) {
    check_like(op, "grad_residual_out", *grad_residual_out, residual_out);
    TORCH_CHECK(
        grad_residual_out->sizes() == residual_out.sizes(), op,
        ": grad_residual_out must have residual_out's shape ", residual_out.sizes(), ", got ",
        grad_residual_out->sizes());
  }
  const int64_t C = residual_out.size(-1);
  if (weight.has_value()) {
    check_like(op, "weight", *weight, residual_out);
    TORCH_CHECK(
        weight->dim() == 1 && weight->size(0) == C, op, ": weight must have shape [", C,
        "], got ", weight->sizes());
  }
  return C;
}

inline void check_qkv_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
    const at::Tensor& probs, int64_t heads) {
  constexpr const char* op = "qkv_attention_backward";
  check_qkv_attention(qkv, heads);
  const std::vector<int64_t> out_shape{qkv.size(0), qkv.size(1), qkv.size(2) / 3};
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out}, std::pair{"out", &out}}) {
    check_like(op, name, *t, qkv);
    TORCH_CHECK(
        t->sizes() == at::IntArrayRef(out_shape), op, ": ", name, " must have shape ",
        at::IntArrayRef(out_shape), ", got ", t->sizes());
  }
  const std::vector<int64_t> probs_shape{qkv.size(0), heads, qkv.size(1), qkv.size(1)};
  TORCH_CHECK(
      probs.sizes() == at::IntArrayRef(probs_shape) && probs.device() == qkv.device(), op,
      ": probs must have shape ", at::IntArrayRef(probs_shape), " on ", qkv.device(), ", got ",
      probs.sizes(), " on ", probs.device());
}

// Same formula as ATen's pooling_output_shape.
inline int64_t pool_output_size(
    int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation, bool ceil_mode) {
  const int64_t span = in + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  // floor division also for a negative span (tiny inputs)
  int64_t out = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;
  // the last window must start inside the input or the left padding
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

inline Pool2dParams check_max_pool2d(
    const at::Tensor& x,
    at::IntArrayRef kernel_size,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    bool ceil_mode) {
  constexpr const char* op = "max_pool2d_inference";
  check_float_dtype(op, "x", x);
  TORCH_CHECK(
      (x.dim() == 3 || x.dim() == 4) && x.size(-1) > 0 && x.size(-2) > 0 && x.size(-3) > 0, op,
      ": x must be 3-D (C, H, W) or 4-D (N, C, H, W) with non-zero C, H, W, got shape ",
      x.sizes());
  if (stride.empty()) stride = kernel_size;  // the schema's default: stride = kernel_size
  const std::pair<const char*, at::IntArrayRef> args[] = {
      {"kernel_size", kernel_size},
      {"stride", stride},
      {"padding", padding},
      {"dilation", dilation}};
  for (const auto& [name, value] : args) {
    TORCH_CHECK(
        value.size() == 1 || value.size() == 2, op, ": ", name,
        " must have 1 or 2 elements, got ", value);
  }
  auto at2 = [](at::IntArrayRef v, int i) { return v.size() == 1 ? v[0] : v[i]; };
  Pool2dParams p{};
  for (int i = 0; i < 2; ++i) {
    p.kernel[i] = at2(kernel_size, i);
    p.stride[i] = at2(stride, i);
    p.padding[i] = at2(padding, i);
    p.dilation[i] = at2(dilation, i);
    TORCH_CHECK(
        p.kernel[i] > 0 && p.stride[i] > 0 && p.dilation[i] > 0, op,
        ": kernel_size, stride and dilation must be positive, got kernel_size=", kernel_size,
        ", stride=", stride, ", dilation=", dilation);
    TORCH_CHECK(
        p.padding[i] >= 0 && p.padding[i] <= p.kernel[i] / 2, op,
        ": padding must be non-negative and at most half of kernel_size, got padding=", padding,
        ", kernel_size=", kernel_size);
    const int64_t in = x.size(x.dim() - 2 + i);
    p.out_size[i] =
        pool_output_size(in, p.kernel[i], p.stride[i], p.padding[i], p.dilation[i], ceil_mode);
  }
  TORCH_CHECK(
      p.out_size[0] >= 1 && p.out_size[1] >= 1, op, ": output size ", p.out_size[0], "x",
      p.out_size[1], " is too small for input of shape ", x.sizes(),
      " (kernel_size=", kernel_size, ", dilation=", dilation, ", padding=", padding, ")");
  return p;
}

}  // namespace torchgraph
