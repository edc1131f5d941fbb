// The activations the inference kernels apply in their epilogues (depthwise_conv2d_inference,
// gemm_act_inference): the set MobileNets, EfficientNets and ResNets end their convolutions with, and
// the GELUs transformers' MLPs end their first linear with (gemm_act_inference only: each op's Python
// side names the ones it takes).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "vec_utils.h"

namespace torchgraph::cpu {

enum class Act { kNone, kRelu, kRelu6, kSilu, kHardswish, kGelu, kGeluTanh };

// `op` names the kernel in the error message; `gelus`: whether it takes GELU and GELU-tanh.
inline Act parse_act(const std::string& act, const char* op, bool gelus) {
  if (act == "none") return Act::kNone;
  if (act == "relu") return Act::kRelu;
  if (act == "relu6") return Act::kRelu6;
  if (act == "silu") return Act::kSilu;
  if (act == "hardswish") return Act::kHardswish;
  if (gelus && act == "gelu") return Act::kGelu;
  if (gelus && act == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK(false, op, ": act must be one of none, relu, relu6, silu, hardswish", gelus ? ", gelu, gelu_tanh" : "",
              ", got '", act, "'");
}

// The same formulas as ATen's vectorized CPU kernels for these activations (GELU's in
// ATen/native/cpu/Gelu.h), so the values match eager's to float32 rounding; GELU's erf and the exps of
// SiLU and GELU-tanh are computed in registers instead (below).
//
// NOTE: [GELU's erf in registers] ATen's Vectorized<float>::erf() divides and calls Sleef's exp out of
// line, and every vector register is caller-saved: inside a kernel's epilogue each call spilled and
// reloaded the tile's live accumulators. ViT-Ti's fc1 on the GEMM kernel (520 x 192 -> 768, AMD EPYC Zen 3,
// 2 threads, medians of 15 x 20 calls, two processes each) took 1.58-1.61 ms with GELU against 0.89 ms
// without it; ATen's F.gelu alone on its output takes 0.22 ms. GELU uses bias_act's rational erf
// (NOTE: [Rational erf] in vec_utils.h: ten FMAs and a division, no call; absolute error 2.6e-7 against
// torch's 1.5e-7), as the trainable path's bias_act kernel does. SiLU and GELU-tanh (written as a sigmoid,
// as bias_act writes it) take their exp in registers too (NOTE: [Exp in registers] in vec_utils.h).
C10_ALWAYS_INLINE at::vec::Vectorized<float> activate(const at::vec::Vectorized<float>& x, Act act) {
  using FVec = at::vec::Vectorized<float>;
  const FVec zero(0.f), three(3.f), six(6.f), one(1.f);
  switch (act) {
    case Act::kNone:
      return x;
    case Act::kRelu:
      return at::vec::maximum(x, zero);
    case Act::kRelu6:
      return at::vec::minimum(at::vec::maximum(x, zero), six);
    case Act::kSilu:
      return x / (one + exp_in_registers(x.neg()));
    case Act::kHardswish:
      return x * at::vec::minimum(at::vec::maximum(x + three, zero), six) / six;
    case Act::kGelu:
      return x * FVec(0.5f) * (one + verf(x * FVec(static_cast<float>(M_SQRT1_2))));
    case Act::kGeluTanh: {  // 0.5 x (1 + tanh(u)) = x sigmoid(2u), as bias_act computes it
      const FVec two_u = FVec(static_cast<float>(M_SQRT2 * M_2_SQRTPI)) * (x + FVec(0.044715f) * (x * x * x));
      return x / (one + exp_in_registers(two_u.neg()));
    }
  }
  return x;
}

}  // namespace torchgraph::cpu
