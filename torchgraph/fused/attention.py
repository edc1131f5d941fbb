"""Attention: self-attention from a packed ``q | k | v`` projection (:func:`qkv_attention`) and
SDPA for inference (:func:`scaled_dot_product_attention`)."""

from __future__ import annotations

import weakref

import torch
import torch.fx
import torch.nn.functional as F

from .. import ops
from ..ops.qkv_attention import merge_heads, split_qkv_heads
from ._common import _AVX2_ONLY, _ONEDNN_DTYPES, _ONEDNN_MATMUL_RUNS
from .cpu_profile import MKL_GEMMS_FAST

__all__ = ["ATTENTION_INFERENCE_MAX_SCORES", "ATTENTION_INFERENCE_MAX_SEQ", "ATTENTION_KERNEL_MIN_WORK",
           "QKV_ATTENTION_MAX_SEQ", "TILED_ATTENTION_MAX_SEQ",
           "attention_with_additive_mask", "qkv_attention", "scaled_dot_product_attention"]

#: Longest sequence for which :func:`qkv_attention` runs torchgraph's kernel (it keeps the
#: ``B * heads * T * T`` attention weights for the backward; longer ones run SDPA's flash kernel).
QKV_ATTENTION_MAX_SEQ = 512

# Whether the kernel's float32 forward runs its products on oneDNN (NOTE: [Attention GEMMs on oneDNN]
# in csrc/cpu/qkv_attention.cpp): where MKL's GEMMs are slow, as the linears (cpu_profile.py), and oneDNN's
# matmul runs (not on AVX2-only CPUs: NOTE: [oneDNN matmul needs AVX-512] in csrc/cpu/onednn_matmul.h).
_ONEDNN_ATTENTION = _ONEDNN_MATMUL_RUNS and not MKL_GEMMS_FAST

# NOTE: [Tiled attention on AVX2] The kernels built for AVX2 (torch's CPU capability here, which picks the
# build: torchgraph/_extension.py) run float32 attention head by head on register-tiled SIMD loops
# (csrc/cpu/attention_tiles.h), both qkv_attention's forward and attention_inference. Measured against
# SDPA on an AMD EPYC Zen 3 (2 threads, interleaved medians, `python benchmarks/bench_attention.py`):
# - qkv_attention against split + SDPA + merge: 0.28-0.94x SDPA's time on every shape up to 256 positions
#   (GPT's 8 x 128 x 4 heads of 64: causal 0.47x, not causal 0.67x; ViT-S 0.94x; 16 heads of 32 0.57x)
#   and causal at 512 (0.53x); non-causal at 512, 0.89x in one run and 1.05x in another;
# - attention_inference against SDPA on HF's [B, T, H, D] views, with or without a padding mask: 0.42-0.94x
#   on those shapes (3 heads on 2 threads: 0.93-0.94x; one query and one key: 1.04x in an earlier run); but
#   1.4-2.2x slower for one query against 128-512 cached keys (a decode step): packing the keys and values
#   costs as much as the products there.
# So on AVX2 float32 qkv_attention takes the kernel when causal or up to TILED_ATTENTION_MAX_SEQ positions,
# and SDPA calls take attention_inference when the queries are at least an eighth of the keys.
_TILED_ATTENTION = _AVX2_ONLY and not _ONEDNN_ATTENTION
#: Longest non-causal self-attention that the tiled kernel takes from split + SDPA + merge (AVX2 only).
TILED_ATTENTION_MAX_SEQ = 256


def _tiles_pay(seq_q: int, seq_k: int, causal: bool, packed: bool) -> bool:
    """Whether the tiled kernel beats SDPA (NOTE: [Tiled attention on AVX2]): ``packed`` for qkv_attention's
    self-attention, else attention_inference."""
    if packed:
        return causal or seq_q <= TILED_ATTENTION_MAX_SEQ
    return 8 * seq_q >= seq_k


