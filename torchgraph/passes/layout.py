"""Inference max-pool without indices, and keeping channels_last tensors inside the conv stack."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import fused, ops
from ..fused._common import _ACTIVATION_FNS
from ..value_spec import ValueSpec
from .aliasing import in_place_hazards
from .common import module_of, parameter_of, permute_dims, replace_with_call, set_spec

__all__ = ["keep_layout_local", "use_inference_max_pool"]


def use_inference_max_pool(root: nn.Module, graph: fx.Graph) -> int:
    """``nn.MaxPool2d`` (without ``return_indices``) -> ``ops.max_pool2d_inference`` (no argmax
    indices: ~11% of ResNet-18 inference here; forward only)."""
    count = 0
    for node in list(graph.nodes):
        pool = module_of(root, node)
        if type(pool) is not nn.MaxPool2d or pool.return_indices or len(node.args) != 1 or node.kwargs:
            continue
        args = (node.args[0], pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        replace_with_call(graph, node, node, (node,), ops.max_pool2d_inference, args, {}, f"{node.name}_inference")
        count += 1
    return count


# NOTE: [Channels-last islands] With tg.optimize(channels_last=True) (the inference default),
# conv2d_act answers in channels_last on its oneDNN path (NOTE: [Packed channels_last convs] in
# fused/weights.py). Elementwise ops, pooling and the next such conv keep or accept that layout; anything
# else (a view, a reshape, the model's output) gets `.contiguous()` first, so code
# written for contiguous tensors still works and the model returns the layout the original
# returned. `.contiguous()` is free on a contiguous tensor (e.g. on the non-oneDNN paths).
# torch.cat takes its inputs in any layout and answers channels_last where they all are (DenseNet's
# dense blocks, ShuffleNet's branches): a copy to the default layout before it cost one copy of every
# layer's output there, and another back into channels_last at the next convolution.
#
# NOTE: [Layout-blind ops] Beyond the elementwise ops, the ops of encoder-decoder and generator networks
# take channels_last and answer in it with the same values: transposed convolutions, upsampling (F.interpolate,
# nn.Upsample), padding (constant, reflect, replicate), pooling, pixel shuffle, leaky and clamped activations,
# dropout. Checked one by one here (torch 2.13, float32, an 8 x 64 x 32 x 32 map: channels_last answer, values
# equal to NCHW's); several also run far faster on it (2 threads: a 2x2 stride-2 ConvTranspose2d 0.47 against
# 6.2 ms, bilinear upsampling 0.23 against 4.5 ms, max pooling 0.06 against 1.2 ms), and a copy to NCHW before
# each cost ~0.2 ms. milesial's UNet spent ~16% of its optimized forward in such copies (ad hoc profile, b8
# 64x64). Not here: circular padding (answers NCHW, 3x slower) and InstanceNorm (answers NCHW, slower).
# GroupNorm's channels_last kernel is erratic: in bfloat16 up to 17x slower than on NCHW with several channels
# a group (8 x 128 x 16 x 16, 32 groups: 0.95 ms against 0.06) and 60x with one (128 groups: 4.1 ms against
# 0.07); in float32 with one channel a group 9x (4 x 128 x 16 x 16: 205 against 23 us), so that CycleGAN's
# generator (instance norms run as group norms: NOTE [InstanceNorm as GroupNorm]) read 0.61x eager in bfloat16
# with it here, 1.80x without (float32 1.01x and 1.05x). But in float32 with several channels a group it runs
# at 1-2x its NCHW time, less than the two copies it saves (to NCHW before it, back at the next convolution):
# a DDPM-style UNet (GroupNorm(8, C) before every convolution; tests/test_layout_blind_ops.py) read 0.98x eager
# with the copies and 1.34x without (ad hoc, one process). So GroupNorm reads channels_last in float32 where
# its groups hold several channels (keep_layout_local's `float32`), and the default layout elsewhere. Ops that
# can return argmax indices (a tuple) keep the layout only without them (SegNet's
# `nn.MaxPool2d(2, return_indices=True)`).
# The elementwise ones (also what an island of lone convolutions may hold: NOTE [Lone convolutions]), then
# pooling, BatchNorm and concatenation.
_ELEMENTWISE_FUNCTIONS = {ops.add_relu, ops.bias_act, operator.add, torch.add, torch.relu, F.relu, F.relu6,
                          F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sigmoid, torch.tanh, operator.mul,
                          torch.mul}
_ELEMENTWISE_METHODS = {"add", "relu", "mul", "sigmoid"}
_ELEMENTWISE_MODULES = (nn.ReLU, nn.SiLU, nn.GELU, nn.Identity)
_PRESERVING_FUNCTIONS = _ELEMENTWISE_FUNCTIONS | {ops.max_pool2d_inference, torch.cat, torch.concat, torch.concatenate}
_PRESERVING_METHODS = _ELEMENTWISE_METHODS | {"contiguous"}
_PRESERVING_MODULES = _ELEMENTWISE_MODULES + (nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)
# [Layout-blind ops]
_LAYOUT_BLIND_FUNCTIONS = {operator.sub, operator.truediv, operator.neg, torch.sub, torch.div, torch.neg, torch.abs,
                           torch.clamp, F.leaky_relu, F.hardtanh, F.elu, F.mish, F.softplus, F.dropout, F.dropout2d,
                           F.interpolate, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d,
                           F.adaptive_max_pool2d, torch.pixel_shuffle, F.pixel_shuffle, F.conv_transpose2d, F.pad}
_LAYOUT_BLIND_METHODS = {"sub", "div", "neg", "abs", "clamp", "clamp_min", "clamp_max", "tanh"}
_LAYOUT_BLIND_MODULES = (nn.ConvTranspose2d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
                         nn.ReplicationPad2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.PixelShuffle,
                         nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.PReLU, nn.Mish, nn.Sigmoid, nn.Tanh,
                         nn.Hardswish, nn.Hardsigmoid, nn.Dropout, nn.Dropout2d)
_LAYOUT_BLIND_PADS = ("constant", "reflect", "replicate")
# The argument positions of `return_indices` in the functional forms.
_INDICES_ARG = {F.max_pool2d: 6, F.adaptive_max_pool2d: 2}


def _channels_last_conv(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (fused.conv2d_act, fused.conv2d_add_act) and \
        node.kwargs.get("channels_last", False)


def _group_norm_of_groups(root: nn.Module, node: fx.Node) -> bool:
    """``nn.GroupNorm`` / ``F.group_norm`` on float32 with several channels a group ([Layout-blind ops])."""
    if node.op not in ("call_module", "call_function") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    spec = node.args[0].meta.get("tg_spec")
    if not isinstance(spec, ValueSpec) or spec.dtype != torch.float32 or len(spec.shape) != 4:
        return False
    if node.op == "call_module":
        norm = module_of(root, node)
        return isinstance(norm, nn.GroupNorm) and norm.num_groups < norm.num_channels
    groups = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
    return node.target is F.group_norm and isinstance(groups, int) and isinstance(spec.shape[1], int) \
        and groups < spec.shape[1]


def _preserves_layout(root: nn.Module, node: fx.Node, float32: bool = False) -> bool:
    if float32 and _group_norm_of_groups(root, node):
        return True
    if node.op == "call_function":
        if node.target in _PRESERVING_FUNCTIONS or _channels_last_conv(node):
            return True
        if node.target not in _LAYOUT_BLIND_FUNCTIONS:
            return False
        if node.target in _INDICES_ARG:  # with the indices: a tuple
            position = _INDICES_ARG[node.target]
            return not (node.args[position] if len(node.args) > position else node.kwargs.get("return_indices"))
        if node.target is F.pad:
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            return mode in _LAYOUT_BLIND_PADS
        return True
    if node.op == "call_module":
        module = module_of(root, node)
        # nn.MaxPool2d(return_indices=True) answers a tuple (SegNet)
        return isinstance(module, _PRESERVING_MODULES + _LAYOUT_BLIND_MODULES) \
            and not getattr(module, "return_indices", False)
    return node.op == "call_method" and (node.target in _PRESERVING_METHODS or node.target in _LAYOUT_BLIND_METHODS)


# NOTE: [Shape readers] `x.size()`, `x.shape`, `x.dim()` read no element of x, and answer the same in
# either layout (milesial's UNet reads `x2.size()[2]` of every skip to pad the upsampled map: each took a
# copy to NCHW of a full skip map first). `x.stride()` and `x.is_contiguous()` do depend on the layout and
# are not among them.
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}


def _reads_shape_only(user: fx.Node, value: fx.Node) -> bool:
    """``value.size()`` and the like: reads of ``value``'s metadata alone ([Shape readers])."""
    if user.op == "call_method":
        return user.target in _SHAPE_METHODS and user.args[0] is value and value not in user.args[1:]
    return user.op == "call_function" and user.target is getattr and user.args[0] is value \
        and user.args[1] in _SHAPE_ATTRIBUTES


