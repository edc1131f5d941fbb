// attention_inference: F.scaled_dot_product_attention's forward, for
// inference on the CPU, with its two products as batched oneDNN matmuls.
//
// Why: tg.optimize fuses self-attention on a packed q | k | v projection into
// qkv_attention, but the attention of most models people load is not written
// that way: HF LLaMA applies rotary embeddings to q and k between the
// projection and SDPA and passes a boolean causal mask, HF BERT a padding
// mask, cross-attention reads keys from another tensor. Those keep calling
// SDPA, whose CPU flash kernel runs its GEMMs through the BLAS torch links
// (MKL), which runs float32 at half oneDNN's rate on AMD (NOTE: [Attention
// GEMMs on oneDNN] in qkv_attention.cpp). This kernel computes the same
// thing as qkv_attention's oneDNN forward, from q [B, H, T, D], k [B, H, S, D]
// and v [B, H, S, Dv] in any layout, with SDPA's masks: S = scale * Q K^T as
// one batched matmul in float32, plus the mask (boolean: False drops the key;
// float: added), then an exact softmax per row (every key masked: zeros, as
// SDPA gives), then O = P V as a second batched matmul, rounded once to the
// output's dtype. Where oneDNN's matmul does not run (AVX2-only CPUs: NOTE: [oneDNN matmul
// needs AVX-512] in onednn_matmul.h) the two products run on BLAS (at::bmm), with the same values; a build
// for AVX2 runs float32 attention head by head on SIMD tiles instead (NOTE: [Tiled attention on AVX2] in
// attention_tiles.h).
//
// bfloat16 inputs compute in float32 too (converted while they are copied into
// [B * H, ...] buffers): rounding P to bfloat16 for a bfloat16 P V, as SDPA's
// flash kernel does, made the error up to 2.5-7x SDPA's with masks (max abs
// error 0.012 against float64 at 8 x 4 heads x 128 x 64, SDPA 0.0044), and
// the float32 product costs little (0.51 ms a call against 0.45 rounded, at
// that shape, causal; float32 inputs 0.47; SDPA 1.04-1.06 ms in either dtype;
// 2 threads, AMD EPYC, medians of 15).
// No backward: the attention weights are not kept (tg.optimize uses it only for
// inference; fused.scaled_dot_product_attention calls SDPA when a gradient
// is wanted).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "attention_tiles.h"
#include "onednn_matmul.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

void check_attention_inference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, bool causal, bool gqa) {
  constexpr const char* op = "attention_inference";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": query, key and value must be 4-D (batch, heads, seq, head_dim), got shapes ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              op, ": query, key and value must all be float32 or all bfloat16, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  // grouped-query attention (enable_gqa): H query heads share Hk key/value heads, H a multiple of Hk
  const int64_t Hk = k.size(1);
  const bool heads_ok = gqa ? (Hk > 0 && v.size(1) == Hk && q.size(1) % Hk == 0) : (Hk == q.size(1) && v.size(1) == Hk);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && heads_ok && k.size(3) == q.size(3) &&
                  v.size(2) == k.size(2),
              op, ": expected key [B, ", gqa ? "Hk" : "H", ", S, D] and value [B, ", gqa ? "Hk" : "H",
              ", S, Dv] for query [B, H, T, D] = ", q.sizes(), gqa ? " (H a multiple of Hk)" : "", ", got key ",
              k.sizes(), " and value ", v.sizes());
  TORCH_CHECK(q.numel() > 0 && k.numel() > 0 && v.numel() > 0, op, ": empty query, key or value (shapes ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes(), ")");
  if (mask.has_value()) {
    TORCH_CHECK(!causal, op, ": attn_mask and is_causal=True cannot be given together");
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat ||
                    mask->scalar_type() == at::kBFloat16,
                op, ": attn_mask must be bool, float32 or bfloat16, got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() <= 4, op, ": attn_mask must have at most 4 dims, got shape ", mask->sizes());
  }
}

