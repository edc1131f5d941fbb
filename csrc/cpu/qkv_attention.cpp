// qkv_attention: multi-head scaled dot-product attention read straight from a
// packed [B, T, 3E] projection and written as [B, T, E], and its backward.
//
// Why: a GPT block computes qkv = linear(x), splits it into heads
// (chunk/view/transpose), calls SDPA and merges the heads back
// (transpose/reshape, a copy). For short sequences PyTorch's CPU flash
// attention works in 32-row query blocks with an online softmax and runs its
// GEMMs at ~25% of this machine's peak; the backward also zero-fills its
// outputs and concatenates the three grads. Here each (batch, head) pair is
// one task: its scores S = scale * Q K^T (T x T) stay in one buffer, the
// softmax is exact, and every product is one BLAS call on strided views of
// qkv, so the heads are never copied apart or back together, and the
// backward writes dQ, dK and dV into their columns of one grad_qkv.
//
// Causal masking skips the upper triangle block by block (kBlock rows), so
// about 5/8 of the full products run at T = 128.
//
// The softmax P (B x heads x T x T, float for bfloat16 input) is an output,
// kept for the backward: memory grows with T^2, which is why tg.optimize only
// rewrites attention with a short static sequence length.
//
// Layout (row-major): q of head h at qkv[b, t, h*D], k at [.., E + h*D], v at
// [.., 2E + h*D]; out[b, t, h*D]. BLAS is column-major, and a row-major
// matrix with leading dim ld is the column-major transpose with the same ld,
// so every product below is written for the transposes (NOTE: [Column-major]).
//
// With onednn=true the float32 forward runs its two products as two batched
// oneDNN matmuls over all (batch, head) pairs instead (NOTE: [Attention GEMMs
// on oneDNN]).
// Built for AVX2, the float32 forward runs each head on register-tiled SIMD
// loops instead of BLAS calls (NOTE: [Tiled attention on AVX2] in
// attention_tiles.h).

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "attention_tiles.h"
#include "onednn_matmul.h"
#include "vec_utils.h"

// The Fortran BLAS entry points of the BLAS that libtorch_cpu links (MKL in
// the x86 wheels). Weak: a torch without them still loads this library, and
// the kernels use the plain loops of naive_gemm instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace torchgraph::cpu {
namespace {

constexpr int64_t kBlock = 64;  // query/key rows per causal block

// C (m x n) = alpha * op(A) * op(B) + beta * C, column-major, op = 'N' or 'T'.
template <typename T>
void naive_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
                int ldb, T beta, T* c, int ldc) {
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      T sum = 0;
      for (int p = 0; p < k; ++p) {
        const T av = ta == 'N' ? a[i + p * lda] : a[p + i * lda];
        const T bv = tb == 'N' ? b[p + j * ldb] : b[j + p * ldb];
        sum += av * bv;
      }
      c[i + j * ldc] = alpha * sum + (beta == T(0) ? T(0) : beta * c[i + j * ldc]);
    }
  }
}

// One BLAS call; inside at::parallel_for the BLAS runs on the calling thread.
template <typename T>
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      return sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    }
  } else {
    if (dgemm_ != nullptr) {
      return dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    }
  }
  naive_gemm<T>(ta, tb, im, in, ik, alpha, a, ilda, b, ildb, beta, c, ildc);
}

struct Geometry {
  int64_t batch, seq, heads, head_dim, embed;
  bool causal;
  // Keys that query rows [q0, q1) see.
  int64_t keys(int64_t q1) const { return causal ? q1 : seq; }
  // Query rows that see key rows starting at k0.
  int64_t first_query(int64_t k0) const { return causal ? k0 : 0; }
};

// NOTE: [Column-major] For row-major X (r x c, leading dim ld), BLAS sees X^T
// (c x r, ld). So S = Q K^T (T x T) is computed as S^T = K Q^T: op(A) = K
// from the stored K^T with 'T', B = the stored Q^T with 'N'.

