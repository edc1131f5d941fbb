// The torchgraph operator library: every schema lives here, in the one
// TORCH_LIBRARY block the namespace may have. Kernels register themselves per
// device in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake (meta) kernels and
// autograd formulas are registered from Python in torchgraph/ops/<op>.py, except
// the inference-only ops' raising backward (csrc/no_backward.cpp).

#include <torch/library.h>

TORCH_LIBRARY(torchgraph, m) {
  // y = act(x + bias), bias broadcast along `dim` (-1: linear epilogue,
  // 1: NCHW conv epilogue). act: "none", "relu", "gelu", "gelu_tanh", "silu".
  m.def("bias_act(Tensor x, Tensor bias, str act, int dim=-1) -> Tensor");
  // -> (grad_x, grad_bias)
  m.def(
      "bias_act_backward(Tensor grad, Tensor x, Tensor bias, str act, int dim) "
      "-> (Tensor, Tensor)");

  // relu(a + b) for same-shape a and b (residual add of a ResNet block).
  m.def("add_relu(Tensor a, Tensor b) -> Tensor");
  // -> grad for both a and b, given the forward output `out`.
  m.def("add_relu_backward(Tensor grad, Tensor out) -> Tensor");

  // residual_out = x + residual; out = layer_norm(residual_out) over the last dim.
  // -> (out, residual_out)
  m.def(
      "add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, "
      "float eps=1e-05) -> (Tensor, Tensor)");
  // -> (grad of x (== grad of residual), grad_weight, grad_bias)
  m.def(
      "add_layer_norm_backward(Tensor grad_out, Tensor? grad_residual_out, "
      "Tensor residual_out, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)");

  // Multi-head attention straight from a packed projection: qkv is
  // [B, T, 3 * E] (q | k | v, heads side by side in each), out is [B, T, E]
  // (heads side by side), probs the softmax [B, heads, T, T] kept for the
  // backward. scale defaults to 1 / sqrt(E / heads). onednn: run the float32
  // CPU forward's products on oneDNN (same results up to rounding). -> (out, probs)
  m.def(
      "qkv_attention(Tensor qkv, int heads, bool causal, float? scale=None, bool onednn=False) "
      "-> (Tensor, Tensor)");
  // -> grad of qkv
  m.def(
      "qkv_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor probs, int heads, "
      "bool causal, float? scale) -> Tensor");

  // F.scaled_dot_product_attention's forward (no dropout): query [B, H, T, D],
  // key [B, H, S, D], value [B, H, S, Dv] -> [B, H, T, Dv] (enable_gqa: key and
  // value with Hk heads, H a multiple of Hk, as SDPA's);
  // attn_mask bool (True: attend) or additive, broadcast to [B, H, T, S].
  // Inference only: no backward (the attention weights are not kept).
  m.def(
      "attention_inference(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "bool is_causal=False, float? scale=None, bool enable_gqa=False) -> Tensor");

  // RMSNorm as LLaMA writes it: weight * (x * rsqrt(mean(x^2, -1) + eps)),
  // the normalisation in float32 rounded to x's dtype, then the product in
  // x's dtype; weight_in_float32: the product in float32, rounded once (torch's
  // nn.RMSNorm). No weight: the normalisation alone. Inference only: no backward.
  m.def("rms_norm_inference(Tensor x, Tensor? weight, float eps, bool weight_in_float32=False) -> Tensor");

  // act(conv2d(x, weight, bias, stride, padding, groups=C)) for 3x3, 5x5 and 7x7
  // depthwise filters: x [N, C, H, W] (read channels_last), weight [C, 1, K, K], bias [C];
  // float32 or bfloat16; act: "none", "relu", "relu6", "silu", "hardswish".
  // Answers in channels_last. Inference only: no backward.
  m.def(
      "depthwise_conv2d_inference(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "str act=\"none\") -> Tensor");

  // act(x @ W^T + bias + residual) for float32 x [M, K] (unit column stride), the filters W [N, K]
  // as panels [ceil(N / 16), K, 16] (ops.gemm_panels), residual [M, N]; act as for the depthwise
  // kernel. -> [M, N]. The GEMM of a 1x1 convolution on channels_last rows. Inference only.
  m.def(
      "gemm_act_inference(Tensor x, Tensor panels, Tensor? bias, Tensor? residual, int out_features, "
      "str act=\"none\") -> Tensor");

  // act(conv2d(x, weight, bias, stride=1, padding) + residual) for 3x3 filters by Winograd's F(2x2, 3x3):
  // x [N, C, H, W] float32 (read channels_last), filters [16, ceil(K / 16), C, 16]
  // (ops.winograd_filters(weight)), bias [K], residual of the output's shape; act as for
  // gemm_act_inference. Answers in channels_last. Inference only: no backward.
  m.def(
      "winograd_conv2d_inference(Tensor x, Tensor filters, Tensor? bias, int out_channels, int[2] padding, "
      "str act=\"none\", Tensor? residual=None) -> Tensor");

  // act(conv2d(x, weight, bias, stride, padding)) as an implicit GEMM, for convolutions with few input channels
  // (a network's stem): x [N, C, H, W] float32 (any layout), panels [ceil(K / 16), kh * kw * C, 16]
  // (ops.gemm_panels(weight.permute(0, 2, 3, 1).flatten(1))), bias [K]; act as for gemm_act_inference.
  // Answers in channels_last. Inference only: no backward.
  m.def(
      "implicit_gemm_conv2d_inference(Tensor x, Tensor panels, Tensor? bias, int out_channels, int[2] kernel_size, "
      "int[2] stride, int[2] padding, str act=\"none\") -> Tensor");

  // act(depthwise_conv2d(expand_act(x @ W^T + expand_bias), weight, bias, stride, padding)): an inverted residual
  // block's 1x1 expansion and depthwise convolution in one pass. x [N, C, H, W] float32 (read channels_last), the
  // expansion's filters W [M, C] as panels (ops.gemm_panels), expand_bias [M], expand_act as for
  // gemm_act_inference; weight [M, 1, K, K] (K 3, 5 or 7), bias [M], act as for the depthwise kernel. Answers in
  // channels_last. Inference only: no backward.
  m.def(
      "expand_depthwise_conv2d_inference(Tensor x, Tensor panels, Tensor? expand_bias, int mid_channels, "
      "str expand_act, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, str act=\"none\") -> Tensor");

  // max_pool2d without the indices output (inference only, no backward).
  m.def(
      "max_pool2d_inference(Tensor x, int[2] kernel_size, int[2] stride=[], "
      "int[2] padding=0, int[2] dilation=1, bool ceil_mode=False) -> Tensor");
}