// NOTE: [SDPA's output layout] Where SDPA's CPU flash kernel runs (q, k and v
// with a unit last-dim stride, Dv == D), its output has the query's dim order
// in memory (dims sorted by stride, ties in dim order): a query transposed
// from [B, T, H, D] gives a [B, T, H, D] buffer. Elsewhere its math path
// gives a contiguous output. Code after SDPA relies on it (`.transpose(1,
// 2).view(B, T, E)` needs the [B, T, H, D] buffer), so this kernel allocates
// its output the same way (torchgraph/probe_layouts.py makes the recorded
// probes follow the same rule; tests/test_recording_strides.py checks it).
at::Tensor output_like_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t Dv = v.size(3);
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1 || Dv != q.size(3)) {
    return at::empty({q.size(0), q.size(1), q.size(2), Dv}, q.options());
  }
  std::array<int64_t, 4> order{0, 1, 2, 3};
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return q.stride(a) > q.stride(b); });
  std::array<int64_t, 4> sizes{}, inverse{};
  for (int64_t i = 0; i < 4; ++i) {
    sizes[i] = q.size(order[i]);
    inverse[order[i]] = i;
  }
  return at::empty(sizes, q.options()).permute(inverse);
}

// `t` as float32 [B * H, rows, cols]: a view when its layout allows, else copied (and converted) into `ws`.
at::Tensor batched(const at::Tensor& t, Workspace& ws) {
  const int64_t bh = t.size(0) * t.size(1);
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.view({bh, t.size(2), t.size(3)});
  at::Tensor copy = ws.take({bh, t.size(2), t.size(3)}, at::kFloat);
  copy.view(t.sizes()).copy_(t);
  return copy;
}

// The mask as a float32 additive mask broadcast to [B, H, T, S], its last dim
// dense: bool masks become 0 / -inf once per call on their own (unexpanded) size.
at::Tensor additive_mask(const at::Tensor& mask, at::IntArrayRef scores_shape) {
  at::Tensor m = mask;
  for (int64_t d = 0; d < m.dim(); ++d) {
    if (m.stride(d) == 0 && m.size(d) > 1) m = m.narrow(d, 0, 1);  // undo expand: convert each value once
  }
  if (m.scalar_type() == at::kBool) {
    m = at::where(m, 0.0, -std::numeric_limits<double>::infinity()).to(at::kFloat);
  } else if (m.scalar_type() != at::kFloat) {
    m = m.to(at::kFloat);
  }
  m = m.expand(scores_shape);
  if (m.stride(3) != 1) m = m.contiguous();
  return m;
}

// The float32 forward of an AVX2 build (NOTE: [Tiled attention on AVX2] in attention_tiles.h), head by head,
// reading q, k and v in place: rows with a unit last-dim stride, any other strides; grouped heads read
// their key/value head (h / G); the probabilities stay in a per-thread buffer of T x S floats.
void forward_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* mask,
                   at::IntArrayRef mask_strides, bool causal, float scale, const at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), S = k.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t G = H / k.size(1);
  const float *qp = q.const_data_ptr<float>(), *kp = k.const_data_ptr<float>(), *vp = v.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panels(tiles::panel_floats(S, D, Dv), 0.f), probs(T_ * S);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, hk = h / G;
      tiles::Head head;
      head.q = qp + b * q.stride(0) + h * q.stride(1);
      head.ldq = q.stride(2);
      head.k = kp + b * k.stride(0) + hk * k.stride(1);
      head.ldk = k.stride(2);
      head.v = vp + b * v.stride(0) + hk * v.stride(1);
      head.ldv = v.stride(2);
      head.out = op + b * out.stride(0) + h * out.stride(1);
      head.ldo = out.stride(2);
      head.probs = probs.data();
      if (mask != nullptr) {
        head.mask = mask + b * mask_strides[0] + h * mask_strides[1];
        head.mask_ld = mask_strides[2];
      }
      head.seq_q = T_;
      head.seq_k = S;
      head.head_dim = D;
      head.value_dim = Dv;
      head.causal = causal;
      head.scale = scale;
      tiles::head_attention(head, panels.data());
    }
  });
}

