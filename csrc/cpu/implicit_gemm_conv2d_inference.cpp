// implicit_gemm_conv2d_inference: act(conv2d(x, weight, bias, stride, padding)), float32, for convolutions with
// few input channels (a network's stem: 3 -> 32 3x3 stride 2, 3 -> 64 7x7 stride 2), answering in channels_last.
// Inference only.
//
// Why: a stem's input has 1-4 channels, so oneDNN's channels_last convolution (vectorised over input channels)
// runs it far below the machine's multiply rate: on the AMD EPYC (AVX2, 2 threads) ResNet's 7x7 stem at batch 1
// 224x224 took 2.3 ms channels_last against 1.7 ms NCHW, and MobileNetV2's 3x3 one 0.51 ms, twice ONNX Runtime's
// time (NOTE: [Stem convolutions] in torchgraph/fused/conv.py has the measurements). Written as a GEMM, the stem is
// (output pixels) x (C * kh * kw) @ (C * kh * kw) x (out channels): 27-147 deep, 32-64 wide, the shape gemm_act's
// register tiles run well, but an explicit im2col would copy every input kh * kw / stride^2 times.
//
// NOTE: [Implicit GEMM] The GEMM's rows are never built. The input is padded once into a dense NCHW copy, so
// that every window lies inside it; then the k-th element of output pixel (oy, ox)'s row is one load,
// x[(oy * sh) * Wp + ox * sw + offsets[k]], with offsets[k] = c * Hp * Wp + ky * Wp + kx for k's (ky, kx, c)
// (the column order of the GEMM's filters, ops.gemm_panels(weight.permute(0, 2, 3, 1).flatten(1))). gemm_act's
// tiles broadcast each row's element of x anyway: reading it through the offsets table (gemm_act_gathered) costs
// one load of offsets[k] per k, shared by the tile's rows. Each task is one output row (Wo pixels, every output
// channel), its output written once, with the bias and activation in registers.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../common.h"
#include "epilogue_acts.h"
#include "gemm_act.h"

namespace torchgraph::cpu {
namespace {

void check_implicit_gemm_conv2d_inference(const at::Tensor& x, const at::Tensor& panels,
                                          const std::optional<at::Tensor>& bias, int64_t out_channels,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding) {
  const char* op = "implicit_gemm_conv2d_inference";
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op,
              ": x must be 4-D (N, C, H, W) with non-zero C, H, W, got shape ", x.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0, op,
              ": kernel_size must be two positive ints, got ", kernel_size);
  check_stride(op, stride);
  check_padding(op, padding);
  TORCH_CHECK(panels.scalar_type() == at::kFloat, op, ": panels must be float32, got ", panels.scalar_type());
  const int64_t count = (out_channels + kGemmPanel - 1) / kGemmPanel;
  const int64_t depth = x.size(1) * kernel_size[0] * kernel_size[1];
  TORCH_CHECK(out_channels > 0 && panels.dim() == 3 && panels.size(0) == count && panels.size(1) == depth &&
                  panels.size(2) == kGemmPanel,
              op, ": panels must have shape [", count, ", ", depth, ", 16] for ", out_channels,
              " output channels and ", x.size(1), " input channels of ", kernel_size[0], "x", kernel_size[1],
              " (ops.gemm_panels(weight.permute(0, 2, 3, 1).flatten(1))), got ", panels.sizes());
  check_float32_bias(op, "bias", bias, out_channels);
  check_padded_map(op, x, padding, kernel_size[0], kernel_size[1]);
}

// NOTE: [Implicit GEMM]: one dense NCHW copy of x (N, C, H, W), any strides, with ph rows and pw columns of zeros
// around every map: one parallel pass over its rows, each zeroed or copied once. constant_pad_nd zeroed the whole
// copy, then copied the input in (and on a channels_last input answered channels_last, copied again): the whole op
// on MobileNetV2's 3 x 224 x 224 stem took 229-232 against 255-313 us from NCHW, 235-247 against 306-336 us from
// channels_last; ResNet's 7x7 1437-1471 against 1514-1544 us (2 threads, medians of 21 x 20 calls, ad hoc).
at::Tensor padded_nchw(const at::Tensor& x, int64_t ph, int64_t pw) {
  if (ph == 0 && pw == 0) return x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Hp = H + 2 * ph, Wp = W + 2 * pw;
  at::Tensor out = at::empty({N, C, Hp, Wp}, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  at::parallel_for(0, N * C * Hp, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* dst = op + row * Wp;
      const int64_t h = row % Hp - ph, c = row / Hp % C, n = row / (Hp * C);
      if (h < 0 || h >= H) {
        std::fill(dst, dst + Wp, 0.f);
        continue;
      }
      std::fill(dst, dst + pw, 0.f);
      std::fill(dst + pw + W, dst + Wp, 0.f);
      const float* src = xp + n * sn + c * sc + h * sh;
      if (sw == 1) {
        std::copy(src, src + W, dst + pw);
      } else {
        for (int64_t w = 0; w < W; ++w) dst[pw + w] = src[w * sw];
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor implicit_gemm_conv2d_inference_cpu(const at::Tensor& x_in, const at::Tensor& panels_in,
                                              const std::optional<at::Tensor>& bias_in, int64_t out_channels,
                                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding, c10::string_view act_name) {
  check_implicit_gemm_conv2d_inference(x_in, panels_in, bias_in, out_channels, kernel_size, stride, padding);
  const Act act = parse_act(std::string(act_name), "implicit_gemm_conv2d_inference", /*gelus=*/true);
  const int64_t ph = padding[0], pw = padding[1];
  const at::Tensor x = padded_nchw(x_in, ph, pw);
  const at::Tensor panels = panels_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t N = x.size(0), C = x.size(1), Hp = x.size(2), Wp = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t Ho = (Hp - kh) / sh + 1, Wo = (Wp - kw) / sw + 1, K = out_channels;
  at::Tensor y = at::empty({N, K, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (N == 0) return y;
  std::vector<int64_t> offsets;
  offsets.reserve(kh * kw * C);
  for (int64_t ky = 0; ky < kh; ++ky) {
    for (int64_t kx = 0; kx < kw; ++kx) {
      for (int64_t c = 0; c < C; ++c) offsets.push_back((c * Hp + ky) * Wp + kx);
    }
  }
  const float* xp = x.const_data_ptr<float>();
  const float* wp = panels.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  const int64_t depth = static_cast<int64_t>(offsets.size());
  at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // output row oy of image n, all its pixels and channels
      const int64_t n = row / Ho, oy = row % Ho;
      gemm_act_gathered(xp + (n * C * Hp + oy * sh) * Wp, sw, offsets.data(), Wo, depth, wp, K, bp, act,
                        yp + row * Wo * K, K);
    }
  });
  return y;
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("implicit_gemm_conv2d_inference", &implicit_gemm_conv2d_inference_cpu);
}

}  // namespace torchgraph::cpu
