// The activations the inference kernels apply in their epilogues (depthwise_conv2d_inference,
// gemm_act_inference): the set MobileNets, EfficientNets and ResNets end their convolutions with.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <string>

namespace torchgraph::cpu {

enum class Act { kNone, kRelu, kRelu6, kSilu, kHardswish };

// `op` names the kernel in the error message.
inline Act parse_act(const std::string& act, const char* op) {
  if (act == "none") return Act::kNone;
  if (act == "relu") return Act::kRelu;
  if (act == "relu6") return Act::kRelu6;
  if (act == "silu") return Act::kSilu;
  if (act == "hardswish") return Act::kHardswish;
  TORCH_CHECK(false, op, ": act must be one of none, relu, relu6, silu, hardswish, got '", act, "'");
}

// The same formulas as ATen's CPU kernels for these activations.
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
      return x / (one + x.neg().exp());
    case Act::kHardswish:
      return x * at::vec::minimum(at::vec::maximum(x + three, zero), six) / six;
  }
  return x;
}

}  // namespace torchgraph::cpu