// NOTE: [Grouped heads] With grouped-query attention (LLaMA 2 70B, LLaMA 3, Mistral, Qwen2: H query heads on Hk
// key/value heads, query head h reading key/value head h / (H / Hk)), eager code repeats k and v to H heads
// (`repeat_kv`, or SDPA's enable_gqa does). Here the query buffer [B * H, T, D] is contiguous with the
// G = H / Hk heads of a group adjacent, so it is also [B * Hk, G * T, D]: each group's G query heads are one
// matrix of G * T rows against its key/value head, and neither k nor v is repeated. The scores and P V come
// out as [B * Hk, G * T, *], the same memory as [B * H, T, *].
at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, bool causal, float scale) {
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), S = k.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t Hk = k.size(1), G = H / Hk;  // G > 1: grouped heads (NOTE: [Grouped heads])
  const int64_t bh = B * H, bhk = B * Hk;
  at::Tensor out = output_like_sdpa(q, k, v);
  if (tiles::kTiledAttention && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
      v.scalar_type() == at::kFloat && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 &&
      out.stride(3) == 1) {
    const std::optional<at::Tensor> added =
        mask.has_value() ? std::optional<at::Tensor>(additive_mask(*mask, {B, H, T_, S})) : std::nullopt;
    forward_tiled(q, k, v, added.has_value() ? added->const_data_ptr<float>() : nullptr,
                  added.has_value() ? added->strides() : at::IntArrayRef(), causal, scale, out);
    return out;
  }
  const bool direct = out.is_contiguous() && out.scalar_type() == at::kFloat;  // P V written straight into out
  Workspace ws(Workspace::bytes_for({{bh * T_ * D, at::kFloat}, {bhk * S * D, at::kFloat},
                                     {bhk * S * Dv, at::kFloat}, {bh * T_ * S, at::kFloat},
                                     {direct ? 0 : bh * T_ * Dv, at::kFloat}}));
  const at::Tensor qf = batched(q, ws).view({bhk, G * T_, D}), kf = batched(k, ws), vf = batched(v, ws);
  const at::Tensor scores = ws.take({bhk, G * T_, S}, at::kFloat);
  batched_matmul(qf, kf.transpose(1, 2), scores, scale);

  const std::optional<at::Tensor> added =
      mask.has_value() ? std::optional<at::Tensor>(additive_mask(*mask, {B, H, T_, S})) : std::nullopt;
  const float* m = added.has_value() ? added->const_data_ptr<float>() : nullptr;
  const std::vector<int64_t> ms = added.has_value() ? added->strides().vec() : std::vector<int64_t>(4, 0);
  float* p = scores.mutable_data_ptr<float>();
  using Vec = Vectorized<float>;
  at::parallel_for(0, bh * T_, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % T_, b = row / T_ / H, h = row / T_ % H;
      float* s = p + row * S;
      if (m != nullptr) {
        const float* mrow = m + b * ms[0] + h * ms[1] + i * ms[2];
        at::vec::map2([](const Vec& x, const Vec& y) { return x + y; }, s, s, mrow, S);
      }
      softmax_row(s, causal ? std::min(i + 1, S) : S, S);
    }
  });
  const at::Tensor merged = direct ? out.view({bhk, G * T_, Dv}) : ws.take({bhk, G * T_, Dv}, at::kFloat);
  batched_matmul(scores, vf, merged, 1.f);
  if (!direct) out.copy_(merged.view({B, H, T_, Dv}));
  return out;
}

}  // namespace

at::Tensor attention_inference_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                   std::optional<double> scale, bool enable_gqa) {
  check_attention_inference(query, key, value, attn_mask, is_causal, enable_gqa);
  const float s = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(query.size(3))));
  return forward(query, key, value, attn_mask, is_causal, s);
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("attention_inference", &attention_inference_cpu);
}

}  // namespace torchgraph::cpu
