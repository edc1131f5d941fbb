// depthwise_conv2d_inference: act(conv2d(x, weight, bias, groups=C)) for 3x3
// depthwise filters, on channels_last (NHWC) activations. Inference only.
//
// Why: in NHWC every filter tap of a depthwise convolution is one contiguous
// run of C channels, multiplied elementwise by that tap's C weights: the
// convolution is nine vector FMAs an output pixel and channel block, with the
// block's nine weight vectors and a few output pixels' accumulators kept in
// registers. oneDNN's depthwise kernel (torch's mkldnn::_convolution_pointwise)
// costs ~25-30 us a call even on 2x2 maps (the deep layers of MobileNetV2 at
// 64x64, or at batch 1), most of it outside the arithmetic; this kernel takes
// 6-15 us there and also wins on the large maps in float32 (NOTE: [Depthwise
// convolutions] in torchgraph/fused/conv.py has the measurements).
//
// Layout: x is read channels_last (made so if it is not), the output is
// channels_last. weight [C, 1, 3, 3] is read as its nine taps of C channels
// ([3, 3, C] in memory: strides (1, *, 3C, C)); other strides are copied into
// that form first (tg.optimize's convolution plans keep the weight in it).
// Sums run in float32 from the bias, one tap at a time (kh, then kw); bfloat16
// is widened on load and rounded once at the store, as oneDNN's bfloat16
// convolution (float32 accumulation) does.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

using FVec = Vectorized<float>;
constexpr int kLanes = FVec::size();
constexpr int kTaps = 9;

enum class Act { kNone, kRelu, kRelu6, kSilu, kHardswish };

Act parse_act(const std::string& act) {
  if (act == "none") return Act::kNone;
  if (act == "relu") return Act::kRelu;
  if (act == "relu6") return Act::kRelu6;
  if (act == "silu") return Act::kSilu;
  if (act == "hardswish") return Act::kHardswish;
  TORCH_CHECK(false, "depthwise_conv2d_inference: act must be one of none, relu, relu6, silu, hardswish, got '",
              act, "'");
}

// The same formulas as ATen's CPU kernels for these activations.
inline FVec activate(const FVec& x, Act act) {
  const FVec zero(0.f), three(3.f), six(6.f), one(1.f);
  switch (act) {
    case Act::kNone:
      return x;
    case Act::kRelu:
      return at::vec::maximum(x, zero);
    case Act::kRelu6:
      return at::vec::minimum(at::vec::maximum(x, zero), six);
    case Act::kSilu:
      return x / (one + x.neg().exp());
    case Act::kHardswish:
      return x * at::vec::minimum(at::vec::maximum(x + three, zero), six) / six;
  }
  return x;
}

// One vector of channels at p, widened to float; kFull: kLanes of them, else n.
template <typename T, bool kFull>
inline FVec load(const T* p, int n) {
  if constexpr (std::is_same_v<T, float>) {
    return kFull ? FVec::loadu(p) : FVec::loadu(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    // NOTE: ATen's partial bfloat16 loads copy through a buffer; a masked load is one instruction.
    __m256i v = kFull ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                      : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
    __m512 out;
    at::vec::cvtbf16_fp32(v, out);
    return FVec(out);
#else
    return std::get<0>(at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, kFull ? kLanes : n)));
#endif
  }
}

template <typename T, bool kFull>
inline void store(T* p, const FVec& v, int n) {
  if constexpr (std::is_same_v<T, float>) {
    kFull ? v.store(p) : v.store(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m256i out = at::vec::cvtfp32_bf16(__m512(v));
    if constexpr (kFull) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), out);
    } else {
      _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), out);
    }
#else
    at::vec::convert_from_float<T>(v, v).store(p, kFull ? kLanes : n);
#endif
  }
}

struct Geometry {
  int64_t C, H, W, OH, OW, stride_h, stride_w, pad_h, pad_w;
};

// A channel block: NV vectors of channels from c, the last one `last` wide (kFull: kLanes).
template <int NV>
struct Block {
  FVec weight[kTaps][NV];
  FVec bias[NV];
};