// The float32 forward of a build for AVX2 (the level measured): each head on SIMD tiles instead of BLAS
// calls (NOTE: [Tiled attention on AVX2] in attention_tiles.h).
void forward_tiled(const float* qkv, float* out, float* probs, const Geometry& g, float scale) {
  const int64_t ld = 3 * g.embed, T_ = g.seq, D = g.head_dim;
  at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panels(tiles::panel_floats(T_, D, D), 0.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.heads, h = task % g.heads;
      const float* q = qkv + b * T_ * ld + h * D;
      tiles::Head head;
      head.q = q;
      head.k = q + g.embed;
      head.v = q + 2 * g.embed;
      head.ldq = head.ldk = head.ldv = ld;
      head.out = out + b * T_ * g.embed + h * D;
      head.ldo = g.embed;
      head.probs = probs + task * T_ * T_;
      head.seq_q = head.seq_k = T_;
      head.head_dim = head.value_dim = D;
      head.causal = g.causal;
      head.scale = scale;
      tiles::head_attention(head, panels.data());
    }
  });
}

template <typename T>
void forward_kernel(const T* qkv, T* out, T* probs, const Geometry& g, T scale) {
  if constexpr (std::is_same_v<T, float> && tiles::kTiledAttention) {
    return forward_tiled(qkv, out, probs, g, scale);
  }
  const int64_t ld = 3 * g.embed, T_ = g.seq;
  at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.heads, h = task % g.heads;
      const T* q = qkv + b * T_ * ld + h * g.head_dim;
      const T* k = q + g.embed;
      const T* v = q + 2 * g.embed;
      T* o = out + b * T_ * g.embed + h * g.head_dim;
      T* p = probs + task * T_ * T_;
      for (int64_t q0 = 0; q0 < T_; q0 += kBlock) {
        const int64_t q1 = std::min(q0 + kBlock, T_), nk = g.keys(q1);
        // S[q0:q1, :nk] = scale * Q[q0:q1] K[:nk]^T
        gemm<T>('T', 'N', nk, q1 - q0, g.head_dim, scale, k, ld, q + q0 * ld, ld, T(0),
                p + q0 * T_, T_);
        for (int64_t i = q0; i < q1; ++i) {
          softmax_row(p + i * T_, g.causal ? i + 1 : T_, T_);
        }
        // O[q0:q1] = P[q0:q1, :nk] V[:nk]
        gemm<T>('N', 'N', g.head_dim, q1 - q0, nk, T(1), v, ld, p + q0 * T_, T_, T(0),
                o + q0 * g.embed, g.embed);
      }
    }
  });
}

// NOTE: [Attention GEMMs on oneDNN] On CPUs where MKL runs float32 GEMMs at
// half of oneDNN's rate (AMD: torchgraph/fused/cpu_profile.py), the per-head
// sgemm calls above run at ~130 GFLOP/s. Here the heads are first copied
// apart ([B * heads, T, D] each for q, k and v: 3 B T E values, cheap next to
// the products), then S = scale * Q K^T for every (batch, head) is one
// batched oneDNN matmul, the softmax runs over all rows in parallel, and
// O = P V is a second batched matmul whose result is copied back into the
// heads' columns. Causal attention computes the full products and masks in
// the softmax: two large calls beat 2 x T / 64 small ones (measured, 2
// threads, AMD EPYC: 8 x 128 x 4 heads of 64, causal: 0.53 ms full vs 0.59
// in 64-row blocks vs 0.84 for the sgemm kernel and 1.14 for split + SDPA +
// merge; ViT-S's 197 x 6 heads: 0.27 vs 0.46 for SDPA).
//
// bfloat16: S = Q K^T runs in float32 (q and k converted while the heads are
// copied apart), so the float32 softmax sees exact scores of the rounded
// inputs: rounding the scores to bfloat16 first made the output 25x less
// accurate than SDPA's bfloat16 flash kernel on peaky softmaxes (scores with
// std ~16). O = P V runs in bfloat16 (AVX512-BF16/AMX, float accumulation in
// oneDNN) on P rounded to bfloat16, as SDPA's flash kernel does; probs, kept
// for the backward, stay float32. The intermediates live in a per-thread
// workspace (NOTE: [Attention workspace] in onednn_matmul.h).
template <typename T>
void forward_onednn(const at::Tensor& x, const at::Tensor& out, const at::Tensor& probs,
                    const Geometry& g, float scale) {
#if AT_MKLDNN_ENABLED()
  const int64_t bh = g.batch * g.heads, T_ = g.seq, D = g.head_dim, heads_numel = bh * T_ * D;
  constexpr bool rounded = !std::is_same_v<T, float>;
  const at::ScalarType dtype = x.scalar_type();
  Workspace workspace(Workspace::bytes_for({{2 * heads_numel, at::kFloat}, {heads_numel, dtype},
                                            {rounded ? bh * T_ * T_ : 0, dtype}, {heads_numel, dtype}}));
  const at::Tensor parts = x.view({g.batch, T_, 3, g.heads, D}).permute({2, 0, 3, 1, 4});
  const at::Tensor qk = workspace.take({2, bh, T_, D}, at::kFloat);
  qk.view({2, g.batch, g.heads, T_, D}).copy_(parts.narrow(0, 0, 2));
  const at::Tensor v = workspace.take({bh, T_, D}, dtype);
  v.view({g.batch, g.heads, T_, D}).copy_(parts[2]);
  const at::Tensor scores = probs.view({bh, T_, T_});
  at::native::mkldnn_matmul(qk[0], qk[1].transpose(1, 2), scores, 0.f, scale);
  // The second product reads P in v's dtype: probs itself for float, a rounded copy for bfloat16.
  const at::Tensor p_rounded = rounded ? workspace.take({bh, T_, T_}, dtype) : scores;
  float* p = scores.mutable_data_ptr<float>();
  T* pr = p_rounded.mutable_data_ptr<T>();
  at::parallel_for(0, bh * T_, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      softmax_row(p + row * T_, g.causal ? row % T_ + 1 : T_, T_);
      if constexpr (rounded) {
        at::vec::convert(p + row * T_, pr + row * T_, T_);
      }
    }
  });
  const at::Tensor merged = workspace.take({bh, T_, D}, dtype);
  at::native::mkldnn_matmul(p_rounded, v, merged, 0.f, 1.f);
  out.view({g.batch, T_, g.heads, D}).copy_(merged.view({g.batch, g.heads, T_, D}).transpose(1, 2));
