// depthwise_conv2d_inference: act(conv2d(x, weight, bias, groups=C)) for 3x3,
// 5x5 and 7x7 depthwise filters, on channels_last (NHWC) activations. Inference only.
//
// Why: in NHWC every filter tap of a depthwise convolution is one contiguous
// run of C channels, multiplied elementwise by that tap's C weights: the
// convolution is K*K vector FMAs an output pixel and channel block (nine for
// 3x3), with a few output pixels' accumulators kept in registers. oneDNN's
// depthwise kernel (torch's mkldnn::_convolution_pointwise) costs ~25-30 us a
// call even on 2x2 maps (the deep layers of MobileNetV2 at
// 64x64, or at batch 1), most of it outside the arithmetic; this kernel takes
// 6-15 us there and also wins on the large maps in float32 (NOTE: [Depthwise
// convolutions] in torchgraph/fused/conv.py has the measurements).
//
// Layout: x is read channels_last (made so if it is not), the output is
// channels_last. weight [C, 1, K, K] (K = 3, 5 or 7) is read as its K*K taps of C
// channels ([K, K, C] in memory: strides (1, *, KC, C)); other strides are
// copied into that form first (tg.optimize's convolution plans keep the weight
// in it). A 3x3 block's nine weight vectors stay in registers; a 5x5 block's 25
// (a 7x7 block's 49) are read from L1, each once per tap for several output pixels.
// Sums run in float32 from the bias, one tap at a time (kh, then kw); bfloat16
// is widened on load and rounded once at the store, as oneDNN's bfloat16
// convolution (float32 accumulation) does.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "../common.h"
#include "depthwise_rows.h"
#include "epilogue_acts.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

using depthwise::Geometry;
using depthwise::ImageRows;

template <typename T, int K>
void depthwise_kernel(const T* x, const T* taps, const T* bias, T* y, int64_t N, const Geometry& g, Act act) {
  using depthwise::kBlock;
  const int64_t blocks = (g.C + kBlock - 1) / kBlock;
  const int64_t rows = N * g.OH;
  // Work items: (a run of output rows, channel block). NOTE: loading a block's K*K weight vectors
  // costs as much as a few pixels, so a run holds ~128 output pixels (small maps: many rows), but
  // short enough to give each thread four items, so that a batch-1 map a few rows high still splits.
  const int64_t per_thread = std::max<int64_t>(1, rows * blocks / (4 * at::get_num_threads()));
  const int64_t run = std::min(std::max<int64_t>(1, (128 + g.OW - 1) / g.OW), per_thread);
  const int64_t runs = (rows + run - 1) / run;
  const ImageRows<T> source{x, g.H, g.W, g.C};
  at::parallel_for(0, runs * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row0 = item / blocks * run, row1 = std::min(rows, row0 + run), c = (item % blocks) * kBlock;
      depthwise::rows_channel_block<T, K>(source, taps, bias, y, g, row0, row1, c, act);
    }
  });
}

void check_depthwise_conv2d_inference(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding) {
  constexpr const char* op = "depthwise_conv2d_inference";
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op,
              ": x must be 4-D (N, C, H, W) with non-zero C, H, W, got shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                  (weight.size(2) == 3 || weight.size(2) == 5 || weight.size(2) == 7) &&
                  weight.size(3) == weight.size(2),
              op, ": weight must have shape [", C,
              ", 1, K, K] with K 3, 5 or 7 (one 3x3, 5x5 or 7x7 filter per channel of x), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype must equal x dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape [", C, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype must equal x dtype ", x.scalar_type(),
                ", got ", bias->scalar_type());
  }
  check_stride(op, stride);
  check_padding(op, padding);
  check_padded_map(op, x, padding, weight.size(2), weight.size(2));
}

template <typename T>
void run_depthwise(const at::Tensor& x, const at::Tensor& taps, const at::Tensor& bias, at::Tensor& y,
                   const Geometry& g, Act act, int64_t K) {
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  auto kernel = K == 3 ? &depthwise_kernel<T, 3> : K == 5 ? &depthwise_kernel<T, 5> : &depthwise_kernel<T, 7>;
  kernel(x.const_data_ptr<T>(), taps.const_data_ptr<T>(), b, y.mutable_data_ptr<T>(), x.size(0), g, act);
}

}  // namespace

at::Tensor depthwise_conv2d_inference_cpu(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                          at::IntArrayRef padding, c10::string_view act_name) {
  check_depthwise_conv2d_inference(x, weight, bias, stride, padding);
  const Act act = parse_act(std::string(act_name), "depthwise_conv2d_inference", /*gelus=*/false);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = weight.size(2);
  const Geometry g{C, H, W, (H + 2 * padding[0] - K) / stride[0] + 1, (W + 2 * padding[1] - K) / stride[1] + 1,
                   stride[0], stride[1], padding[0], padding[1]};
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  // The taps [K, K, C]: a no-op for a weight already in that form (strides (1, *, KC, C)).
  const at::Tensor taps = weight.permute({2, 3, 1, 0}).contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({N, C, g.OH, g.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (N == 0) return y;
  if (x.scalar_type() == at::kBFloat16) {
    run_depthwise<at::BFloat16>(xc, taps, b, y, g, act, K);
  } else {
    run_depthwise<float>(xc, taps, b, y, g, act, K);
  }
  return y;
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("depthwise_conv2d_inference", &depthwise_conv2d_inference_cpu);
}

}  // namespace torchgraph::cpu