// Output pixels ow0 .. ow0 + NW - 1 of row (n, oh) for one channel block.
// kChecked: some taps may fall outside the input row (the borders).
template <typename T, int NV, bool kFull, int NW, bool kChecked>
inline void pixels(const T* x, T* y, const Geometry& g, int64_t n, int64_t oh, int64_t c, int64_t ow0,
                   const Block<NV>& block, int last, Act act) {
  FVec acc[NW][NV];
  for (int j = 0; j < NW; ++j) {
    for (int v = 0; v < NV; ++v) acc[j][v] = block.bias[v];
  }
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t ih = oh * g.stride_h - g.pad_h + kh;
    if (ih < 0 || ih >= g.H) continue;
    const T* row = x + (n * g.H + ih) * g.W * g.C + c;
    for (int kw = 0; kw < 3; ++kw) {
      const int tap = kh * 3 + kw;
      for (int j = 0; j < NW; ++j) {
        const int64_t iw = (ow0 + j) * g.stride_w - g.pad_w + kw;
        if (kChecked && (iw < 0 || iw >= g.W)) continue;
        const T* in = row + iw * g.C;
        if constexpr (NV == 2 && kFull && is_reduced_v<T>) {
          // 2 * kLanes bfloat16 channels are one vector: one load, widened in two halves.
          auto [lo, hi] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(in));
          acc[j][0] = at::vec::fmadd(lo, block.weight[tap][0], acc[j][0]);
          acc[j][1] = at::vec::fmadd(hi, block.weight[tap][1], acc[j][1]);
        } else {
          for (int v = 0; v < NV - 1; ++v) {
            acc[j][v] = at::vec::fmadd(load<T, true>(in + v * kLanes, kLanes), block.weight[tap][v], acc[j][v]);
          }
          acc[j][NV - 1] = at::vec::fmadd(load<T, kFull>(in + (NV - 1) * kLanes, last),
                                          block.weight[tap][NV - 1], acc[j][NV - 1]);
        }
      }
    }
  }
  T* out = y + ((n * g.OH + oh) * g.OW + ow0) * g.C + c;
  for (int j = 0; j < NW; ++j) {
    if constexpr (NV == 2 && kFull && is_reduced_v<T>) {
      at::vec::convert_from_float<T>(activate(acc[j][0], act), activate(acc[j][1], act)).store(out + j * g.C);
    } else {
      for (int v = 0; v < NV - 1; ++v) store<T, true>(out + j * g.C + v * kLanes, activate(acc[j][v], act), kLanes);
      store<T, kFull>(out + j * g.C + (NV - 1) * kLanes, activate(acc[j][NV - 1], act), last);
    }
  }
}

// One output row, one channel block: the border pixels one at a time with bounds checks, the
// interior NW at a time without.
template <typename T, int NV, bool kFull>
void row_block(const T* x, const T* taps, const T* bias, T* y, const Geometry& g, int64_t n, int64_t oh, int64_t c,
               int last, Act act) {
  Block<NV> block;
  for (int v = 0; v < NV; ++v) {
    const int width = v == NV - 1 ? last : kLanes;
    for (int t = 0; t < kTaps; ++t) block.weight[t][v] = load<T, false>(taps + t * g.C + c + v * kLanes, width);
    block.bias[v] = bias == nullptr ? FVec(0.f) : load<T, false>(bias + c + v * kLanes, width);
  }
  // Interior: ow * stride - pad >= 0 and ow * stride - pad + 2 <= W - 1.
  const int64_t first = std::min(g.OW, (g.pad_w + g.stride_w - 1) / g.stride_w);
  const int64_t end = g.W - 3 + g.pad_w < 0 ? first
                                             : std::max(first, std::min(g.OW, (g.W - 3 + g.pad_w) / g.stride_w + 1));
  constexpr int NW = NV == 2 ? 4 : 8;  // accumulators + weights stay within 32 vector registers
  int64_t ow = 0;
  for (; ow < first; ++ow) pixels<T, NV, kFull, 1, true>(x, y, g, n, oh, c, ow, block, last, act);
  for (; ow + NW <= end; ow += NW) pixels<T, NV, kFull, NW, false>(x, y, g, n, oh, c, ow, block, last, act);
  for (; ow < end; ++ow) pixels<T, NV, kFull, 1, false>(x, y, g, n, oh, c, ow, block, last, act);
  for (; ow < g.OW; ++ow) pixels<T, NV, kFull, 1, true>(x, y, g, n, oh, c, ow, block, last, act);
}

