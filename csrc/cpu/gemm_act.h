// gemm_act: the register-tiled float32 GEMM of gemm_act_inference (csrc/cpu/gemm_act_inference.cpp), for
// the kernels that run GEMMs of their own on it (winograd_conv2d_inference's 16 products).
#pragma once

#include <cstdint>

#include "epilogue_acts.h"

namespace torchgraph::cpu {

// Output channels per panel of the filters gemm_act reads (ops.gemm_panels), the same for every SIMD width.
constexpr int kGemmPanel = 16;

// y (M, N) with row stride ldy = act(x @ W^T + bias + residual): x (M, K) with row stride ldx, and every
// matrix with unit column stride; W given as panels (ceil(N / kGemmPanel), K, kGemmPanel) (ops.gemm_panels); bias (N) or
// null; residual (M, N) with row stride ldr, or null. Parallel over rows or output panels (at::parallel_for).
void gemm_act(const float* x, int64_t ldx, int64_t M, int64_t K, const float* panels, int64_t N, const float* bias,
              const float* residual, int64_t ldr, Act act, float* y, int64_t ldy);

}  // namespace torchgraph::cpu
