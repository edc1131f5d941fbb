// The autograd kernel of the inference-only ops: a forward with nothing in the
// way, and a backward that raises "<op> has no backward<why and the fix>".
//
// NOTE: [No backward in C++] These ops (the GEMM, depthwise and Winograd
// kernels, attention_inference, max_pool2d_inference, rms_norm_inference) keep
// nothing a gradient needs. Their raising backward was first registered from
// Python (torch.library.register_autograd), which puts a Python function on
// every call's path, under torch.no_grad() too: ~17 us a call on this CPU (an
// 8 x 960 x 2 x 2 depthwise convolution: 50 us against 33 us for the same C++
// kernel without it), 0.9 ms of MobileNetV2's 10 ms at batch 1. Here the
// common case (grad mode off, or no input requiring grad) is a check and a
// redispatch; only an input that requires grad gets an autograd node, one that
// raises when a backward reaches it, as before.

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/api/include/torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace torchgraph {
namespace {

constexpr const char* kConvFix =
    ". Where gradients are required, use F.conv2d (tg.optimize(model, inference=False) keeps it), or run "
    "inference under torch.no_grad().";

// The inference-only ops, each with why it has no backward and what to use instead (the text after
// "<op> has no backward"): the ops this kernel is registered for.
struct InferenceOnlyOp {
  const char* name;
  const char* why;
};
constexpr InferenceOnlyOp kInferenceOnlyOps[] = {
    {"gemm_act_inference",
     ". Where gradients are required, use F.linear or F.conv2d (tg.optimize(model, inference=False) keeps them), "
     "or run inference under torch.no_grad()."},
    {"depthwise_conv2d_inference", kConvFix},
    {"winograd_conv2d_inference", kConvFix},
    {"implicit_gemm_conv2d_inference", kConvFix},
    {"expand_depthwise_conv2d_inference", kConvFix},
    {"attention_inference",
     ": it does not keep the attention weights that a gradient needs. Use "
     "torch.nn.functional.scaled_dot_product_attention where gradients are required "
     "(torchgraph.fused.scaled_dot_product_attention does), or run inference under torch.no_grad()."},
    {"max_pool2d_inference",
     ": it does not record the argmax indices that a gradient needs. Use torch.nn.functional.max_pool2d where "
     "gradients are required (e.g. training), or run inference under torch.no_grad()."},
    {"rms_norm_inference",
     ". Where gradients are required, use the RMSNorm as written (tg.optimize(model, inference=False) keeps it), "
     "or run inference under torch.no_grad()."},
};

std::string no_backward_message(const std::string& name) {
  for (const InferenceOnlyOp& op : kInferenceOnlyOps) {
    if (name == op.name) return name + " has no backward" + op.why;
  }
  return name + " has no backward.";  // unreachable: registered for kInferenceOnlyOps only
}

// Gives the op's outputs a backward that raises. NOTE: a torch::autograd::Function (the stable C++
// API: autograd nodes themselves changed from std::shared_ptr to c10::intrusive_ptr across torch
// releases) whose forward passes through outputs already computed.
struct RaisingBackward : public torch::autograd::Function<RaisingBackward> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                at::TensorList /*inputs*/,
                                                const torch::autograd::variable_list& outputs, std::string why) {
    ctx->saved_data["why"] = std::move(why);
    return outputs;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 const torch::autograd::variable_list& /*grads*/) {
    TORCH_CHECK(false, ctx->saved_data["why"].toStringRef());
  }
};

void inference_only_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  std::vector<at::Tensor> requiring_grad;
  if (at::GradMode::is_enabled()) {
    for (const c10::IValue& value : torch::jit::last(*stack, schema.arguments().size())) {
      if (value.isTensor() && value.toTensor().requires_grad()) requiring_grad.push_back(value.toTensor());
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (requiring_grad.empty()) return;
  const std::string name = schema.operator_name().name.substr(std::string("torchgraph::").size());
  const size_t returns = schema.returns().size();
  std::vector<at::Tensor> outputs;
  for (const c10::IValue& value : torch::jit::last(*stack, returns)) outputs.push_back(value.toTensor());
  outputs = RaisingBackward::apply(at::TensorList(requiring_grad), outputs, no_backward_message(name));
  torch::jit::drop(*stack, returns);
  for (at::Tensor& out : outputs) stack->emplace_back(std::move(out));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchgraph, Autograd, m) {
  for (const InferenceOnlyOp& op : kInferenceOnlyOps) {
    m.impl(op.name, torch::CppFunction::makeFromBoxedFunction<&inference_only_autograd>());
  }
}

}  // namespace torchgraph