def _global_pool(root: nn.Module, node: fx.Node) -> bool:
    # A (N, C, 1, 1) result is contiguous in either layout.
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, (tuple, list)) and sorted(dims) in ([2, 3], [-2, -1])
    pool = module_of(root, node)
    return isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1), [1, 1])


def _channels_last_values(root: nn.Module, graph: fx.Graph, float32: bool) -> set[fx.Node]:
    channels_last: set[fx.Node] = set()
    for node in graph.nodes:
        if _channels_last_conv(node):
            channels_last.add(node)
        elif _preserves_layout(root, node, float32) and not _global_pool(root, node) \
                and any(a in channels_last for a in node.all_input_nodes):
            channels_last.add(node)  # a global pool's (N, C, 1, 1) answer is contiguous in either layout
    return channels_last


# NOTE: [Copies of changed values] `.contiguous()` reads a channels_last value into a copy: where the
# value, or a view of it, is changed in place (`y.view(n, -1).add_(1); return y`, `y[:, :4].relu_()`),
# a copy would not see the change, or would change instead of it. So the convolutions whose
# channels_last values may share memory with a value changed in place (aliasing.in_place_hazards)
# answer in the default layout, as written.
def _answer_contiguous_where_changed(root: nn.Module, graph: fx.Graph, channels_last: set[fx.Node]) -> bool:
    """Switch off channels_last for the convolutions behind values at risk; whether any was."""
    hazards = in_place_hazards(root, graph)
    stack = [node for node in channels_last if node in hazards]
    seen: set[fx.Node] = set()
    switched = False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _channels_last_conv(node):
            node.update_kwarg("channels_last", False)
            switched = True
        else:
            stack.extend(a for a in node.all_input_nodes if a in channels_last)
    return switched