#else
  TORCH_INTERNAL_ASSERT(false, "forward_onednn: torch was built without oneDNN");
#endif
}

// dP = dO V^T; dS = P * (dP - rowsum(dP * P)) * scale; dQ = dS K; dK = dS^T Q;
// dV = P^T dO. With causal masking P and dS are zero above the diagonal, so
// key block [k0, k1) only needs the query rows from k0 on (the same kBlock
// boundaries as the query blocks, so every dS entry read was written).
//
// NOTE: [Row sums from P] rowsum(dP * P) equals the usual rowsum(dO * O) (O = P V), but reads the
// float32 P kept by the forward instead of the output, which is rounded to bfloat16 for bfloat16
// inputs. With O, the bfloat16 gradient's max error against float64 on (1, 33, 3 heads of 40), causal,
// scale 0.3, seed 0 was 0.022, twice that of the same math in float32 rounded once (0.0102; eager SDPA
// in bfloat16: 0.023); from P it is 0.0102. The kernel no longer reads `out` (the op's schema keeps it).
template <typename T>
void backward_kernel(const T* grad_out, const T* qkv, const T* probs, T* grad_qkv, const Geometry& g,
                     T scale) {
  using Vec = Vectorized<T>;
  const int64_t ld = 3 * g.embed, T_ = g.seq, D = g.head_dim;
  at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ds_buffer(T_ * T_);
    T* ds = ds_buffer.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.heads, h = task % g.heads;
      const int64_t qkv_offset = b * T_ * ld + h * D, out_offset = b * T_ * g.embed + h * D;
      const T *q = qkv + qkv_offset, *k = q + g.embed, *v = q + 2 * g.embed;
      T *dq = grad_qkv + qkv_offset, *dk = dq + g.embed, *dv = dq + 2 * g.embed;
      const T* dout = grad_out + out_offset;
      const T* p = probs + task * T_ * T_;
      for (int64_t q0 = 0; q0 < T_; q0 += kBlock) {
        const int64_t q1 = std::min(q0 + kBlock, T_), nk = g.keys(q1);
        // dP[q0:q1, :nk] = dO[q0:q1] V[:nk]^T
        gemm<T>('T', 'N', nk, q1 - q0, D, T(1), v, ld, dout + q0 * g.embed, g.embed, T(0),
                ds + q0 * T_, T_);
        for (int64_t i = q0; i < q1; ++i) {
          // NOTE: [Row sums from P]; P is zero past a row's visible keys
          const T dot = at::vec::map2_reduce_all<T>(
              [](const Vec& x, const Vec& y) { return x * y; },
              [](const Vec& x, const Vec& y) { return x + y; }, ds + i * T_, p + i * T_, nk);
          at::vec::map2(
              [dot, scale](const Vec& dp, const Vec& pv) { return pv * (dp - Vec(dot)) * Vec(scale); },
              ds + i * T_, ds + i * T_, p + i * T_, nk);
        }
        // dQ[q0:q1] = dS[q0:q1, :nk] K[:nk]
        gemm<T>('N', 'N', D, q1 - q0, nk, T(1), k, ld, ds + q0 * T_, T_, T(0), dq + q0 * ld, ld);
      }
      for (int64_t k0 = 0; k0 < T_; k0 += kBlock) {
        const int64_t k1 = std::min(k0 + kBlock, T_), first = g.first_query(k0);
        const int64_t nq = T_ - first;
        // dK[k0:k1] = dS[first:, k0:k1]^T Q[first:]; dV likewise with P and dO.
        gemm<T>('N', 'T', D, k1 - k0, nq, T(1), q + first * ld, ld, ds + first * T_ + k0, T_, T(0),
                dk + k0 * ld, ld);
        gemm<T>('N', 'T', D, k1 - k0, nq, T(1), dout + first * g.embed, g.embed,
                p + first * T_ + k0, T_, T(0), dv + k0 * ld, ld);
      }
    }
  });
}

