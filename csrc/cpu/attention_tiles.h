// attention_tiles: one head's float32 attention, O = softmax(scale * Q K^T) V,
// with its two products as register-tiled SIMD loops instead of BLAS calls.
//
// NOTE: [Tiled attention on AVX2] On a CPU without AVX-512 (AMD EPYC Zen 3, 2
// threads) the BLAS that torch links (MKL) runs the per-head products of
// qkv_attention's forward (128 x 128 x 64 at GPT's shape) at ~40 GFLOP/s, a
// quarter of this machine's peak, and oneDNN's matmul does not run there
// (NOTE: [oneDNN matmul needs AVX-512] in onednn_matmul.h). Here each product
// is a loop of tiles of kTileRows query rows x 2 vectors, whose accumulators
// stay in registers (12 of the 16 AVX2 registers). Both operands are first
// packed into panels two vectors wide (K transposed, V copied), contiguous
// per tile: read in place, K's rows lie 3E floats apart, which maps a tile's
// loads onto a few L1 sets, and the tiles ran at half the speed. Causal
// attention computes a row block's scores only up to its last row's keys.
// The softmax is exact, with ATen's faster float exponential (exp_u20).
// Measured as a standalone extension against the BLAS forward it replaced
// (qkv_attention, onednn=false; 2 threads, medians): 8 x 128 x 4 heads of 64,
// causal 0.78 vs 1.40 ms, not causal 1.15 vs 1.70; ViT-S's 197 x 6 heads
// 0.52 vs 0.70; 8 x 32 x 4 heads of 16 0.04 vs 0.13; 512 x 8 heads causal
// 3.7 vs 5.7 and not causal 6.1 vs 6.5; every value within 1e-6 of it. The
// keys are transposed in 8 x 8 blocks (at::vec::transpose_mxn).
// Against SDPA: benchmarks/bench_attention.py.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vec_utils.h"

