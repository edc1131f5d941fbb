// max_pool2d_inference: max_pool2d that computes no indices (inference only).
//
// ATen's max_pool2d_with_indices writes an int64 index per output and tracks
// the argmax element by element. Without indices the max separates:
//   NCHW: per output row, a vertical max over the kernel rows (vectorised
//         along W) into a -inf padded row buffer, then a sliding max over
//         that row (vectorised, every window start) from which every
//         stride-th value is picked;
//   NHWC (channels_last): every window tap is a contiguous run of C channels,
//         so the max is vectorised along C with the accumulators in registers.
// Maxima are taken in acc_t<T> (exact: widening bf16 to float loses nothing).
// NaN propagates as in torch.max_pool2d. Layouts other than contiguous and
// channels_last are made contiguous first (NOTE: [Memory format rule]).

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

template <typename A>
inline A max_nan(A current, A value) {
  return (value > current || std::isnan(value)) ? value : current;
}

// dst[i] = max(dst[i], src[i]) for i < n, with src of type S (T or acc_t<T>).
template <typename S>
inline void max_into(acc_t<S>* dst, const S* src, int64_t n) {
  using V = AccVec<S>;
  int64_t i = 0;
  for (; i + kStep<S> <= n; i += kStep<S>) {
    V s0, s1;
    load2(src + i, s0, s1);
    at::vec::maximum(V::loadu(dst + i), s0).store(dst + i);
    at::vec::maximum(V::loadu(dst + i + V::size()), s1).store(dst + i + V::size());
  }
  for (; i < n; ++i) dst[i] = max_nan(dst[i], static_cast<acc_t<S>>(src[i]));
}

template <typename T>
void pool_nchw(const T* x, T* y, int64_t planes, int64_t H, int64_t W, const Pool2dParams& p) {
  using A = acc_t<T>;
  const int64_t OH = p.out_size[0], OW = p.out_size[1];
  const int64_t kW = p.kernel[1], sW = p.stride[1], pW = p.padding[1], dW = p.dilation[1];
  const A lowest = -std::numeric_limits<A>::infinity();
  // row = [pW of -inf | W columns | -inf up to the end of the last window]:
  // window ow then covers row[ow * sW + kw * dW], kw < kW, with no bounds checks.
  // NOTE: the window starts are rounded up to whole vector steps (the extra
  // ones read the -inf tail and are never picked), so that the sliding max has
  // no scalar tail: ResNet rows are only 16 to 56 wide.
  const int64_t starts = ((OW - 1) * sW + kStep<A>) / kStep<A> * kStep<A>;
  const int64_t row_len = std::max(pW + W, starts + (kW - 1) * dW);
  at::parallel_for(0, planes, grain_rows(H * W), [&](int64_t begin, int64_t end) {
    std::vector<A> row(row_len, lowest);  // the padding stays -inf
    std::vector<A> window_max(starts);
    A* columns = row.data() + pW;
    for (int64_t plane = begin; plane < end; ++plane) {
      const T* in = x + plane * H * W;
      T* out = y + plane * OH * OW;
      for (int64_t oh = 0; oh < OH; ++oh) {
        // Vertical: max over the window's rows that lie inside the input.
        std::fill(columns, columns + W, lowest);
        const int64_t h0 = oh * p.stride[0] - p.padding[0];
        for (int64_t kh = 0; kh < p.kernel[0]; ++kh) {
          const int64_t ih = h0 + kh * p.dilation[0];
          if (ih >= 0 && ih < H) max_into(columns, in + ih * W, W);
        }
        // Horizontal: the max of every window start, then every sW-th one.
        std::copy(row.begin(), row.begin() + starts, window_max.begin());
        for (int64_t kw = 1; kw < kW; ++kw) {
          max_into(window_max.data(), row.data() + kw * dW, starts);
        }
        for (int64_t ow = 0; ow < OW; ++ow) {
          out[oh * OW + ow] = static_cast<T>(window_max[ow * sW]);
        }
      }
    }
  });
}

template <typename T>
void pool_nhwc(
    const T* x, T* y, int64_t N, int64_t C, int64_t H, int64_t W, const Pool2dParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const int64_t OH = p.out_size[0], OW = p.out_size[1];
  const A lowest = -std::numeric_limits<A>::infinity();
  const int64_t taps = p.kernel[0] * p.kernel[1];
  // One task item is one output row (n, oh): no integer division per pixel.
  at::parallel_for(0, N * OH, grain_rows(OW * C * taps), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> offsets(taps);  // element offsets of the valid taps
    for (int64_t out_row = begin; out_row < end; ++out_row) {
      const int64_t n = out_row / OH;
      const int64_t oh = out_row % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        int64_t valid = 0;
        for (int64_t kh = 0; kh < p.kernel[0]; ++kh) {
          const int64_t ih = oh * p.stride[0] - p.padding[0] + kh * p.dilation[0];
          if (ih < 0 || ih >= H) continue;
          for (int64_t kw = 0; kw < p.kernel[1]; ++kw) {
            const int64_t iw = ow * p.stride[1] - p.padding[1] + kw * p.dilation[1];
            if (iw >= 0 && iw < W) offsets[valid++] = ((n * H + ih) * W + iw) * C;
          }
        }
        T* out = y + (out_row * OW + ow) * C;
        int64_t c = 0;
        for (; c + kStep<T> <= C; c += kStep<T>) {
          V m0(lowest), m1(lowest);
          for (int64_t t = 0; t < valid; ++t) {
            V v0, v1;
            load2(x + offsets[t] + c, v0, v1);
            m0 = at::vec::maximum(m0, v0);
            m1 = at::vec::maximum(m1, v1);
          }
          store2(out + c, m0, m1);
        }
        for (; c < C; ++c) {
          A m = lowest;
          for (int64_t t = 0; t < valid; ++t) m = max_nan(m, static_cast<A>(x[offsets[t] + c]));
          out[c] = static_cast<T>(m);
        }
      }
    }
  });
}

}  // namespace

at::Tensor max_pool2d_inference_cpu(
    const at::Tensor& x,
    at::IntArrayRef kernel_size,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    bool ceil_mode) {
  const Pool2dParams params =
      check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu(), "max_pool2d_inference_cpu: x must be a CPU tensor");

  const at::Tensor x4 = x.dim() == 3 ? x.unsqueeze(0) : x;
  const int64_t N = x4.size(0), C = x4.size(1), H = x4.size(2), W = x4.size(3);
  const at::MemoryFormat format = dense_format(x);  // always Contiguous for 3-D x
  const at::Tensor x_dense = x4.contiguous(format);
  at::Tensor y = at::empty(
      {N, C, params.out_size[0], params.out_size[1]}, x.options().memory_format(format));

  if (y.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "max_pool2d_inference_cpu", [&] {
      const scalar_t* in = x_dense.const_data_ptr<scalar_t>();
      scalar_t* out = y.mutable_data_ptr<scalar_t>();
      if (format == at::MemoryFormat::ChannelsLast) {
        pool_nhwc(in, out, N, C, H, W, params);
      } else {
        pool_nchw(in, out, N * C, H, W, params);
      }
    });
  }
  return x.dim() == 3 ? y.squeeze(0) : y;
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("max_pool2d_inference", &max_pool2d_inference_cpu);
}

}  // namespace torchgraph::cpu