# NOTE: [Channels-last into NHWC] ConvNeXt's blocks (timm, HF) and LayerNorm2d turn the image channels-last
# by hand for their norms and pointwise linears: `x.permute(0, 2, 3, 1)`, then `.permute(0, 3, 1, 2)`
# back. On a channels_last value that permute is already the contiguous (N, H, W, C) tensor, where
# `.contiguous()` first made a copy in NCHW and the norm a second one (layer_norm needs a contiguous
# input): two copies of every block's activations, ~10% of HF ConvNeXt's optimized forward. The permute
# reads the channels_last value directly, unless its result is a model output (returned with the
# strides eager gives it). Its result differs from eager's only in being contiguous, which any view,
# reshape or op accepts, and gives the same values; `.permute(0, 3, 1, 2)` back is channels_last again.
def _nhwc_permute(node: fx.Node) -> bool:
    """``x.permute(0, 2, 3, 1)`` (or ``torch.permute``), whose result no model output is."""
    return permute_dims(node) == (0, 2, 3, 1) and all(user.op != "output" for user in node.users)


# NOTE: [Channels-last into tokens] Patch embeddings (timm's PatchEmbed, HF ViT's, Swin's, Segformer's
# overlapping ones) and Segformer's Mix-FFN turn a convolution's map into tokens with
# `x.flatten(2).transpose(1, 2)`. On a channels_last value that is already the contiguous (N, H*W, C)
# tensor (the flatten merges H and W: a view in that layout). `.contiguous()` before the flatten made an
# NCHW copy, whose tokens were then strided, and the next linear or norm copied them again: two copies a
# call, 54 copies and ~18% of HF Segformer's optimized forward. As for the permute above: the flatten
# reads the channels_last value directly where all its users are such transposes and none of them is a
# model output; the tokens differ from eager's only in being contiguous.
def _flatten_to_tokens(node: fx.Node) -> bool:
    """``x.flatten(2)`` (or ``torch.flatten(x, 2)``) read only by transposes of its last two dims, none
    of them a model output."""
    method = node.op == "call_method" and node.target == "flatten"
    if not (method or (node.op == "call_function" and node.target is torch.flatten)):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if start != 2 or end not in (-1, 3) or not node.users:
        return False
    return all(_swaps_last_two(user) and all(u.op != "output" for u in user.users) for user in node.users)


