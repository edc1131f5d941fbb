// expand_depthwise_conv2d_inference: act(depthwise(expand_act(conv1x1(x) + expand_bias)) + bias), float32, the first
// two convolutions of a MobileNetV2 / EfficientNet inverted residual block in one pass, on channels_last maps.
// Inference only.
//
// Why: the block's 1x1 expansion widens the map 4-6 times (MobileNetV2 b1 224x224: 16 -> 96 channels on 112x112, a
// 4.8 MB map), and the depthwise convolution reads it straight back. Run apart, the expanded map goes out to memory
// and back: on the AMD EPYC (AVX2, 2 threads) ONNX Runtime ran those two layers 1.3-1.8x faster than the GEMM and
// depthwise kernels did, its profile showed, with no fewer multiplies. Here the expanded rows never leave the cache
// (NOTE: [Expanded rows in a ring]; NOTE: [Inverted residuals in one pass] in torchgraph/fused/conv_expand.py has the
// measurements).
//
// NOTE: [Expanded rows in a ring] Each task takes one image's output rows (a band of them) for a part of the
// channels: whole blocks of kGemmBlock channels, one register tile's columns and the depthwise row loops' channel
// block. It keeps the expanded input rows the depthwise filter reads in a ring of R rows (row ih in slot ih % R;
// R = K + (step - 1) * stride, the inputs of `step` output rows, as many as fit in kRingBytes), computes each
// expanded row once, when the first output row needs it, with gemm_act_blocked (csrc/cpu/gemm_act.h: the
// expansion's bias and activation in its epilogue), and runs the depthwise kernel's row loops (csrc/cpu/
// depthwise_rows.h) on the ring, `step` output rows at a time. Rows in the padding are zeros of the expanded map
// (not expansions of zeros): the row loops skip them.
// - The ring is stored by channel block, each block's rows contiguous ([block][slot][W][kGemmBlock]), so that the
//   row loops, one block at a time, read it in order: the depthwise pass took 0.81-0.87x the time of the same
//   loops on NHWC rows (MobileNetV2's b1 maps and b8 4x4, 2 threads, a standalone build of the loops, ad hoc).
// - A batch with fewer images than threads is split into bands of output rows where each band has kLongBand rows
//   or more (a band recomputes the K - stride expanded rows it shares with the band before), else by channels
//   first, then, where there are more threads than channel blocks, into bands too. Split by bands alone (as the
//   first version was), 2 threads on one 14x14 map each computed 8 of its 14 rows, and a ring of 8 rows left a
//   last step of one row, a GEMM of 14 rows reading all the weights; split by channels, each thread reads the
//   whole input, which cost more than the recomputed rows on maps of 28 output rows and more (1.08-1.12x).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>

#include "../common.h"
#include "depthwise_rows.h"
#include "epilogue_acts.h"
#include "gemm_act.h"