# NOTE: [Small attention on SDPA] With its products on oneDNN the kernel costs ~60 us a call whatever the
# size (two oneDNN matmul calls and their setup), SDPA ~2.5 us a (batch, head) pair: on the small problems
# of ViT-tiny, DeiT, CLIP's vision tower, Whisper and BART at test sizes the kernel made tg.optimize 10-24%
# slower than eager (2 x 4 heads x 17 positions x 16: 66 vs 26 us; AMD EPYC, 2 threads, best of 7 x 30
# calls). Timed over 15 shapes x causal or not x float32/bfloat16, the kernel costs about
# 60 + 0.8 B H + 1.8e-5 B H T S D us and SDPA 2.5 B H + 3.2e-5 B H T S D, so the kernel runs where
# B H (2**17 + T S D) >= ATTENTION_KERNEL_MIN_WORK (a margin above the break-even point: ViT-S's
# 1 x 6 heads x 197 x 64 is 15.7M, 0.57-0.68x SDPA's time; 8 x 4 x 32 x 16 is 4.7M, 0.90-1.37x).
#: Least ``batch x heads x (2**17 + T x S x head_dim)`` for which the oneDNN attention kernel runs.
ATTENTION_KERNEL_MIN_WORK = 6_000_000


def _kernel_pays(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int) -> bool:
    """Whether the oneDNN attention kernel beats SDPA on this problem ([Small attention on SDPA])."""
    return batch * heads * ((1 << 17) + seq_q * seq_k * head_dim) >= ATTENTION_KERNEL_MIN_WORK


def _sdpa_qkv_attention(qkv, heads: int, causal: bool, scale) -> torch.Tensor:
    q, k, v = split_qkv_heads(qkv, heads)
    return merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale))


