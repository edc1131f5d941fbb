"""Graph rewrites used by :func:`torchgraph.optimize`, one pass per module.

Each pass takes ``(root, graph)``: ``root`` is the (already copied) model owning the submodules named
by ``call_module``/``get_attr`` targets, ``graph`` its ``torch.fx.Graph``. A pass edits both in place
and returns how many patterns it rewrote. Every node a pass creates carries a ``tg_spec``.
"""

from .aliasing import has_effect, in_place_hazards
from .attention import fuse_qkv_attention, use_inference_attention
from .attribute_reads import share_attribute_walks
from .batchnorm import fold_batchnorm, fold_preactivation_batchnorm
from .canonical import canonicalize
from .epilogue import fuse_conv_act, fuse_linear_act
from .global_pool import use_global_avg_pool
from .grouped_heads import drop_repeated_kv
from .inline import inline_modules
from .layer_scale import fold_layer_scale
from .inverted_residual import fuse_expand_depthwise
from .layout import keep_layout_local, use_inference_max_pool
from .manual_attention import write_attention_as_sdpa
from .precision import bfloat16_supported, compute_in, cuda_bfloat16_supported
from .residual import fuse_add_layer_norm, fuse_add_relu, fuse_conv_add
from .rms_norm import fuse_rms_norm
from .transformer import expand_transformer_layers
from .written_layers import linear_from_addmm, sink_activation_through_view, write_gelu_as_function

__all__ = ["bfloat16_supported", "cuda_bfloat16_supported", "has_effect", "in_place_hazards", "canonicalize",
           "compute_in", "drop_repeated_kv", "expand_transformer_layers", "fold_batchnorm", "fold_layer_scale",
           "fold_preactivation_batchnorm", "fuse_add_layer_norm", "fuse_add_relu", "fuse_conv_act", "fuse_conv_add",
           "fuse_expand_depthwise", "fuse_linear_act", "fuse_qkv_attention", "fuse_rms_norm", "inline_modules",
           "keep_layout_local", "linear_from_addmm", "share_attribute_walks", "sink_activation_through_view",
           "use_global_avg_pool", "use_inference_attention", "use_inference_max_pool", "write_attention_as_sdpa",
           "write_gelu_as_function"]