namespace torchgraph::cpu {
namespace {

using depthwise::Geometry;

// The expanded rows of one image that a task has computed, R of them at a time, for channels c0 on, by channel
// block (NOTE: [Expanded rows in a ring]).
struct RingRows {
  const float* ring;
  int64_t H, R, W, c0;
  C10_ALWAYS_INLINE const float* operator()(int64_t /*n*/, int64_t ih, int64_t c) const {
    return ih < 0 || ih >= H ? nullptr : ring + ((c - c0) / kGemmBlock * R + ih % R) * W * kGemmBlock;
  }
  C10_ALWAYS_INLINE int64_t stride() const { return kGemmBlock; }
};
static_assert(kGemmBlock == depthwise::kBlock, "the ring's blocks must be the row loops' channel blocks");

// Bytes of expanded rows a task keeps (half of this CPU's L2): the ring holds as many rows as fit, so that each step
// computes several output rows (each channel block's weights loaded once for them).
constexpr int64_t kRingBytes = 256 * 1024;

// Output rows of a band that make its recomputed rows (K - stride of them) few enough to split by bands.
constexpr int64_t kLongBand = 14;

struct Expansion {
  const float* x;  // (N, H, W, C_in)
  int64_t in_channels;
  const float* panels;
  const float* bias;
  Act act;
};

template <int K>
void run(const Expansion& e, const float* taps, const float* bias, float* y, int64_t N, const Geometry& g, Act act) {
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = (g.C + kGemmBlock - 1) / kGemmBlock;
  const int64_t per_image = std::max<int64_t>(1, (threads + N - 1) / N);  // tasks an image
  // bands of kLongBand output rows or more, else parts of the channels first (NOTE: [Expanded rows in a ring])
  const int64_t parts = g.OH >= kLongBand * per_image ? 1 : std::min(blocks, per_image);
  const int64_t bands = std::min(g.OH, (per_image + parts - 1) / parts);
  const int64_t band_rows = (g.OH + bands - 1) / bands;
  const int64_t part_blocks = (blocks + parts - 1) / parts;  // at most
  const int64_t row_size = g.W * part_blocks * kGemmBlock;  // ring elements a row
  // Output rows a step computes: as many as a ring of kRingBytes holds the inputs of (at least one).
  const int64_t fit = kRingBytes / (row_size * int64_t(sizeof(float)));
  const int64_t step = std::clamp<int64_t>((fit - K) / g.stride_h + 1, 1, band_rows);
  const int64_t R = K + (step - 1) * g.stride_h;
  const int64_t panel_floats = e.in_channels * kGemmBlock;  // one block's panels
  at::parallel_for(0, N * bands * parts, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> ring(new float[R * row_size]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (bands * parts), band = task / parts % bands, part = task % parts;
      const int64_t oh0 = band * band_rows, oh1 = std::min(g.OH, oh0 + band_rows);
      const int64_t b0 = part * blocks / parts, b1 = (part + 1) * blocks / parts;
      const int64_t c0 = b0 * kGemmBlock, c1 = std::min(g.C, b1 * kGemmBlock);
      const RingRows rows{ring.get(), g.H, R, g.W, c0};
      int64_t next = std::max<int64_t>(0, oh0 * g.stride_h - g.pad_h);  // the next input row to expand
      for (int64_t oh = oh0; oh < oh1; oh += step) {
        const int64_t last = std::min(oh1, oh + step);
        const int64_t needed = std::min(g.H, (last - 1) * g.stride_h - g.pad_h + K);
        while (next < needed) {  // rows next .. needed - 1, as few GEMMs as the ring's wrap allows
          const int64_t count = std::min(needed - next, R - next % R);
          gemm_act_blocked(e.x + (n * g.H + next) * g.W * e.in_channels, e.in_channels, count * g.W, e.in_channels,
                           e.panels + b0 * panel_floats, c1 - c0, e.bias ? e.bias + c0 : nullptr, e.act,
                           ring.get() + (next % R) * g.W * kGemmBlock, R * g.W * kGemmBlock);
          next += count;
        }
        for (int64_t c = c0; c < c1; c += kGemmBlock) {
          depthwise::rows_channel_block<float, K>(rows, taps, bias, y, g, n * g.OH + oh, n * g.OH + last, c, act);
        }
      }
    }
  });
}

void check_expand_depthwise_conv2d_inference(const at::Tensor& x, const at::Tensor& panels,
                                             const std::optional<at::Tensor>& expand_bias, int64_t mid_channels,
                                             const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                             at::IntArrayRef stride, at::IntArrayRef padding) {
  constexpr const char* op = "expand_depthwise_conv2d_inference";
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op,
              ": x must be 4-D (N, C, H, W) with non-zero C, H, W, got shape ", x.sizes());
  const int64_t count = (mid_channels + kGemmPanel - 1) / kGemmPanel;
  TORCH_CHECK(panels.scalar_type() == at::kFloat, op, ": panels must be float32, got ", panels.scalar_type());
  TORCH_CHECK(mid_channels > 0 && panels.dim() == 3 && panels.size(0) == count && panels.size(1) == x.size(1) &&
                  panels.size(2) == kGemmPanel,
              op, ": panels must have shape [", count, ", ", x.size(1), ", 16] for ", mid_channels,
              " expanded channels and ", x.size(1), " input channels (ops.gemm_panels(expand_weight)), got ",
              panels.sizes());
  check_float32_bias(op, "expand_bias", expand_bias, mid_channels);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == mid_channels && weight.size(1) == 1 &&
                  (weight.size(2) == 3 || weight.size(2) == 5 || weight.size(2) == 7) &&
                  weight.size(3) == weight.size(2),
              op, ": weight must have shape [", mid_channels,
              ", 1, K, K] with K 3, 5 or 7 (one depthwise filter per expanded channel), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, op, ": weight must be float32, got ", weight.scalar_type());
  check_float32_bias(op, "bias", bias, mid_channels);
  check_stride(op, stride);
  check_padding(op, padding);
  check_padded_map(op, x, padding, weight.size(2), weight.size(2));
}

}  // namespace

at::Tensor expand_depthwise_conv2d_inference_cpu(const at::Tensor& x_in, const at::Tensor& panels_in,
                                                 const std::optional<at::Tensor>& expand_bias_in,
                                                 int64_t mid_channels, c10::string_view expand_act_name,
                                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 c10::string_view act_name) {
  check_expand_depthwise_conv2d_inference(x_in, panels_in, expand_bias_in, mid_channels, weight, bias_in, stride,
                                          padding);
  const char* op = "expand_depthwise_conv2d_inference";
  const Act expand_act = parse_act(std::string(expand_act_name), op, /*gelus=*/true);
  const Act act = parse_act(std::string(act_name), op, /*gelus=*/false);
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor panels = panels_in.contiguous();
  const at::Tensor expand_bias = expand_bias_in.has_value() ? expand_bias_in->contiguous() : at::Tensor();
  const at::Tensor taps = weight.permute({2, 3, 1, 0}).contiguous();  // [K, K, C]: a no-op for taps_last's view
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), K = weight.size(2);
  const Geometry g{mid_channels, H, W, (H + 2 * padding[0] - K) / stride[0] + 1,
                   (W + 2 * padding[1] - K) / stride[1] + 1, stride[0], stride[1], padding[0], padding[1]};
  at::Tensor y = at::empty({N, mid_channels, g.OH, g.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (N == 0) return y;
  const Expansion e{x.const_data_ptr<float>(), x.size(1), panels.const_data_ptr<float>(),
                    expand_bias.defined() ? expand_bias.const_data_ptr<float>() : nullptr, expand_act};
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  auto kernel = K == 3 ? &run<3> : K == 5 ? &run<5> : &run<7>;
  kernel(e, taps.const_data_ptr<float>(), bp, y.mutable_data_ptr<float>(), N, g, act);
  return y;
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("expand_depthwise_conv2d_inference", &expand_depthwise_conv2d_inference_cpu);
}

}  // namespace torchgraph::cpu