def qkv_attention(qkv: torch.Tensor, heads: int, causal: bool = False,
                  scale: float | None = None) -> torch.Tensor:
    """Multi-head attention from a packed ``q | k | v`` projection ``(B, T, 3E)`` -> ``(B, T, E)``.

    :func:`torchgraph.ops.qkv_attention` (heads read in place, no split/merge copies) for eager
    float32/float64 CPU tensors with ``T <= QKV_ATTENTION_MAX_SEQ`` (and bfloat16 where its products run
    on oneDNN: NOTE: [Kernel or SDPA]); measured by ``benchmarks/bench_kernels.py``
    (2 threads, B=8, T=128, E=256, 4 heads, causal) it was 1.25-1.75x faster forward and
    1.40-1.43x faster forward + backward than the split + ``F.scaled_dot_product_attention`` +
    merge it replaces. Everywhere else (CUDA, long sequences, traced programs, missing kernels) it
    runs exactly that split + SDPA + merge.

    Example:
        >>> import torch
        >>> qkv = torch.randn(2, 6, 3 * 8)
        >>> qkv_attention(qkv, heads=2, causal=True).shape
        torch.Size([2, 6, 8])
    """
    if isinstance(qkv, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        return qkv.tracer.create_proxy("call_function", qkv_attention, (qkv, heads, causal, scale), {})
    # NOTE: [bfloat16 attention] With BLAS products the kernel computes bfloat16 attention in float32
    # through sgemm (converting its inputs); SDPA's flash kernel runs bf16 natively and took 1.8-4.9 ms
    # per GPT block call against 10-15 ms for the kernel (1 thread, loaded VM), so there bf16 goes to
    # SDPA. On oneDNN the kernel runs P V in bf16 and took ViT-S's attention from 5.7 ms (SDPA, 12
    # calls) to 3.7 ms, as accurate as SDPA (AMD EPYC, 2 threads).
    if (type(qkv) is torch.Tensor and qkv.device.type == "cpu" and qkv.dim() == 3  # noqa: E721
            and qkv.shape[1] <= QKV_ATTENTION_MAX_SEQ and not torch.compiler.is_compiling()
            and ops._use_kernel(qkv)):
        if _ONEDNN_ATTENTION and qkv.dtype in _ONEDNN_DTYPES:
            batch, seq, width = qkv.shape
            if heads > 0 and _kernel_pays(batch, heads, seq, seq, width // (3 * heads)):
                return ops.qkv_attention(qkv, heads, causal, scale, onednn=True)
        elif _TILED_ATTENTION and qkv.dtype == torch.float32:
            if _tiles_pay(qkv.shape[1], qkv.shape[1], causal, packed=True):
                return ops.qkv_attention(qkv, heads, causal, scale, onednn=False)
        elif qkv.dtype != torch.bfloat16 and _kernel_beats_sdpa(qkv.shape, heads, causal):
            return ops.qkv_attention(qkv, heads, causal, scale, onednn=False)
    return _sdpa_qkv_attention(qkv, heads, causal, scale)


# NOTE: [Kernel or SDPA] With its products on oneDNN (float32 where MKL is slow) the kernel beat split +
# SDPA + merge on every shape measured (AMD EPYC, 2 threads, medians, ms): 8 x 128 x 4 heads of 64 causal
# 0.53 vs 1.14, non-causal 0.54 vs 1.13; 16 heads of 32 1.78 vs 3.16; 8 heads of 32 causal 0.79 vs 1.53;
# ViT-S (1 x 197 x 6 heads of 64) 0.27 vs 0.46; 8 x 32 0.09 vs 0.13. With per-head BLAS calls, measured
# on an Intel CPU (2 threads, interleaved medians, float32) against split +
# SDPA (flash) + merge, torchgraph's attention kernel won with head dims >= 64 when causal or up to
# 128 positions (8 x 128 x 4 heads of 64: 0.96 vs 1.05 ms; causal 0.83 vs 1.13; heads of 128:
# 1.18-1.45 vs 1.95 ms) and on small problems, and lost with heads of 32 on larger ones (16 heads of
# 32, 8 x 128: 5.4 vs 3.6 ms; 8 heads: 1.9 vs 1.2 ms) and non-causal at 197 positions (ViT: 0.51
# vs 0.48 ms). 2**20 = batch x heads x T x T is where the small problems end.
def _kernel_beats_sdpa(shape, heads: int, causal: bool) -> bool:
    batch, seq, width = shape
    head_dim = width // (3 * heads) if heads else 0
    if head_dim >= 64:
        return causal or seq <= 128
    return batch * heads * seq * seq < 1 << 20


#: Longest query or key sequence for which :func:`scaled_dot_product_attention` runs
#: ``ops.attention_inference`` (it holds all ``B * H * T * S`` scores at once; SDPA's flash kernel does not).
ATTENTION_INFERENCE_MAX_SEQ = 512
#: Most scores (``B * H * T * S`` float32 values: 64 MiB) for which it does: larger batches run SDPA, whose
#: memory grows with ``T`` only, rather than allocate (and page-fault) a buffer that size per call.
ATTENTION_INFERENCE_MAX_SCORES = 1 << 24


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """``F.scaled_dot_product_attention`` with the same arguments and values, faster for CPU inference.

    Runs :func:`torchgraph.ops.attention_inference` (both products as batched oneDNN matmuls) where it
    applies: eager float32/bfloat16 CPU tensors, no gradient wanted, no dropout, keys and values with the
    query's batch and head counts (or, with ``enable_gqa``, heads that divide the query's), sequences up to
    ``ATTENTION_INFERENCE_MAX_SEQ`` and at most
    ``ATTENTION_INFERENCE_MAX_SCORES`` scores, and a CPU whose MKL
    GEMMs are slower than oneDNN's (:data:`torchgraph.fused.cpu_profile.MKL_GEMMS_FAST`). Measured
    against SDPA (2 threads, AMD EPYC, medians): 8 x 4 heads x 128 x 64 causal 0.47 vs 1.06 ms, with a
    boolean mask 0.54 vs 1.10; ViT-S's 197 x 6 heads 0.27 vs 0.45. On CPUs with AVX2 only it runs float32
    attention whose queries are at least an eighth of the keys on the kernel's SIMD tiles (NOTE: [Tiled
    attention on AVX2]: 0.42-0.95x SDPA's time). Everywhere else it calls
    ``F.scaled_dot_product_attention``. ``tg.optimize`` calls it for the SDPA calls that
    :func:`qkv_attention` does not take (HF LLaMA's, BERT's masked attention, cross-attention).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
        >>> with torch.no_grad():
        ...     out = scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
        True
    """
    if isinstance(query, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        return query.tracer.create_proxy(
            "call_function", scaled_dot_product_attention, (query, key, value),
            dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa))
    if (_ONEDNN_ATTENTION or _TILED_ATTENTION) and dropout_p == 0.0 \
            and _takes(query, key, value, attn_mask, is_causal, enable_gqa):
        return ops.attention_inference(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _takes(query, key, value, attn_mask, is_causal, enable_gqa: bool = False) -> bool:
    """Whether ``ops.attention_inference`` computes this call (else SDPA does)."""
    tensors = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    if any(type(t) is not torch.Tensor for t in tensors) or torch.compiler.is_compiling():  # noqa: E721
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or query.device.type != "cpu":
        return False
    if not torch.backends.cuda.flash_sdp_enabled():  # the output layout follows the flash kernel's
        return False
    if query.dtype not in _ONEDNN_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    b, h, t, d = query.shape
    s, kv_heads = key.shape[2], key.shape[1]
    grouped = enable_gqa and kv_heads > 0 and h % kv_heads == 0  # grouped-query attention: H / Hk heads a key head
    heads = kv_heads if grouped else h
    if key.shape != (b, heads, s, d) or value.shape[:3] != (b, heads, s) or 0 in query.shape or 0 in value.shape \
            or s == 0:
        return False
    if t > ATTENTION_INFERENCE_MAX_SEQ or s > ATTENTION_INFERENCE_MAX_SEQ or b * h * t * s > \
            ATTENTION_INFERENCE_MAX_SCORES or not ops._use_kernel(query):
        return False
    if not (_tiles_pay(t, s, is_causal, packed=False) if _TILED_ATTENTION else _kernel_pays(b, h, t, s, d)):
        return False
    if attn_mask is not None and (is_causal or attn_mask.dim() > 4 or attn_mask.device.type != "cpu"
                                  or attn_mask.dtype not in (torch.bool, *_ONEDNN_DTYPES)):
        return False
    return True


def attention_with_additive_mask(query, key, value, mask, scale: float):
    """``softmax(query @ key.transpose(-2, -1) * scale + mask, dim=-1) @ value``, attention written out
    by hand with an additive mask (Meta's reference LLaMA, HF's eager attention), as
    :func:`scaled_dot_product_attention` computes it (``ops.attention_inference`` where that applies).

    NOTE: [Additive masks] SDPA and the written-out form differ in one case: a row of the mask that is
    ``-inf`` at every key. Eager's softmax then gives NaN for that query, SDPA zeros. So a mask with such
    a row (checked on the mask's own, unexpanded values, once per mask tensor) runs the written-out
    form, with its NaN; HF's ``torch.finfo(dtype).min`` masks and causal masks never have one. Traced
    programs (``torch.compile``, exporters) get SDPA.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
        >>> mask = torch.triu(torch.full((4, 4), float("-inf")), diagonal=1)
        >>> written = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5 + mask, dim=-1) @ v
        >>> torch.allclose(attention_with_additive_mask(q, k, v, mask, 8 ** -0.5), written, atol=1e-5)
        True
    """
    if isinstance(query, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        return query.tracer.create_proxy("call_function", attention_with_additive_mask,
                                         (query, key, value, mask, scale), {})
    if _has_fully_masked_row(mask):
        scores = torch.softmax(query @ key.transpose(-2, -1) * scale + mask, dim=-1, dtype=torch.float32)
        return scores.to(query.dtype) @ value
    return scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.dtype), scale=scale)


# The last mask checked (a weak reference: a long sequence's mask is not kept alive after its forward), its
# version and the answer: a model's layers share one mask per forward.
_LAST_MASK: list = [lambda: None, -1, False]


def _has_fully_masked_row(mask) -> bool:
    """Whether some row of ``mask`` is ``-inf`` at every key (False for traced values: SDPA there)."""
    if type(mask) is not torch.Tensor or torch.compiler.is_compiling():  # noqa: E721
        return False
    cached = not mask.is_inference()  # an inference tensor has no version counter to tell an in-place change
    last, version, answer = _LAST_MASK
    if cached and last() is mask and mask._version == version:
        return answer
    answer = bool(torch.isneginf(mask).all(dim=-1).any())
    if cached:
        _LAST_MASK[:] = [weakref.ref(mask), mask._version, answer]
    return answer
