// gemm_act_inference: y = act(x @ W^T + bias + residual), float32, for the GEMMs of 1x1 convolutions
// on channels_last maps (and im2col'd small ones). Inference only.
//
// Why: on a CPU with AVX2 only, oneDNN's float32 matmul runs the GEMMs of MobileNetV2's and
// ResNet-50's 1x1 convolutions (32 to 8,192 rows, 16 to 2,048 channels) at 45-100 GFLOP/s on two
// cores, about one core's worth: below ~1,000 rows it hardly uses the second thread, and it costs
// ~25 us a call before any arithmetic. ONNX Runtime's MLAS ran the same layers 1.5-2x faster. This is
// the textbook register-tiled GEMM (NOTE: [Register tiles]), parallel over rows or, for few rows,
// over output channels, with the bias, residual and activation applied in registers before the one
// store (NOTE: [GEMM kernel] in torchgraph/fused/conv.py has the measurements).
//
// Layout: x is (M, K) with unit column stride (any row stride: a channels_last map's pixels as rows
// without a copy). The filters come as panels: (P, K, 16), P = ceil(N / 16), panel p holding output
// channels 16p .. 16p + 15 for every k, zero beyond N (torchgraph.ops.gemm_panels builds them once).
// residual, if given, is (M, N) with unit column stride. y is a new (M, N) row-major matrix. Sums run
// in float32 from zero, k in order; the bias, residual and activation follow in that order.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <utility>
#include <string>

#include "../common.h"
#include "epilogue_acts.h"
#include "gemm_act.h"
#include "vec_utils.h"

namespace torchgraph::cpu {
namespace {

using FVec = Vectorized<float>;
constexpr int kLanes = FVec::size();
// Output channels per panel: the panels' layout, the same for every SIMD width.
constexpr int kPanel = kGemmPanel;
constexpr int kVecsPerPanel = kPanel / kLanes;
static_assert(kPanel % kLanes == 0, "a panel must be whole vectors");

// NOTE: [Register tiles] Each tile keeps kRows rows x kPanels panels of accumulators in vector
// registers and, per k, loads the panels' 16 weights once and broadcasts each row's x[row, k] once:
// AVX2 (16 ymm registers) 6 rows x 1 panel = 12 accumulators + 2 weight vectors + 1 broadcast;
// AVX-512 (32 zmm) 12 rows x 2 panels = 24 + 2 + 1. Per k that is 12 (24) FMAs for 8 (14) loads,
// enough to keep both FMA pipes busy from L1. Measured alone (2 threads, float32, medians), AVX2 at
// 2.45 GHz: 82-90 GFLOP/s a core, 100-165 GFLOP/s on two.
constexpr int kRows = kLanes == 16 ? 12 : 6;
constexpr int kPanels = kLanes == 16 ? 2 : 1;

// Rows of x and panels of weights one task works through together: the panels a row tile meets
// stay in L2 (this many bytes of them) while the rows stream past.
constexpr int64_t kPanelBytes = 256 * 1024;
// Sums over more than this many k run in blocks of it (the partial sums kept in y), so that a
// tile's rows of x stay in L1.
constexpr int64_t kMaxDepth = 1024;
constexpr int64_t kDepthBlock = 512;

struct Epilogue {
  const float* bias;      // at the tile's first column, or null
  const float* residual;  // at the tile's first row and column, or null
  int64_t residual_stride;
};

// Lanes of vector v of a tile row that hold output channels (ncols of them in the tile).
C10_ALWAYS_INLINE int lanes(int ncols, int v) {
  return std::clamp(ncols - v * kLanes, 0, kLanes);
}

// Lanes of vector v that hold output channels, a constant (all of them) in a tile whose columns all exist.
template <bool Full>
C10_ALWAYS_INLINE int lanes(int ncols, int v) {
  return Full ? kLanes : lanes(ncols, v);
}

// NOTE: with n the constant kLanes (a whole tile's lanes<true>) these are the plain vector load and store.
C10_ALWAYS_INLINE FVec load(const float* p, int n) {
  return n == kLanes ? FVec::loadu(p) : FVec::loadu(p, n);
}

C10_ALWAYS_INLINE void store(const FVec& v, float* p, int n) {
  n == kLanes ? v.store(p) : v.store(p, n);
}

// One tile: R rows x PP panels (ncols of whose channels exist; all of them where Full) over k in
// [k0, k1). first: the sums start from zero, else from y; epilogue: the last k block (bias, residual,
// activation A).
//
// NOTE: [Compile-time epilogues] The activation and whether the tile's columns are all real channels
// are template arguments, not run-time values: with them known the compiler drops the per-vector
// switch and the masked loads and stores (which go through a stack buffer) from the epilogue. With
// short sums the epilogue is a large part of a tile's work: on two AVX2 cores (interleaved medians,
// against the run-time version, bit-identical outputs) 12,544 x 16 -> 96 + ReLU6 took 0.71x the time,
// 12,544 x 32 -> 16 0.80x, 3,136 x 24 -> 144 + ReLU6 0.74x and 784 x 32 -> 192 + ReLU6 0.80x; with
// K = 144 0.95x, and from K = 256 0.96-1.0x. Reading the epilogue's pointers once before its stores
// (which the compiler could not prove leave them alone) took another 1-6% off the short ones.
//
// Gathered: row i's k-th input is x[i * ldx + offsets[k]] instead of x[i * ldx + k] (NOTE: [Implicit GEMM]).
template <int R, int PP, Act A, bool Full, bool Gathered>
void tile(const float* x, int64_t ldx, const int64_t* offsets, const float* panels, int64_t panel_size, int64_t k0,
          int64_t k1, float* y, int64_t ldy, int ncols, bool first, const Epilogue* epilogue) {
  constexpr int kAcc = PP * kVecsPerPanel;
  FVec acc[R][kAcc];
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kAcc; ++v) {
      const int n = lanes<Full>(ncols, v);
      acc[i][v] = first || n == 0 ? FVec(0.f) : load(y + i * ldy + v * kLanes, n);
    }
  }
  // NOTE: [Prefetching the tile's outputs] The tile's rows of y are fetched for writing while the
  // sums run, so that its stores do not wait on them: where y is larger than L2 (the GPT block's
  // 1,024 x 768 qkv) that took the K = 256 GEMMs from ~105 to ~118 GFLOP/s on two AVX2 cores, level
  // with oneDNN's. (Checking for it inside the k loop, as a tuning switch did, halved the speed; leaving
  // it out where the sums are short, under 64 k, cost 3-16% on MobileNetV2's K = 16-32 shapes.)
  for (int i = 0; i < R; ++i) {
    __builtin_prefetch(y + i * ldy, 1, 3);
    __builtin_prefetch(y + i * ldy + PP * kPanel - 1, 1, 3);
  }
  for (int64_t k = k0; k < k1; ++k) {
    FVec w[kAcc];
#pragma GCC unroll 4
    for (int v = 0; v < kAcc; ++v) {
      w[v] = FVec::loadu(panels + (v / kVecsPerPanel) * panel_size + k * kPanel + (v % kVecsPerPanel) * kLanes);
    }
    const int64_t column = Gathered ? offsets[k] : k;
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      const FVec xi(x[i * ldx + column]);
#pragma GCC unroll 4
      for (int v = 0; v < kAcc; ++v) acc[i][v] = at::vec::fmadd(xi, w[v], acc[i][v]);
    }
  }
  const float* const bias_at = epilogue ? epilogue->bias : nullptr;
  const float* const residual_at = epilogue ? epilogue->residual : nullptr;
  const int64_t residual_stride = epilogue ? epilogue->residual_stride : 0;
