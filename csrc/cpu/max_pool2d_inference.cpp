// max_pool2d_inference: max_pool2d that computes no indices (inference only).
//
// ATen's max_pool2d_with_indices writes an int64 index per output and tracks
// the argmax element by element. Without indices the max separates:
//   NCHW: first a vertical max over the kernel rows, vectorised along W into a
//         one-row buffer, then a short strided horizontal max over that buffer;
//   NHWC (channels_last): every window tap is a contiguous run of C channels,
//         so the max is vectorised along C.
// NaN propagates as in torch.max_pool2d. Layouts other than contiguous and
// channels_last are made contiguous first (NOTE: [Memory format rule]).

#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../common.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

template <typename T>
inline T max_nan(T a, T b) {
  return (b > a || at::_isnan(b)) ? b : a;
}

// dst[i] = max(dst[i], src[i]) for i < n.
template <typename T>
inline void max_into(T* dst, const T* src, int64_t n) {
  using Vec = Vectorized<T>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::maximum(Vec::loadu(dst + i), Vec::loadu(src + i)).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = max_nan(dst[i], src[i]);
}

template <typename T>
void pool_nchw(const T* x, T* y, int64_t planes, int64_t H, int64_t W, const Pool2dParams& p) {
  const int64_t OH = p.out_size[0], OW = p.out_size[1];
  const T lowest = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, planes, grain_rows(H * W), [&](int64_t begin, int64_t end) {
    std::vector<T> row_max(W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const T* in = x + plane * H * W;
      T* out = y + plane * OH * OW;
      for (int64_t oh = 0; oh < OH; ++oh) {
        // Vertical: row_max = max over the window's rows that lie inside the input.
        std::fill(row_max.begin(), row_max.end(), lowest);
        const int64_t h0 = oh * p.stride[0] - p.padding[0];
        for (int64_t kh = 0; kh < p.kernel[0]; ++kh) {
          const int64_t ih = h0 + kh * p.dilation[0];
          if (ih >= 0 && ih < H) max_into(row_max.data(), in + ih * W, W);
        }
        // Horizontal: strided windows over row_max.
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t w0 = ow * p.stride[1] - p.padding[1];
          T m = lowest;
          for (int64_t kw = 0; kw < p.kernel[1]; ++kw) {
            const int64_t iw = w0 + kw * p.dilation[1];
            if (iw >= 0 && iw < W) m = max_nan(m, row_max[iw]);
          }
          out[oh * OW + ow] = m;
        }
      }
    }
  });
}

template <typename T>
void pool_nhwc(
    const T* x, T* y, int64_t N, int64_t C, int64_t H, int64_t W, const Pool2dParams& p) {
  const int64_t OH = p.out_size[0], OW = p.out_size[1];
  const T lowest = -std::numeric_limits<T>::infinity();
  const int64_t taps = p.kernel[0] * p.kernel[1];
  at::parallel_for(0, N * OH * OW, grain_rows(C * taps), [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t n = pixel / (OH * OW);
      const int64_t oh = pixel / OW % OH;
      const int64_t ow = pixel % OW;
      T* out = y + pixel * C;
      std::fill(out, out + C, lowest);
      for (int64_t kh = 0; kh < p.kernel[0]; ++kh) {
        const int64_t ih = oh * p.stride[0] - p.padding[0] + kh * p.dilation[0];
        if (ih < 0 || ih >= H) continue;
        for (int64_t kw = 0; kw < p.kernel[1]; ++kw) {
          const int64_t iw = ow * p.stride[1] - p.padding[1] + kw * p.dilation[1];
          if (iw < 0 || iw >= W) continue;
          max_into(out, x + ((n * H + ih) * W + iw) * C, C);
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
