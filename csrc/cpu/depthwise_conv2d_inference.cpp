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

#include "epilogue_acts.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

using FVec = Vectorized<float>;
constexpr int kLanes = FVec::size();

// One vector of channels at p, widened to float; kFull: kLanes of them, else n.
template <typename T, bool kFull>
C10_ALWAYS_INLINE FVec load(const T* p, int n) {
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
C10_ALWAYS_INLINE void store(T* p, const FVec& v, int n) {
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

// A channel block of a KxK filter: NV vectors of channels from c, the last one `last` wide (kFull: kLanes).
template <int K, int NV>
struct Block {
  FVec weight[K * K][NV];
  FVec bias[NV];
};

// Output pixels ow0 .. ow0 + NW - 1 of row (n, oh) for one channel block.
// kChecked: some taps may fall outside the input row (the borders).
// NOTE: every loop below is unrolled (K, NW and NV are constants) so that the accumulators live in
// registers; a loop left rolled kept them on the stack, each FMA waiting on a store and a reload.
template <typename T, int K, int NV, bool kFull, int NW, bool kChecked>
C10_ALWAYS_INLINE void pixels(const T* x, T* y, const Geometry& g, int64_t n, int64_t oh, int64_t c, int64_t ow0,
                   const Block<K, NV>& block, int last, Act act) {
  FVec acc[NW][NV];
#pragma GCC unroll 8
  for (int j = 0; j < NW; ++j) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[j][v] = block.bias[v];
  }
#pragma GCC unroll 7
  for (int kh = 0; kh < K; ++kh) {
    const int64_t ih = oh * g.stride_h - g.pad_h + kh;
    if (ih < 0 || ih >= g.H) continue;
    const T* row = x + (n * g.H + ih) * g.W * g.C + c;
#pragma GCC unroll 7
    for (int kw = 0; kw < K; ++kw) {
      const int tap = kh * K + kw;
#pragma GCC unroll 8
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
#pragma GCC unroll 2
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
#pragma GCC unroll 8
  for (int j = 0; j < NW; ++j) {
    if constexpr (NV == 2 && kFull && is_reduced_v<T>) {
      at::vec::convert_from_float<T>(activate(acc[j][0], act), activate(acc[j][1], act)).store(out + j * g.C);
    } else {
#pragma GCC unroll 2
      for (int v = 0; v < NV - 1; ++v) store<T, true>(out + j * g.C + v * kLanes, activate(acc[j][v], act), kLanes);
      store<T, kFull>(out + j * g.C + (NV - 1) * kLanes, activate(acc[j][NV - 1], act), last);
    }
  }
}

// Output row (n, oh) of one channel block, NW pixels at a time, border groups with bounds
// checks. NOTE: one pixel's K*K FMAs are one dependent chain (bound by the FMA latency, not its
// throughput), so no pixel runs alone where the row has NW: a row that does not divide into groups
// ends with a group shifted left over pixels already written (the same values again).
template <typename T, int K, int NV, bool kFull, int NW>
inline void row_groups(const T* x, T* y, const Geometry& g, int64_t n, int64_t oh, int64_t c, int64_t first,
                       int64_t end, const Block<K, NV>& block, int last, Act act) {
  for (int64_t ow = 0; ow < g.OW; ow += NW) {
    const int64_t start = std::min(ow, g.OW - NW);
    if (start >= first && start + NW <= end) {
      pixels<T, K, NV, kFull, NW, false>(x, y, g, n, oh, c, start, block, last, act);
    } else {
      pixels<T, K, NV, kFull, NW, true>(x, y, g, n, oh, c, start, block, last, act);
    }
  }
}

// Output rows row0 .. row1 - 1 (of N * OH) of one channel block: the block's weights and bias
// loaded once, then each row's pixels in groups of NW, 4 or 2 (one at a time only on maps one
// pixel wide).
template <typename T, int K, int NV, bool kFull>
void rows_block(const T* x, const T* taps, const T* bias, T* y, const Geometry& g, int64_t row0, int64_t row1,
                int64_t c, int last, Act act) {
  Block<K, NV> block;
  for (int v = 0; v < NV; ++v) {
    const int width = v == NV - 1 ? last : kLanes;
    for (int t = 0; t < K * K; ++t) block.weight[t][v] = load<T, false>(taps + t * g.C + c + v * kLanes, width);
    block.bias[v] = bias == nullptr ? FVec(0.f) : load<T, false>(bias + c + v * kLanes, width);
  }
  // Interior: ow * stride - pad >= 0 and ow * stride - pad + K - 1 <= W - 1.
  const int64_t first = std::min(g.OW, (g.pad_w + g.stride_w - 1) / g.stride_w);
  const int64_t end = g.W - K + g.pad_w < 0 ? first
                                             : std::max(first, std::min(g.OW, (g.W - K + g.pad_w) / g.stride_w + 1));
  constexpr int NW = NV == 2 ? 4 : 8;  // 3x3: accumulators + weights stay within 32 vector registers
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t n = row / g.OH, oh = row % g.OH;
    if (g.OW >= NW) {
      row_groups<T, K, NV, kFull, NW>(x, y, g, n, oh, c, first, end, block, last, act);
    } else if (NW > 4 && g.OW >= 4) {
      row_groups<T, K, NV, kFull, 4>(x, y, g, n, oh, c, first, end, block, last, act);
    } else if (g.OW >= 2) {
      row_groups<T, K, NV, kFull, 2>(x, y, g, n, oh, c, first, end, block, last, act);
    } else {
      pixels<T, K, NV, kFull, 1, true>(x, y, g, n, oh, c, 0, block, last, act);
    }
  }
}

template <typename T, int K>
void depthwise_kernel(const T* x, const T* taps, const T* bias, T* y, int64_t N, const Geometry& g, Act act) {
  constexpr int64_t kBlock = 2 * kLanes;
  const int64_t blocks = (g.C + kBlock - 1) / kBlock;
  const int64_t rows = N * g.OH;
  // Work items: (a run of output rows, channel block). NOTE: loading a block's K*K weight vectors
  // costs as much as a few pixels, so a run holds ~128 output pixels (small maps: many rows), but
  // short enough to give each thread four items, so that a batch-1 map a few rows high still splits.
  const int64_t per_thread = std::max<int64_t>(1, rows * blocks / (4 * at::get_num_threads()));
  const int64_t run = std::min(std::max<int64_t>(1, (128 + g.OW - 1) / g.OW), per_thread);
  const int64_t runs = (rows + run - 1) / run;
  at::parallel_for(0, runs * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row0 = item / blocks * run, row1 = std::min(rows, row0 + run), c = (item % blocks) * kBlock;
      const int64_t width = std::min(kBlock, g.C - c);
      if (width == kBlock) {
        rows_block<T, K, 2, true>(x, taps, bias, y, g, row0, row1, c, kLanes, act);
      } else if (width == kLanes) {
        rows_block<T, K, 1, true>(x, taps, bias, y, g, row0, row1, c, kLanes, act);
      } else if (width > kLanes) {
        rows_block<T, K, 2, false>(x, taps, bias, y, g, row0, row1, c, static_cast<int>(width - kLanes), act);
      } else {
        rows_block<T, K, 1, false>(x, taps, bias, y, g, row0, row1, c, static_cast<int>(width), act);
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
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, op,
              ": stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
  const int64_t K = weight.size(2);
  TORCH_CHECK(x.size(2) + 2 * padding[0] >= K && x.size(3) + 2 * padding[1] >= K, op, ": the padded input ",
              x.size(2) + 2 * padding[0], "x", x.size(3) + 2 * padding[1], " is smaller than the ", K, "x", K,
              " filter");
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
