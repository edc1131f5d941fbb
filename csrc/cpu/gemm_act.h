// gemm_act: the register-tiled float32 GEMM of gemm_act_inference (csrc/cpu/gemm_act_inference.cpp), for
// the kernels that run GEMMs of their own on it (winograd_conv2d_inference's 16 products, and
// implicit_gemm_conv2d_inference's rows read in place).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "epilogue_acts.h"

namespace torchgraph::cpu {

// Output channels per panel of the filters gemm_act reads (ops.gemm_panels), the same for every SIMD width.
constexpr int kGemmPanel = 16;
// Output channels of one register tile, and of a block of gemm_act_blocked's output: two vectors (16 channels on
// AVX2, 32 on AVX-512), the depthwise kernel's channel block (csrc/cpu/depthwise_rows.h).
constexpr int kGemmBlock = 2 * at::vec::Vectorized<float>::size();

// y (M, N) with row stride ldy = act(x @ W^T + bias + residual): x (M, K) with row stride ldx, and every
// matrix with unit column stride; W given as panels (ceil(N / kGemmPanel), K, kGemmPanel) (ops.gemm_panels); bias (N) or
// null; residual (M, N) with row stride ldr, or null. Parallel over rows or output panels (at::parallel_for).
void gemm_act(const float* x, int64_t ldx, int64_t M, int64_t K, const float* panels, int64_t N, const float* bias,
              const float* residual, int64_t ldr, Act act, float* y, int64_t ldy);

// gemm_act on the calling thread, without a residual, its output in blocks of kGemmBlock channels: (m, n) at
// y[(n / kGemmBlock) * block_stride + m * kGemmBlock + n % kGemmBlock] (a block's rows contiguous: NOTE: [Expanded
// rows in a ring] in csrc/cpu/expand_depthwise_conv2d_inference.cpp).
void gemm_act_blocked(const float* x, int64_t ldx, int64_t M, int64_t K, const float* panels, int64_t N,
                      const float* bias, Act act, float* y, int64_t block_stride);

// gemm_act on the calling thread, over rows whose k-th input is x[i * ldx + offsets[k]] (an implicit im2col:
// NOTE: [Implicit GEMM] in csrc/cpu/implicit_gemm_conv2d_inference.cpp), without a residual.
void gemm_act_gathered(const float* x, int64_t ldx, const int64_t* offsets, int64_t M, int64_t K, const float* panels,
                       int64_t N, const float* bias, Act act, float* y, int64_t ldy);

}  // namespace torchgraph::cpu