#pragma GCC unroll 4
  for (int v = 0; v < kAcc; ++v) {
    const int n = lanes<Full>(ncols, v);
    if (n == 0) continue;
    const FVec bias = bias_at ? load(bias_at + v * kLanes, n) : FVec(0.f);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      FVec out = acc[i][v];
      if (epilogue) {
        out = out + bias;
        if (residual_at) out = out + load(residual_at + i * residual_stride + v * kLanes, n);
        out = activate(out, A);
      }
      store(out, y + i * ldy + v * kLanes, n);
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const int64_t*, const float*, int64_t, int64_t, int64_t, float*,
                        int64_t, int, bool, const Epilogue*);

template <int PP, Act A, bool Full, bool Gathered, int... Rs>
constexpr std::array<TileFn, sizeof...(Rs)> tiles(std::integer_sequence<int, Rs...>) {
  return {&tile<Rs + 1, PP, A, Full, Gathered>...};
}
// Tiles<A, G>::pick(last, full)[r - 1]: the tile of r rows (the last rows of a block may be fewer than kRows);
// last: of one panel, for the last of an odd number of panels where kPanels is 2.
template <Act A, bool Gathered>
struct Tiles {
  static constexpr auto kSeq = std::make_integer_sequence<int, kRows>{};
  static constexpr std::array<std::array<TileFn, kRows>, 4> kAll = {
      tiles<kPanels, A, false, Gathered>(kSeq), tiles<kPanels, A, true, Gathered>(kSeq),
      tiles<1, A, false, Gathered>(kSeq), tiles<1, A, true, Gathered>(kSeq)};
  static const std::array<TileFn, kRows>& pick(bool last, bool full) { return kAll[2 * last + full]; }
};

