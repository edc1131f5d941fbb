// winograd_conv2d_inference: act(conv2d(x, weight, bias, stride=1, padding) + residual) for 3x3 filters, float32,
// by Winograd's minimal filtering F(2x2, 3x3), on channels_last maps. Inference only.
//
// Why: on a CPU with AVX2 only, oneDNN's direct 3x3 convolution already runs at the machine's peak
// multiply rate (ResNet-50's, 2 threads: 115-165 GFLOP/s; an implicit GEMM of torchgraph's own on the
// same register tiles was level with it), so fewer multiplies is what is left. F(2x2, 3x3) computes each
// 2x2 block of outputs from a 4x4 tile of inputs with 16 products per input-output channel pair instead of
// 36 (NOTE: [Winograd convolutions] in torchgraph/fused/conv.py has the measurements):
//   V = B^T d B (the input tile),  U = G g G^T (the filter, ops.winograd_filters, once per weight),
//   Y = A^T (U . V) A (the 2x2 outputs), the sum over input channels inside the product U . V,
// i.e. 16 GEMMs (tiles x C) @ (C x K), one per position of the 4x4 transformed tile.
//
// Layout: x is read channels_last (made so if it is not); filters is (16, ceil(K / 16), C, 16): for each of
// the 16 positions (i, j) of the transformed tile, the (i, j) elements of every G g G^T as gemm_act's panels
// of 16 output channels (zeros beyond K); the output is channels_last. Phases: the input transform writes V
// (16, T, C) for the T = N * ceil(H_out / 2) * ceil(W_out / 2) tiles (zeros outside the map: the padding),
// the 16 GEMMs run on gemm_act's register tiles (csrc/cpu/gemm_act.h; a prototype on torch's at::bmm measured
// about the same per layer, 0.65-0.88x oneDNN's time in one run), and the output transform adds the bias and the
// residual, applies the activation and stores the pixels inside the output. Every element of V, U . V and
// Y is a float32 sum; the transforms add and subtract only (their matrices hold 0, +-1; G's halves are
// applied once, to the filters, in float64).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "../common.h"
#include "epilogue_acts.h"
#include "gemm_act.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

using FVec = Vectorized<float>;
constexpr int kLanes = FVec::size();
// Tiles a task transforms together (the work of one at::parallel_for grain).
constexpr int64_t kTileGrain = 16;

C10_ALWAYS_INLINE FVec load(const float* p, int n) {
  return n == kLanes ? FVec::loadu(p) : FVec::loadu(p, n);
}

C10_ALWAYS_INLINE void store(const FVec& v, float* p, int n) {
  n == kLanes ? v.store(p) : v.store(p, n);
}

struct Geometry {
  int64_t N, C, H, W, K, ph, pw, Ho, Wo, th, tw, T;
};

// V[4r + c][t][:] = (B^T d B)[r][c] for tile t's 4x4 inputs d, with
// B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
void input_transform(const float* x, const Geometry& g, float* V) {
  const int64_t plane = g.T * g.C;
  at::parallel_for(0, g.T, kTileGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
      const int64_t iy = 2 * ty - g.ph, ix = 2 * tx - g.pw;
      const float* in[4][4];
      for (int r = 0; r < 4; ++r) {
        for (int c = 0; c < 4; ++c) {
          const int64_t y = iy + r, xx = ix + c;
          in[r][c] = y >= 0 && y < g.H && xx >= 0 && xx < g.W ? x + ((n * g.H + y) * g.W + xx) * g.C : nullptr;
        }
      }
      for (int64_t ch = 0; ch < g.C; ch += kLanes) {
        const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g.C - ch));
        FVec d[4][4];
        for (int r = 0; r < 4; ++r) {
          for (int c = 0; c < 4; ++c) d[r][c] = in[r][c] ? load(in[r][c] + ch, lanes) : FVec(0.f);
        }
        FVec rows[4][4];  // B^T d
        for (int c = 0; c < 4; ++c) {
          rows[0][c] = d[0][c] - d[2][c];
          rows[1][c] = d[1][c] + d[2][c];
          rows[2][c] = d[2][c] - d[1][c];
          rows[3][c] = d[1][c] - d[3][c];
        }
        float* out = V + t * g.C + ch;
        for (int r = 0; r < 4; ++r) {  // (B^T d) B
          store(rows[r][0] - rows[r][2], out + (4 * r + 0) * plane, lanes);
          store(rows[r][1] + rows[r][2], out + (4 * r + 1) * plane, lanes);
          store(rows[r][2] - rows[r][1], out + (4 * r + 2) * plane, lanes);
          store(rows[r][1] - rows[r][3], out + (4 * r + 3) * plane, lanes);
        }
      }
    }
  });
}