def _swaps_last_two(node: fx.Node) -> bool:
    """``y.transpose(1, 2)`` (either order, or -2 and -1), ``torch.transpose`` or ``y.permute(0, 2, 1)``
    of a 3-D ``y``."""
    if permute_dims(node) == (0, 2, 1):
        return True
    if not ((node.op == "call_method" and node.target == "transpose")
            or (node.op == "call_function" and node.target is torch.transpose)) or node.kwargs or len(node.args) != 3:
        return False
    return {node.args[1], node.args[2]} in ({1, 2}, {-2, -1}, {1, -1}, {-2, 2})


# NOTE: [Lone convolutions] A channels_last convolution pays off inside a stack. One whose input is in the default
# layout (the model's input, a norm that read NCHW) and whose value is read only in the default layout (by an
# InstanceNorm, a view, the output), directly or through elementwise ops, pays a copy into channels_last and one
# out, for nothing: 4 x C x H x W, 2 threads, C 32-128 on 16-32 px maps, conv2d_act with both copies took
# 1.2-1.6x eager F.conv2d's time (413 against 262 us for 32 -> 32 channels at 32x32; conv2d_act without
# channels_last, packed weights on NCHW, 353). Fast neural style and CycleGAN's generator are made of such
# convolutions, between instance norms. So in float32 such an island of lone convolutions (ungrouped: the
# depthwise kernel needs channels_last) and elementwise ops runs as written: F.conv2d and its activation, on NCHW.
# Not 1x1 convolutions or small maps, which run as one GEMM (NOTE [Convolutions on few pixels] in fused/conv.py):
# ShuffleNetV2's last 1x1 convolution, lone after its channel shuffle's view, took its model from 2.07x eager to
# 1.85-1.90x on F.conv2d (ad hoc A/B, two processes).
# NOTE: [Lone convolutions that pay in channels_last] Two kinds won in channels_last even with both copies
# (conv2d_act's plan and its copies against F.conv2d on NCHW, AMD EPYC Zen 3, 2 threads, medians of 7, ad hoc,
# 2026-12-04): few output channels, where oneDNN's NCHW kernel fills its output-channel blocks with a few
# (32 -> 3 7x7 at 64x64, CycleGAN's last layer: 0.46x at b8, 0.60x at b1; 64 -> 3 0.51x; 32 -> 8 3x3 0.65x;
# 16 -> 3 0.81x; but 3 -> 32 7x7 1.70x, so only from 16 input channels); and 3x3 stride-1 convolutions of many
# channels on maps of at most 32x32, which run on the Winograd kernel in channels_last (NOTE: [Winograd
# convolutions] in fused/conv.py): 128 -> 128 at 16x16 0.66x (CycleGAN's residual blocks), at 32x32 0.89x,
# 128 -> 64 at 16x16 0.68x, 256 -> 256 at 8x8 0.68x and 4x4 0.45x (b8); 128 at 28x28 0.69x, 256 at 14x14
# 0.74x (b1). Not with 64 input channels (64 -> 64 and 64 -> 128 at 32x32: 1.11-1.15x) nor larger maps
# (128 at 64x64: 1.00x; 64 at 64x64: 2.7x). Such a convolution keeps its island in channels_last.
#: Lone convolutions with fewer output channels than this (and at least as many inputs) stay channels_last.
LONE_CONV_FEW_OUTPUTS = 16
#: Lone 3x3 stride-1 convolutions with at least this many input channels (and half as many outputs) on maps of
#: at most LONE_CONV_WINOGRAD_MAX_PIXELS output pixels stay channels_last (where the Winograd kernel runs).
LONE_CONV_WINOGRAD_MIN_CHANNELS = 128
LONE_CONV_WINOGRAD_MAX_PIXELS = 1024


def _pays_in_channels_last(root: nn.Module, conv: fx.Node) -> bool:
    """Whether a lone convolution is faster channels_last, copies included ([Lone convolutions that pay in
    channels_last])."""
    weight, spec = parameter_of(root, conv.args[1]), conv.meta.get("tg_spec")
    if weight is None or weight.dim() != 4 or not isinstance(spec, ValueSpec) or len(spec.shape) != 4:
        return False
    out_channels, in_channels = weight.shape[:2]
    if out_channels < LONE_CONV_FEW_OUTPUTS <= in_channels:
        return True
    stride, dilation = conv.args[3], conv.args[5]
    height, width = spec.shape[-2:]
    return (fused.conv.WINOGRAD_KERNEL and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1) and in_channels >= LONE_CONV_WINOGRAD_MIN_CHANNELS
            and 2 * out_channels >= in_channels and isinstance(height, int) and isinstance(width, int)
            and height * width <= LONE_CONV_WINOGRAD_MAX_PIXELS)