// Calls body(Tiles<A, Gathered>{}) for the activation act, A a compile-time constant there.
template <bool Gathered, typename Body>
void run_tiles(Act act, Body&& body) {
  switch (act) {
    case Act::kNone: return body(Tiles<Act::kNone, Gathered>{});
    case Act::kRelu: return body(Tiles<Act::kRelu, Gathered>{});
    case Act::kRelu6: return body(Tiles<Act::kRelu6, Gathered>{});
    case Act::kSilu: return body(Tiles<Act::kSilu, Gathered>{});
    case Act::kHardswish: return body(Tiles<Act::kHardswish, Gathered>{});
    case Act::kGelu: return body(Tiles<Act::kGelu, Gathered>{});
    case Act::kGeluTanh: return body(Tiles<Act::kGeluTanh, Gathered>{});
  }
}

static_assert(kPanels * kPanel == kGemmBlock, "a tile's columns must be one block of gemm_act_blocked's output");

// The tiles of rows [m0, m1) x panel groups [g0, g1) (NOTE: [Register tiles]): sums in blocks of depth_block k,
// the panels of groups_in_l2 groups at a time. Group g's columns start at yp + g * y_group_stride where that is
// given (gemm_act_blocked), else at column g * kGemmBlock of y.
template <typename TileSet>
void run_block(TileSet, const float* xp, int64_t ldx, const int64_t* offsets, int64_t m0, int64_t m1, int64_t K,
               const float* wp, int64_t N, int64_t g0, int64_t g1, const float* bp, const float* rp, int64_t ldr,
               float* yp, int64_t ldy, int64_t y_group_stride = 0) {
  const int64_t P = (N + kPanel - 1) / kPanel;
  const int64_t depth_block = K > kMaxDepth ? kDepthBlock : std::max<int64_t>(K, 1);
  const int64_t groups_in_l2 =
      std::max<int64_t>(1, kPanelBytes / (std::min(K, depth_block) * kPanel * kPanels * int64_t(sizeof(float)) + 1));
  const int64_t panel_size = K * kPanel;
  for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += depth_block) {
    const int64_t k1 = std::min(K, k0 + depth_block);
    const bool first = k0 == 0, last = k1 == K;
    for (int64_t ga = g0; ga < g1; ga += groups_in_l2) {
      const int64_t gz = std::min(g1, ga + groups_in_l2);
      for (int64_t m = m0; m < m1; m += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
        for (int64_t g = ga; g < gz; ++g) {
          const int64_t col = g * kPanels * kPanel;
          const int ncols = static_cast<int>(std::min<int64_t>(kPanels * kPanel, N - col));
          const Epilogue epilogue{bp ? bp + col : nullptr, rp ? rp + m * ldr + col : nullptr, ldr};
          const bool last_group = (g + 1) * kPanels > P;
          const bool full = ncols == (last_group ? 1 : kPanels) * kPanel;
          const auto& kernels = TileSet::pick(last_group, full);
          float* const y_at = yp + m * ldy + (y_group_stride ? g * y_group_stride : col);
          kernels[rows - 1](xp + m * ldx, ldx, offsets, wp + g * kPanels * panel_size, panel_size, k0, k1, y_at, ldy,
                            ncols, first, last ? &epilogue : nullptr);
        }
      }
    }
  }
}

void check_gemm_act_inference(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, int64_t out_features) {
  const char* op = "gemm_act_inference";
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, in_features), got shape ", x.sizes());
  TORCH_CHECK(panels.scalar_type() == at::kFloat, op, ": panels must be float32, got ", panels.scalar_type());
  const int64_t P = (out_features + kPanel - 1) / kPanel;
  TORCH_CHECK(out_features > 0 && panels.dim() == 3 && panels.size(0) == P && panels.size(1) == x.size(1) &&
                  panels.size(2) == kPanel,
              op, ": panels must have shape [", P, ", ", x.size(1), ", 16] for ", out_features,
              " output features and ", x.size(1), " input features (ops.gemm_panels(weight)), got ",
              panels.sizes());
  check_float32_bias(op, "bias", bias, out_features);
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == x.size(0) && residual->size(1) == out_features, op,
                ": residual must have shape [", x.size(0), ", ", out_features, "], got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == at::kFloat, op, ": residual must be float32, got ",
                residual->scalar_type());
  }
}

}  // namespace