// y's 2x2 outputs of tile t = act(A^T m A + bias + residual) for its 16 products m = M[:, t], with
// A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]; the outputs beyond H_out, W_out (odd sizes) are not stored.
// residual (channels_last, y's shape) or null.
template <Act A>
void output_transform(const float* M, const float* bias, const float* residual, const Geometry& g, float* y) {
  const int64_t plane = g.T * g.K;
  at::parallel_for(0, g.T, kTileGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (g.th * g.tw), oy = 2 * ((t / g.tw) % g.th), ox = 2 * (t % g.tw);
      const bool second_row = oy + 1 < g.Ho, second_col = ox + 1 < g.Wo;
      const int64_t pixel = ((n * g.Ho + oy) * g.Wo + ox) * g.K;
      float* out = y + pixel;
      const float* res = residual ? residual + pixel : nullptr;
      for (int64_t ch = 0; ch < g.K; ch += kLanes) {
        const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g.K - ch));
        const float* m = M + t * g.K + ch;
        FVec cols[2][4];  // A^T m
        for (int c = 0; c < 4; ++c) {
          const FVec m0 = load(m + (0 + c) * plane, lanes), m1 = load(m + (4 + c) * plane, lanes);
          const FVec m2 = load(m + (8 + c) * plane, lanes), m3 = load(m + (12 + c) * plane, lanes);
          cols[0][c] = m0 + m1 + m2;
          cols[1][c] = m1 - m2 - m3;
        }
        const FVec b = bias ? load(bias + ch, lanes) : FVec(0.f);
        for (int r = 0; r < 2; ++r) {  // (A^T m) A
          if (r == 1 && !second_row) break;
          float* row = out + r * g.Wo * g.K + ch;
          FVec left = cols[r][0] + cols[r][1] + cols[r][2] + b;
          FVec right = cols[r][1] - cols[r][2] - cols[r][3] + b;
          if (res) {
            const float* res_row = res + r * g.Wo * g.K + ch;
            left = left + load(res_row, lanes);
            if (second_col) right = right + load(res_row + g.K, lanes);
          }
          store(activate(left, A), row, lanes);
          if (second_col) store(activate(right, A), row + g.K, lanes);
        }
      }
    }
  });
}

// NOTE: [Winograd phases] V and M are 4x the input and the output, and the three phases make three trips
// through memory, which cost more than the products saved where the channels are few (32 channels on
// 112x112 maps: 1.4x oneDNN's time). Running blocks of tiles through all three phases while they are in L2
// (each task's GEMMs single-threaded) took that to 1.06-1.14x but gained nothing from 64 channels up
// (0.87x against 0.84x on 56x56 maps) and lost where the 16 filter matrices, re-read for every block, are
// the larger operand (128 channels on 28x28: 0.82x against 0.61x). So the phases run over the whole map,
// each parallel on its own, and tg.optimize leaves convolutions of fewer than 64 channels to oneDNN.
template <Act A>
void run(const float* x, const float* filters, const float* bias, const float* residual, const Geometry& g,
         float* y) {
  const int64_t filter_size = (g.K + kGemmPanel - 1) / kGemmPanel * g.C * kGemmPanel;
  const std::unique_ptr<float[]> V(new float[16 * g.T * g.C]), M(new float[16 * g.T * g.K]);  // not zeroed
  input_transform(x, g, V.get());
  for (int64_t i = 0; i < 16; ++i) {  // M[i] = V[i] @ U[i]
    gemm_act(V.get() + i * g.T * g.C, g.C, g.T, g.C, filters + i * filter_size, g.K, nullptr, nullptr, 0, Act::kNone,
             M.get() + i * g.T * g.K, g.K);
  }
  output_transform<A>(M.get(), bias, residual, g, y);
}