namespace torchgraph::cpu::tiles {

// Whether the kernels run their float32 attention on these tiles: builds for AVX2, the level measured.
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kTiledAttention = true;
#else
constexpr bool kTiledAttention = false;
#endif

using Vec = at::vec::Vectorized<float>;
// Keys (scores) or head features (output) a tile covers: two vectors.
constexpr int64_t kTileWidth = 2 * Vec::size();
// Query rows a tile covers: 6 x 2 accumulators, 2 operand vectors and a broadcast fill 15 of AVX2's 16
// registers (4 rows: 0.75-0.8x the speed at GPT's shape).
constexpr int64_t kTileRows = 6;

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Stores `count` (<= kTileWidth) lanes of lo | hi at out.
// NOTE: always inlined, like the tiles below: an out-of-line call left gcc 12 storing all 12 accumulators
// to the stack on every step of the tile's loop (half the speed).
__attribute__((always_inline)) inline void store_tile_row(Vec lo, Vec hi, float* out, int64_t count) {
  if (count >= kTileWidth) {
    lo.store(out);
    hi.store(out + Vec::size());
  } else if (count > Vec::size()) {
    lo.store(out);
    hi.store(out + Vec::size(), count - Vec::size());
  } else {
    lo.store(out, count);
  }
}

// scores[r, 0:count] = scale * q_r . keys 0:count of one key panel, for R query rows (q rows ldq apart,
// scores rows lds apart). The panel holds kTileWidth keys per feature: panel[d * kTileWidth + j].
template <int R>
__attribute__((always_inline)) inline void score_tile(const float* q, int64_t ldq, const float* panel,
                                                      int64_t head_dim, float scale, float* scores, int64_t lds,
                                                      int64_t count) {
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = Vec(0.f);
    acc[r][1] = Vec(0.f);
  }
  for (int64_t d = 0; d < head_dim; ++d) {
    const Vec k0 = Vec::loadu(panel + d * kTileWidth), k1 = Vec::loadu(panel + d * kTileWidth + Vec::size());
    for (int r = 0; r < R; ++r) {
      const Vec qd(q[r * ldq + d]);
      acc[r][0] = at::vec::fmadd(qd, k0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(qd, k1, acc[r][1]);
    }
  }
  const Vec s(scale);
  for (int r = 0; r < R; ++r) store_tile_row(acc[r][0] * s, acc[r][1] * s, scores + r * lds, count);
}

// out[r, 0:count] = sum over keys j < keys of probs[r, j] * panel[j], for R query rows. The panel holds
// kTileWidth features per key (zeros past the head's last feature).
template <int R>
__attribute__((always_inline)) inline void value_tile(const float* probs, int64_t ldp, const float* panel,
                                                      int64_t keys, float* out, int64_t ldo, int64_t count) {
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = Vec(0.f);
    acc[r][1] = Vec(0.f);
  }
  for (int64_t j = 0; j < keys; ++j) {
    const Vec v0 = Vec::loadu(panel + j * kTileWidth), v1 = Vec::loadu(panel + j * kTileWidth + Vec::size());
    for (int r = 0; r < R; ++r) {
      const Vec p(probs[r * ldp + j]);
      acc[r][0] = at::vec::fmadd(p, v0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(p, v1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) store_tile_row(acc[r][0], acc[r][1], out + r * ldo, count);
}

// Workspace floats for one head's two panels: `keys` keys of `head_dim` features, values of `value_dim`.
inline int64_t panel_floats(int64_t keys, int64_t head_dim, int64_t value_dim) {
  return round_up(keys, kTileWidth) * head_dim + round_up(value_dim, kTileWidth) * keys;
}

// One (batch, head) problem: row-major matrices with unit stride along their last dim, rows `ld*` floats apart.
struct Head {
  const float* q;  // seq_q x head_dim
  int64_t ldq;
  const float* k;  // seq_k x head_dim
  int64_t ldk;
  const float* v;  // seq_k x value_dim
  int64_t ldv;
  float* out;  // seq_q x value_dim
  int64_t ldo;
  float* probs;  // seq_q x seq_k, rows seq_k apart: the softmax, written
  const float* mask = nullptr;  // additive, seq_q x seq_k, rows mask_ld apart; or none
  int64_t mask_ld = 0;
  int64_t seq_q, seq_k, head_dim, value_dim;
  bool causal;  // query i sees keys 0..i (SDPA's top-left alignment)
  float scale;
};

// Keys that query rows up to i1 (exclusive) see.
inline int64_t visible_keys(const Head& h, int64_t i1) { return h.causal ? std::min(i1, h.seq_k) : h.seq_k; }

template <int R>
inline void score_rows(const Head& h, const float* keys, int64_t i0, int64_t j0) {
  const int64_t visible = visible_keys(h, i0 + R);
  if (j0 < visible) {
    score_tile<R>(h.q + i0 * h.ldq, h.ldq, keys, h.head_dim, h.scale, h.probs + i0 * h.seq_k + j0, h.seq_k,
                  std::min(kTileWidth, visible - j0));
  }
}

template <int R>
inline void value_rows(const Head& h, const float* values, int64_t i0, int64_t d0) {
  // probs are zero past a row's visible keys
  value_tile<R>(h.probs + i0 * h.seq_k, h.seq_k, values, visible_keys(h, i0 + R), h.out + i0 * h.ldo + d0, h.ldo,
                std::min(kTileWidth, h.value_dim - d0));
}

// K transposed into panels of kTileWidth keys: panel p holds keys[p * kTileWidth + j][d] at
// [p * head_dim * kTileWidth + d * kTileWidth + j]; whole 8 x 8 blocks as one vector transpose each.
inline void pack_keys(const Head& h, float* keys) {
  constexpr int64_t kBlock = 8;
  for (int64_t j0 = 0; j0 < h.seq_k; j0 += kBlock) {
    float* panel = keys + j0 / kTileWidth * h.head_dim * kTileWidth + j0 % kTileWidth;
    const float* key = h.k + j0 * h.ldk;
    int64_t d0 = 0;
    if (j0 + kBlock <= h.seq_k) {
      for (; d0 + kBlock <= h.head_dim; d0 += kBlock) {
        at::vec::transpose_mxn<float, kBlock, kBlock>(key + d0, h.ldk, panel + d0 * kTileWidth, kTileWidth);
      }
    }
    for (int64_t j = 0; j < std::min(kBlock, h.seq_k - j0); ++j) {
      for (int64_t d = d0; d < h.head_dim; ++d) panel[d * kTileWidth + j] = key[j * h.ldk + d];
    }
  }
}

// softmax(scale * Q K^T + mask) V for one head. `panels` holds panel_floats(seq_k, head_dim, value_dim)
// floats, zero past what a head writes (the caller zeroes it once: every head of one shape writes the same
// entries).
inline void head_attention(const Head& h, float* panels) {
  float* keys = panels;  // per kTileWidth keys: head_dim x kTileWidth, K transposed
  float* values = panels + round_up(h.seq_k, kTileWidth) * h.head_dim;  // per kTileWidth features: seq_k x kTileWidth
  pack_keys(h, keys);
  for (int64_t d0 = 0; d0 < h.value_dim; d0 += kTileWidth) {
    const int64_t count = std::min(kTileWidth, h.value_dim - d0);
    float* panel = values + d0 * h.seq_k;
    for (int64_t j = 0; j < h.seq_k; ++j) {
      std::copy(h.v + j * h.ldv + d0, h.v + j * h.ldv + d0 + count, panel + j * kTileWidth);
    }
  }
  const int64_t full = h.seq_q / kTileRows * kTileRows;
  for (int64_t j0 = 0; j0 < h.seq_k; j0 += kTileWidth) {
    const float* panel = keys + j0 * h.head_dim;
    // causal: rows before j0 see none of these keys
    for (int64_t i0 = h.causal ? std::min(j0, full) / kTileRows * kTileRows : 0; i0 < full; i0 += kTileRows) {
      score_rows<kTileRows>(h, panel, i0, j0);
    }
    for (int64_t i0 = full; i0 < h.seq_q; ++i0) score_rows<1>(h, panel, i0, j0);
  }
  for (int64_t i = 0; i < h.seq_q; ++i) {
    float* row = h.probs + i * h.seq_k;
    const int64_t visible = visible_keys(h, i + 1);
    if (h.mask != nullptr) {
      at::vec::map2([](const Vec& x, const Vec& y) { return x + y; }, row, row, h.mask + i * h.mask_ld, visible);
    }
    softmax_row(row, visible, h.seq_k);
  }
  for (int64_t d0 = 0; d0 < h.value_dim; d0 += kTileWidth) {
    const float* panel = values + d0 * h.seq_k;
    for (int64_t i0 = 0; i0 < full; i0 += kTileRows) value_rows<kTileRows>(h, panel, i0, d0);
    for (int64_t i0 = full; i0 < h.seq_q; ++i0) value_rows<1>(h, panel, i0, d0);
  }
}

}  // namespace torchgraph::cpu::tiles
