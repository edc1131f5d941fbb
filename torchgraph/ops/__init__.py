"""Fused kernels as PyTorch custom ops (``torch.ops.torchgraph.*``), one module per op.

Each op ``X`` (module ``torchgraph/ops/X.py``, as torchvision lays out its ops) comes as four pieces:

* ``X(...)``: the public wrapper. It runs the compiled kernel when one exists for
  the input's device and dtype, otherwise ``reference_X``.
* a fake (meta) kernel, so ``torch.compile``, ``torch.export`` and FakeTensor
  shape propagation see the op as one node with the right output metadata;
* an autograd formula built on a separate ``X_backward`` op;
* ``reference_X(...)``: the same computation in plain PyTorch. It is the
  fallback when the kernels are not built and the oracle in the tests.
  ``REFERENCES`` / :func:`reference_for` map each op to it, so a graph pass can
  swap fused nodes back to standard ops (e.g. before ONNX export).

Design constraints:

* The schemas live in ``csrc/torchgraph.cpp``; the fake kernels and autograd
  formulas are registered beside each op, and only when ``torchgraph._C`` is
  loaded (NOTE: [Registration needs _C]: torch.library can only attach fake
  kernels and autograd formulas to ops that exist, and the schemas come from _C).
* The ``_check_*`` helpers repeat the C++ checks in ``csrc/common.h`` with the
  same messages, and both the fake kernels and the references call them, so a
  bad argument fails the same way on every path.
* Kernels exist for float32, float64 and bfloat16 on the CPU (and on CUDA when
  built with CUDA). Other dtypes (e.g. float16) and devices go to the reference.
"""

from __future__ import annotations

from collections.abc import Callable

from ._common import ACTIVATIONS
from ._common import ACTIVATION_FNS as _ACTIVATION_FNS  # noqa: F401  (tests and benchmarks)
from ._common import KERNEL_DEVICES as _KERNEL_DEVICES  # noqa: F401
from ._common import use_kernel as _use_kernel  # noqa: F401
from .add_layer_norm import add_layer_norm, reference_add_layer_norm
from .attention_inference import attention_inference, reference_attention_inference
from .add_relu import add_relu, reference_add_relu
from .bias_act import bias_act, reference_bias_act
from .depthwise_conv2d_inference import depthwise_conv2d_inference, reference_depthwise_conv2d_inference
from .expand_depthwise_conv2d_inference import (expand_depthwise_conv2d_inference,
                                                reference_expand_depthwise_conv2d_inference)
from .gemm_act_inference import gemm_act_inference, gemm_panels, reference_gemm_act_inference
from .implicit_gemm_conv2d_inference import (implicit_gemm_conv2d_inference, implicit_gemm_filters,
                                             reference_implicit_gemm_conv2d_inference)
from .max_pool2d_inference import max_pool2d_inference, reference_max_pool2d_inference
from .qkv_attention import qkv_attention, reference_qkv_attention
from .rms_norm_inference import reference_rms_norm_inference, rms_norm_inference
from .winograd_conv2d_inference import (reference_winograd_conv2d_inference, winograd_conv2d_inference,
                                        winograd_filters)

__all__ = [
    "ACTIVATIONS",
    "REFERENCES",
    "add_layer_norm",
    "add_relu",
    "attention_inference",
    "bias_act",
    "depthwise_conv2d_inference",
    "expand_depthwise_conv2d_inference",
    "gemm_act_inference",
    "gemm_panels",
    "implicit_gemm_conv2d_inference",
    "implicit_gemm_filters",
    "max_pool2d_inference",
    "qkv_attention",
    "reference_add_layer_norm",
    "reference_add_relu",
    "reference_attention_inference",
    "reference_bias_act",
    "reference_depthwise_conv2d_inference",
    "reference_expand_depthwise_conv2d_inference",
    "reference_gemm_act_inference",
    "reference_implicit_gemm_conv2d_inference",
    "reference_for",
    "reference_max_pool2d_inference",
    "reference_qkv_attention",
    "reference_rms_norm_inference",
    "reference_winograd_conv2d_inference",
    "rms_norm_inference",
    "winograd_conv2d_inference",
    "winograd_filters",
]

#: Qualified op name -> pure-PyTorch reference with the op's signature and outputs.
REFERENCES: dict[str, Callable] = {
    "torchgraph::bias_act": reference_bias_act,
    "torchgraph::add_relu": reference_add_relu,
    "torchgraph::add_layer_norm": reference_add_layer_norm,
    "torchgraph::attention_inference": reference_attention_inference,
    "torchgraph::depthwise_conv2d_inference": reference_depthwise_conv2d_inference,
    "torchgraph::expand_depthwise_conv2d_inference": reference_expand_depthwise_conv2d_inference,
    "torchgraph::gemm_act_inference": reference_gemm_act_inference,
    "torchgraph::implicit_gemm_conv2d_inference": reference_implicit_gemm_conv2d_inference,
    "torchgraph::max_pool2d_inference": reference_max_pool2d_inference,
    "torchgraph::qkv_attention": reference_qkv_attention,
    "torchgraph::rms_norm_inference": reference_rms_norm_inference,
    "torchgraph::winograd_conv2d_inference": reference_winograd_conv2d_inference,
}

_WRAPPERS = {bias_act, add_relu, add_layer_norm, attention_inference, depthwise_conv2d_inference,
             expand_depthwise_conv2d_inference, gemm_act_inference, implicit_gemm_conv2d_inference,
             max_pool2d_inference, qkv_attention, rms_norm_inference, winograd_conv2d_inference}


def reference_for(target) -> Callable | None:
    """Returns the pure-PyTorch reference of a torchgraph op, or None for anything else.

    Accepts what an fx node's ``target`` can be: an ``OpOverload``
    (``torch.ops.torchgraph.bias_act.default``), an ``OpOverloadPacket``
    (``torch.ops.torchgraph.bias_act``), a wrapper from this package
    (``torchgraph.ops.bias_act``) or a name (``"bias_act"``, ``"torchgraph::bias_act"``).

    Example:
        >>> import torch
        >>> reference_for("bias_act") is reference_bias_act
        True
        >>> reference_for(torch.relu) is None
        True
    """
    if isinstance(target, str):
        name = target if "::" in target else f"torchgraph::{target}"
    elif callable(target) and target in _WRAPPERS:
        name = f"torchgraph::{target.__name__}"
    else:
        overload = getattr(target, "default", target)  # a packet's default overload
        name_fn = getattr(overload, "name", None)
        name = name_fn() if callable(name_fn) else None
    return REFERENCES.get(name)