def _islands(channels_last: set[fx.Node]) -> list[set[fx.Node]]:
    """The channels_last values grouped by the channels_last values they read (connected components)."""
    parent = {node: node for node in channels_last}

    def find(node):
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for node in channels_last:
        for arg in node.all_input_nodes:
            if arg in channels_last:
                parent[find(arg)] = find(node)
    groups: dict[fx.Node, set[fx.Node]] = {}
    for node in channels_last:
        groups.setdefault(find(node), set()).add(node)
    return list(groups.values())


def _lone(root: nn.Module, island: set[fx.Node]) -> bool:
    """Convolutions that read no channels_last value, elementwise ops, and readers that need the default layout
    ([Lone convolutions])."""
    for node in island:
        if _channels_last_conv(node):
            if node.target is not fused.conv2d_act or len(node.args) != 8 or node.args[6] != 1 \
                    or node.args[0] in island or not _spatial(root, node) or _pays_in_channels_last(root, node):
                return False
        elif not ((node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS)
                  or (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS)
                  or (node.op == "call_module" and isinstance(module_of(root, node), _ELEMENTWISE_MODULES))):
            return False
        if any(_nhwc_permute(u) or _flatten_to_tokens(u) for u in node.users if u not in island):
            return False  # readers that take channels_last as it is
    return True


def _spatial(root: nn.Module, conv: fx.Node) -> bool:
    """A convolution with a filter wider than 1 whose output is wider than the GEMM path takes ([Lone
    convolutions]: 1x1 convolutions and small maps run as one GEMM, faster than F.conv2d)."""
    weight, spec = parameter_of(root, conv.args[1]), conv.meta.get("tg_spec")
    if weight is None or not isinstance(spec, ValueSpec) or len(spec.shape) != 4 or not isinstance(spec.shape[-1], int):
        return False
    return weight.dim() == 4 and weight.shape[-1] > 1 and spec.shape[-1] > fused.conv.CONV_IM2COL_MAX_WIDTH


def _run_lone_convolutions_as_written(root: nn.Module, graph: fx.Graph, channels_last: set[fx.Node]) -> set:
    """``conv2d_act(..., channels_last=True)`` -> ``F.conv2d`` and its activation in islands of lone convolutions
    ([Lone convolutions]); returns the values no longer channels_last."""
    written = set()
    for island in _islands(channels_last):
        if not _lone(root, island):
            continue
        for node in [n for n in island if _channels_last_conv(n)]:
            x, weight, bias, stride, padding, dilation, groups, act = node.args
            with graph.inserting_before(node):
                y = graph.call_function(F.conv2d, (x, weight, bias, stride, padding, dilation, groups))
                set_spec(y, node.meta.get("tg_spec"))
                if act != "none":
                    y = set_spec(graph.call_function(_ACTIVATION_FNS[act], (y,)), node.meta.get("tg_spec"))
            node.replace_all_uses_with(y)
            graph.erase_node(node)
        written |= island
    return written


def keep_layout_local(root: nn.Module, graph: fx.Graph, float32: bool = True) -> int:
    """Insert ``.contiguous()`` between channels_last producers and consumers that may need the
    default layout. ``float32``: the model computes in float32 (GroupNorm reads channels_last there:
    NOTE [Layout-blind ops]; lone convolutions run on NCHW: NOTE [Lone convolutions]). Returns how many
    were inserted."""
    channels_last = _channels_last_values(root, graph, float32)
    if _answer_contiguous_where_changed(root, graph, channels_last):
        channels_last = _channels_last_values(root, graph, float32)
    if float32 and _run_lone_convolutions_as_written(root, graph, channels_last):
        channels_last = _channels_last_values(root, graph, float32)
    count = 0
    for node in list(channels_last):
        outside = [u for u in node.users if not (_preserves_layout(root, u, float32) or _global_pool(root, u)
                                                 or _nhwc_permute(u) or _flatten_to_tokens(u)
                                                 or _reads_shape_only(u, node))]
        if not outside:
            continue
        with graph.inserting_after(node):
            dense = graph.call_method("contiguous", (node,))
        set_spec(dense, node.meta.get("tg_spec"))
        for user in outside:
            user.replace_input_with(node, dense)
        count += 1
    return count
