// The row loops of depthwise_conv2d_inference (csrc/cpu/depthwise_conv2d_inference.cpp): a KxK depthwise filter over
// NHWC rows, a channel block's K*K weight vectors and a few output pixels' accumulators in registers. The input rows
// come from a source (ImageRows: a whole map), so that expand_depthwise_conv2d_inference runs the same loops on the
// rows it has just computed.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "epilogue_acts.h"
#include "vec_utils.h"

namespace torchgraph::cpu::depthwise {

using FVec = Vectorized<float>;
constexpr int kLanes = FVec::size();
// Channels a pass of the row loops works on: two vectors of them (fewer at the end of the channels).
constexpr int64_t kBlock = 2 * kLanes;

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

// The input rows of a whole NHWC map. A source of rows answers rows(n, ih, c): row (n, ih) from channel c on (null
// in the padding), its pixels rows.stride() elements apart.
template <typename T>
struct ImageRows {
  const T* x;
  int64_t H, W, C;
  C10_ALWAYS_INLINE const T* operator()(int64_t n, int64_t ih, int64_t c) const {
    return ih < 0 || ih >= H ? nullptr : x + (n * H + ih) * W * C + c;
  }
  C10_ALWAYS_INLINE int64_t stride() const { return C; }
};

// Output pixels ow0 .. ow0 + NW - 1 of row (n, oh) for one channel block, input rows from rows(n, ih, c)
// (ImageRows, or another source of rows).
// kChecked: some taps may fall outside the input row (the borders).
// NOTE: every loop below is unrolled (K, NW and NV are constants) so that the accumulators live in
// registers; a loop left rolled kept them on the stack, each FMA waiting on a store and a reload.
template <typename T, int K, int NV, bool kFull, int NW, bool kChecked, typename Rows>
C10_ALWAYS_INLINE void pixels(const Rows& rows, T* y, const Geometry& g, int64_t n, int64_t oh, int64_t c,
                              int64_t ow0, const Block<K, NV>& block, int last, Act act) {
  FVec acc[NW][NV];
#pragma GCC unroll 8
  for (int j = 0; j < NW; ++j) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[j][v] = block.bias[v];
  }
#pragma GCC unroll 7
  for (int kh = 0; kh < K; ++kh) {
    const T* row = rows(n, oh * g.stride_h - g.pad_h + kh, c);
    if (row == nullptr) continue;
#pragma GCC unroll 7
    for (int kw = 0; kw < K; ++kw) {
      const int tap = kh * K + kw;
#pragma GCC unroll 8
      for (int j = 0; j < NW; ++j) {
        const int64_t iw = (ow0 + j) * g.stride_w - g.pad_w + kw;
        if (kChecked && (iw < 0 || iw >= g.W)) continue;
        const T* in = row + iw * rows.stride();
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
template <typename T, int K, int NV, bool kFull, int NW, typename Rows>
inline void row_groups(const Rows& rows, T* y, const Geometry& g, int64_t n, int64_t oh, int64_t c, int64_t first,
                       int64_t end, const Block<K, NV>& block, int last, Act act) {
  for (int64_t ow = 0; ow < g.OW; ow += NW) {
    const int64_t start = std::min(ow, g.OW - NW);
    if (start >= first && start + NW <= end) {
      pixels<T, K, NV, kFull, NW, false>(rows, y, g, n, oh, c, start, block, last, act);
    } else {
      pixels<T, K, NV, kFull, NW, true>(rows, y, g, n, oh, c, start, block, last, act);
    }
  }
}

// Output rows row0 .. row1 - 1 (of N * OH) of one channel block: the block's weights and bias
// loaded once, then each row's pixels in groups of NW, 4 or 2 (one at a time only on maps one
// pixel wide).
template <typename T, int K, int NV, bool kFull, typename Rows>
void rows_block(const Rows& rows, const T* taps, const T* bias, T* y, const Geometry& g, int64_t row0,
                int64_t row1, int64_t c, int last, Act act) {
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
      row_groups<T, K, NV, kFull, NW>(rows, y, g, n, oh, c, first, end, block, last, act);
    } else if (NW > 4 && g.OW >= 4) {
      row_groups<T, K, NV, kFull, 4>(rows, y, g, n, oh, c, first, end, block, last, act);
    } else if (g.OW >= 2) {
      row_groups<T, K, NV, kFull, 2>(rows, y, g, n, oh, c, first, end, block, last, act);
    } else {
      pixels<T, K, NV, kFull, 1, true>(rows, y, g, n, oh, c, 0, block, last, act);
    }
  }
}

// Output rows row0 .. row1 - 1 (of N * OH) of the channel block at c (kBlock channels, fewer at the end).
template <typename T, int K, typename Rows>
void rows_channel_block(const Rows& rows, const T* taps, const T* bias, T* y, const Geometry& g, int64_t row0,
                        int64_t row1, int64_t c, Act act) {
  const int64_t width = std::min(kBlock, g.C - c);
  if (width == kBlock) {
    rows_block<T, K, 2, true>(rows, taps, bias, y, g, row0, row1, c, kLanes, act);
  } else if (width == kLanes) {
    rows_block<T, K, 1, true>(rows, taps, bias, y, g, row0, row1, c, kLanes, act);
  } else if (width > kLanes) {
    rows_block<T, K, 2, false>(rows, taps, bias, y, g, row0, row1, c, static_cast<int>(width - kLanes), act);
  } else {
    rows_block<T, K, 1, false>(rows, taps, bias, y, g, row0, row1, c, static_cast<int>(width), act);
  }
}

}  // namespace torchgraph::cpu::depthwise