template <typename T>
void depthwise_kernel(const T* x, const T* taps, const T* bias, T* y, int64_t N, const Geometry& g, Act act) {
  constexpr int64_t kBlock = 2 * kLanes;
  const int64_t blocks = (g.C + kBlock - 1) / kBlock;
  const int64_t rows = N * g.OH;
  // Work items: (output row, channel block), so that a batch-1 map a few rows high still splits.
  at::parallel_for(0, rows * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / blocks, c = (item % blocks) * kBlock;
      const int64_t n = row / g.OH, oh = row % g.OH;
      const int64_t width = std::min(kBlock, g.C - c);
      if (width == kBlock) {
        row_block<T, 2, true>(x, taps, bias, y, g, n, oh, c, kLanes, act);
      } else if (width == kLanes) {
        row_block<T, 1, true>(x, taps, bias, y, g, n, oh, c, kLanes, act);
      } else if (width > kLanes) {
        row_block<T, 2, false>(x, taps, bias, y, g, n, oh, c, static_cast<int>(width - kLanes), act);
      } else {
        row_block<T, 1, false>(x, taps, bias, y, g, n, oh, c, static_cast<int>(width), act);
      }
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
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              op, ": weight must have shape [", C, ", 1, 3, 3] (one 3x3 filter per channel of x), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype must equal x dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape [", C, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype must equal x dtype ", x.scalar_type(),
                ", got ", bias->scalar_type());
  }
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, op,
              ": stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
  const int64_t OH = (x.size(2) + 2 * padding[0] - 3) / stride[0] + 1;
  const int64_t OW = (x.size(3) + 2 * padding[1] - 3) / stride[1] + 1;
  TORCH_CHECK(x.size(2) + 2 * padding[0] >= 3 && x.size(3) + 2 * padding[1] >= 3 && OH > 0 && OW > 0, op,
              ": the padded input ", x.size(2) + 2 * padding[0], "x", x.size(3) + 2 * padding[1],
              " is smaller than the 3x3 filter");
}

}  // namespace

at::Tensor depthwise_conv2d_inference_cpu(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                          at::IntArrayRef padding, c10::string_view act_name) {
  check_depthwise_conv2d_inference(x, weight, bias, stride, padding);
  const Act act = parse_act(std::string(act_name));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const Geometry g{C, H, W, (H + 2 * padding[0] - 3) / stride[0] + 1, (W + 2 * padding[1] - 3) / stride[1] + 1,
                   stride[0], stride[1], padding[0], padding[1]};
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  // The taps [3, 3, C]: a no-op for a weight already in that form (strides (1, *, 3C, C)).
  const at::Tensor taps = weight.permute({2, 3, 1, 0}).contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({N, C, g.OH, g.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (N == 0) return y;
  if (x.scalar_type() == at::kBFloat16) {
    using T = at::BFloat16;
    depthwise_kernel<T>(xc.const_data_ptr<T>(), taps.const_data_ptr<T>(),
                        b.defined() ? b.const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), N, g, act);
  } else {
    depthwise_kernel<float>(xc.const_data_ptr<float>(), taps.const_data_ptr<float>(),
                            b.defined() ? b.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), N, g,
                            act);
  }
  return y;
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("depthwise_conv2d_inference", &depthwise_conv2d_inference_cpu);
}

}  // namespace torchgraph::cpu