at::Tensor gemm_act_inference_cpu(const at::Tensor& x_in, const at::Tensor& panels_in,
                                  const std::optional<at::Tensor>& bias_in,
                                  const std::optional<at::Tensor>& residual_in, int64_t out_features,
                                  c10::string_view act_name) {
  check_gemm_act_inference(x_in, panels_in, bias_in, residual_in, out_features);
  const Act act = parse_act(std::string(act_name), "gemm_act_inference", /*gelus=*/true);
  const at::Tensor x = x_in.stride(1) == 1 && x_in.stride(0) >= x_in.size(1) ? x_in : x_in.contiguous();
  const at::Tensor panels = panels_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor residual;
  if (residual_in.has_value()) {
    residual = residual_in->stride(1) == 1 && residual_in->stride(0) >= out_features ? *residual_in
                                                                                    : residual_in->contiguous();
  }
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  gemm_act(x.const_data_ptr<float>(), x.stride(0), M, K, panels.const_data_ptr<float>(), N,
           bias.defined() ? bias.const_data_ptr<float>() : nullptr,
           residual.defined() ? residual.const_data_ptr<float>() : nullptr,
           residual.defined() ? residual.stride(0) : 0, act, y.mutable_data_ptr<float>(), N);
  return y;
}

void gemm_act(const float* xp, int64_t ldx, int64_t M, int64_t K, const float* wp, int64_t N, const float* bp,
              const float* rp, int64_t ldr, Act act, float* yp, int64_t ldy) {
  const int64_t P = (N + kPanel - 1) / kPanel;
  // Tasks: one block of rows per thread where each gets >= 4 row tiles and the rows outnumber the
  // output channels; otherwise the panels are split between the threads and every task takes all rows.
  // NOTE: with fewer rows than output channels the weight is the larger operand: split by rows, every
  // thread would read all of it. Split by panels, each reads its half once, and the rows, the smaller
  // operand, twice. That took 49 x 1024 -> 2048 (ResNet-50's last downsampling at batch 1) and
  // 100 x 2048 -> 1000 (a classifier head) to 0.90-0.92x the time, 49 x 2048 -> 512 to 0.95x, and left
  // ViT-S's 197-row shapes and MobileNetV2's 49-row ones level (0.98-1.0x; 2 threads, medians of 150).
  const int64_t threads = at::get_num_threads();
  const int64_t tile_groups = (P + kPanels - 1) / kPanels;
  int64_t row_tasks = 1, panel_tasks = 1;
  if (threads > 1) {
    if ((M >= threads * 4 * kRows && M >= N) || tile_groups < threads) {
      row_tasks = std::min<int64_t>(threads, (M + kRows - 1) / kRows);
    } else {
      panel_tasks = std::min<int64_t>(threads, tile_groups);
    }
  }
  const int64_t rows_per_task = ((M + row_tasks - 1) / row_tasks + kRows - 1) / kRows * kRows;
  const int64_t groups_per_task = (tile_groups + panel_tasks - 1) / panel_tasks;
  run_tiles<false>(act, [&](auto tile_set) {
    at::parallel_for(0, row_tasks * panel_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t m0 = (task / panel_tasks) * rows_per_task, m1 = std::min(M, m0 + rows_per_task);
        const int64_t g0 = (task % panel_tasks) * groups_per_task;
        const int64_t g1 = std::min(tile_groups, g0 + groups_per_task);
        run_block(tile_set, xp, ldx, nullptr, m0, m1, K, wp, N, g0, g1, bp, rp, ldr, yp, ldy);
      }
    });
  });
}

void gemm_act_gathered(const float* xp, int64_t ldx, const int64_t* offsets, int64_t M, int64_t K, const float* wp,
                       int64_t N, const float* bp, Act act, float* yp, int64_t ldy) {
  const int64_t tile_groups = ((N + kPanel - 1) / kPanel + kPanels - 1) / kPanels;
  run_tiles<true>(act, [&](auto tile_set) {
    run_block(tile_set, xp, ldx, offsets, 0, M, K, wp, N, 0, tile_groups, bp, nullptr, 0, yp, ldy);
  });
}

void gemm_act_blocked(const float* xp, int64_t ldx, int64_t M, int64_t K, const float* wp, int64_t N,
                      const float* bp, Act act, float* yp, int64_t block_stride) {
  const int64_t tile_groups = ((N + kPanel - 1) / kPanel + kPanels - 1) / kPanels;
  run_tiles<false>(act, [&](auto tile_set) {
    run_block(tile_set, xp, ldx, nullptr, 0, M, K, wp, N, 0, tile_groups, bp, nullptr, 0, yp, kGemmBlock,
              block_stride);
  });
}

TORCH_LIBRARY_IMPL(torchgraph, CPU, m) {
  m.impl("gemm_act_inference", &gemm_act_inference_cpu);
}

}  // namespace torchgraph::cpu