Geometry geometry(const at::Tensor& qkv, int64_t heads, bool causal) {
  const int64_t head_dim = check_qkv_attention(qkv, heads);
  return {qkv.size(0), qkv.size(1), heads, head_dim, heads * head_dim, causal};
}

double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// bfloat16 runs in float: BLAS has no bfloat16 GEMM with these layouts, and
// the softmax wants float accuracy anyway.
at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? at::kFloat : t.scalar_type();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qkv_attention_cpu(
    const at::Tensor& qkv, int64_t heads, bool causal, std::optional<double> scale, bool onednn) {
  const Geometry g = geometry(qkv, heads, causal);
  TORCH_INTERNAL_ASSERT(qkv.device().is_cpu(), "qkv_attention_cpu: qkv must be a CPU tensor");
  const at::ScalarType type = compute_type(qkv);
  if (onednn && type == at::kFloat && qkv.numel() > 0 && onednn_available()) {
    const at::Tensor x = qkv.contiguous();
    at::Tensor out = at::empty({g.batch, g.seq, g.embed}, x.options());
    at::Tensor probs = at::empty({g.batch, heads, g.seq, g.seq}, x.options().dtype(at::kFloat));
    const float s = static_cast<float>(resolve_scale(scale, g.head_dim));
    if (x.scalar_type() == at::kBFloat16) {
      forward_onednn<at::BFloat16>(x, out, probs, g, s);
    } else {
      forward_onednn<float>(x, out, probs, g, s);
    }
    return {out, probs};
  }
  const at::Tensor x = qkv.to(type).contiguous();
  at::Tensor out = at::empty({g.batch, g.seq, g.embed}, x.options());
  at::Tensor probs = at::empty({g.batch, heads, g.seq, g.seq}, x.options());
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(type, "qkv_attention_cpu", [&] {
      forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                               probs.mutable_data_ptr<scalar_t>(), g,
                               static_cast<scalar_t>(resolve_scale(scale, g.head_dim)));
    });
  }
  return {out.to(qkv.scalar_type()), probs};
}

at::Tensor qkv_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
    const at::Tensor& probs, int64_t heads, bool causal, std::optional<double> scale) {
  check_qkv_attention_backward(grad_out, qkv, out, probs, heads);
  const Geometry g = geometry(qkv, heads, causal);
  TORCH_INTERNAL_ASSERT(qkv.device().is_cpu(), "qkv_attention_backward_cpu: CPU tensors only");
  const at::ScalarType type = compute_type(qkv);
  const at::Tensor x = qkv.to(type).contiguous();
  const at::Tensor dout = grad_out.to(type).contiguous();
  const at::Tensor p = probs.to(type).contiguous();
  at::Tensor grad_qkv = at::empty(x.sizes(), x.options());
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(type, "qkv_attention_backward_cpu", [&] {
      backward_kernel<scalar_t>(
          dout.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(),
          grad_qkv.mutable_data_ptr<scalar_t>(), g,
          static_cast<scalar_t>(resolve_scale(scale, g.head_dim)));
    });
  }
  return grad_qkv.to(qkv.scalar_type());
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("qkv_attention", &qkv_attention_cpu);
  m.impl("qkv_attention_backward", &qkv_attention_backward_cpu);
}

}  // namespace torchgraph::cpu