void check_winograd_conv2d_inference(const at::Tensor& x, const at::Tensor& filters,
                                     const std::optional<at::Tensor>& bias, int64_t out_channels,
                                     at::IntArrayRef padding, const std::optional<at::Tensor>& residual) {
  const char* op = "winograd_conv2d_inference";
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op,
              ": x must be 4-D (N, C, H, W) with non-zero C, H, W, got shape ", x.sizes());
  TORCH_CHECK(filters.scalar_type() == at::kFloat, op, ": filters must be float32, got ", filters.scalar_type());
  const int64_t panels = (out_channels + kGemmPanel - 1) / kGemmPanel;
  TORCH_CHECK(out_channels > 0 && filters.dim() == 4 && filters.size(0) == 16 && filters.size(1) == panels &&
                  filters.size(2) == x.size(1) && filters.size(3) == kGemmPanel,
              op, ": filters must have shape [16, ", panels, ", ", x.size(1), ", 16] for ", out_channels,
              " output channels and ", x.size(1), " input channels (ops.winograd_filters(weight)), got ",
              filters.sizes());
  check_float32_bias(op, "bias", bias, out_channels);
  check_padding(op, padding);
  const auto [height, width] = check_padded_map(op, x, padding, 3, 3);
  if (residual.has_value()) {
    const std::vector<int64_t> shape{x.size(0), out_channels, height - 2, width - 2};
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape), op, ": residual must have the output's shape ",
                at::IntArrayRef(shape), ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == at::kFloat, op, ": residual must be float32, got ",
                residual->scalar_type());
  }
}

}  // namespace

at::Tensor winograd_conv2d_inference_cpu(const at::Tensor& x_in, const at::Tensor& filters_in,
                                         const std::optional<at::Tensor>& bias_in, int64_t out_channels,
                                         at::IntArrayRef padding, c10::string_view act_name,
                                         const std::optional<at::Tensor>& residual_in) {
  check_winograd_conv2d_inference(x_in, filters_in, bias_in, out_channels, padding, residual_in);
  const Act act = parse_act(std::string(act_name), "winograd_conv2d_inference", /*gelus=*/true);
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor filters = filters_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const at::Tensor residual =
      residual_in.has_value() ? residual_in->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  Geometry g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3), g.K = out_channels;
  g.ph = padding[0], g.pw = padding[1];
  g.Ho = g.H + 2 * g.ph - 2, g.Wo = g.W + 2 * g.pw - 2;
  g.th = (g.Ho + 1) / 2, g.tw = (g.Wo + 1) / 2, g.T = g.N * g.th * g.tw;
  at::Tensor y = at::empty({g.N, g.K, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (g.T == 0) return y;
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const float* rp = residual.defined() ? residual.const_data_ptr<float>() : nullptr;
  const float* xp = x.const_data_ptr<float>();
  const float* up = filters.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  switch (act) {
    case Act::kNone: return run<Act::kNone>(xp, up, bp, rp, g, yp), y;
    case Act::kRelu: return run<Act::kRelu>(xp, up, bp, rp, g, yp), y;
    case Act::kRelu6: return run<Act::kRelu6>(xp, up, bp, rp, g, yp), y;
    case Act::kSilu: return run<Act::kSilu>(xp, up, bp, rp, g, yp), y;
    case Act::kHardswish: return run<Act::kHardswish>(xp, up, bp, rp, g, yp), y;
    case Act::kGelu: return run<Act::kGelu>(xp, up, bp, rp, g, yp), y;
    case Act::kGeluTanh: return run<Act::kGeluTanh>(xp, up, bp, rp, g, yp), y;
  }
  return y;
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("winograd_conv2d_inference", &winograd_conv2d_inference_cpu);
}

}  // namespace torchgraph::cpu
