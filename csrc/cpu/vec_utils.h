// Small SIMD building blocks for the CPU kernels.
//
// Kernels compute in acc_t<T> (float for float and bfloat16, double for
// double) and move data in steps of kStep<T> elements = two accumulator
// vectors, so one loop body serves every dtype: a bfloat16 step is one
// Vectorized<BFloat16> load widened to two Vectorized<float>.
//
// The math helpers (vexp, verf, relu, ...) are overloaded for scalars and
// Vectorized so an activation written once as a template runs in both the
// vector body and the scalar tail of a loop.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

namespace torchgraph::cpu {

using at::vec::Vectorized;

template <typename T>
using acc_t = at::opmath_type<T>;
template <typename T>
using AccVec = Vectorized<acc_t<T>>;
template <typename T>
constexpr int64_t kStep = 2 * AccVec<T>::size();

template <typename T>
constexpr bool is_reduced_v = !std::is_same_v<acc_t<T>, T>;

// Loads kStep<T> elements at p as two accumulator vectors.
template <typename T>
inline void load2(const T* p, AccVec<T>& lo, AccVec<T>& hi) {
  if constexpr (is_reduced_v<T>) {
    static_assert(Vectorized<T>::size() == kStep<T>, "reduced vector must widen to two");
    std::tie(lo, hi) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  } else {
    lo = AccVec<T>::loadu(p);
    hi = AccVec<T>::loadu(p + AccVec<T>::size());
  }
}

// Stores two accumulator vectors as kStep<T> elements at p (rounding to T).
template <typename T>
inline void store2(T* p, const AccVec<T>& lo, const AccVec<T>& hi) {
  if constexpr (is_reduced_v<T>) {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  } else {
    lo.store(p);
    hi.store(p + AccVec<T>::size());
  }
}

// ------------------------------------------------ scalar/vector math overloads

template <typename S>
inline std::enable_if_t<std::is_floating_point_v<S>, S> vexp(S x) { return std::exp(x); }
template <typename S>
inline Vectorized<S> vexp(const Vectorized<S>& x) { return x.exp(); }

template <typename S>
inline std::enable_if_t<std::is_floating_point_v<S>, S> verf(S x) { return std::erf(x); }
template <typename S>
inline Vectorized<S> verf(const Vectorized<S>& x) { return x.erf(); }

// NOTE: [Rational erf]
// Vectorized<float>::erf() costs a division plus an out-of-line Sleef exp call
// per vector, which makes exact GELU compute-bound at ~0.7 ns per element on
// one core. Here erf(x) = x * P(x^2) / Q(x^2) for |x| <= 3.925 (beyond that,
// erf(x) rounds to +-1 in float): ten FMAs and one division, about 1.5x
// faster. P (degree 5) and Q (degree 5, Q(0) = 1) were fitted by iteratively
// reweighted least squares on the absolute error of erf over [0, 3.925];
// evaluated in float32 the maximum absolute error is 2.6e-7 (torch's erf:
// 1.5e-7). test_bias_act_gelu_accuracy_over_range checks it against float64.
inline Vectorized<float> verf(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V xc = at::vec::clamp(x, V(-3.925f), V(3.925f));  // NaN stays NaN
  const V t = xc * xc;
  V p(2.086867848e-06f);
  p = at::vec::fmadd(p, t, V(2.864857464e-04f));
  p = at::vec::fmadd(p, t, V(3.736114750e-03f));
  p = at::vec::fmadd(p, t, V(5.266094192e-02f));
  p = at::vec::fmadd(p, t, V(1.894179679e-01f));
  p = at::vec::fmadd(p, t, V(1.128379076e+00f));
  V q(3.855763848e-05f);
  q = at::vec::fmadd(q, t, V(1.159699853e-03f));
  q = at::vec::fmadd(q, t, V(1.490663903e-02f));
  q = at::vec::fmadd(q, t, V(1.137402825e-01f));
  q = at::vec::fmadd(q, t, V(5.011995409e-01f));
  q = at::vec::fmadd(q, t, V(1.0f));
  return at::vec::clamp(xc * p / q, V(-1.0f), V(1.0f));
}

// NOTE: [Exp in registers] exp(x) with no call (Vectorized<float>::exp() calls Sleef out of line, and a
// call spills every live vector register: NOTE: [GELU's erf in registers] in epilogue_acts.h), for the
// sigmoids of the kernels' epilogues. Cephes' expf: x = n ln2 + r with n = round(x log2 e) and ln2 split in
// two for an exact r, e^r by a degree-7 polynomial, 2^n from the exponent bits. x is clamped to
// [-87.33, 88] so that 2^n stays a normal float (NaN stays NaN): below -87.33 the result is e^-87.33
// rather than a subnormal or zero, above 88 it is e^88 rather than up to 3.4e38 or inf. A sigmoid
// 1 / (1 + exp(-x)) then differs from torch's by less than 1e-36 there. Relative error within [-87.33, 88]:
// ~1 ulp (tests/test_gemm_kernel.py, test_transcendental_epilogues_are_accurate_over_their_range).
inline Vectorized<float> exp_in_registers(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V xc = at::vec::clamp(x, V(-87.3365f), V(88.0f));
  const V n = (xc * V(1.44269504088896341f)).round();
  V r = at::vec::fmadd(n, V(-0.693359375f), xc);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, V(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, V(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, V(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, V(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, V(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + V(1.0f));
  const auto bits = (at::vec::convert_to_int_of_same_size(n) + Vectorized<int32_t>(127)) << Vectorized<int32_t>(23);
  return p * at::vec::cast<float>(bits);
}

// max(x, 0) that propagates NaN like torch.relu.
template <typename S>
inline std::enable_if_t<std::is_floating_point_v<S>, S> relu(S x) {
  return (x > S(0) || std::isnan(x)) ? x : S(0);
}
template <typename S>
inline Vectorized<S> relu(const Vectorized<S>& x) {
  return at::vec::maximum(x, Vectorized<S>(S(0)));
}

// `value` where `cond > 0`, else 0 (relu's gradient mask).
template <typename S>
inline std::enable_if_t<std::is_floating_point_v<S>, S> where_positive(S cond, S value) {
  return cond > S(0) ? value : S(0);
}
template <typename S>
inline Vectorized<S> where_positive(const Vectorized<S>& cond, const Vectorized<S>& value) {
  const Vectorized<S> zero(S(0));
  return Vectorized<S>::blendv(zero, value, cond > zero);
}

// Sum of the lanes of v.
// NOTE: at::vec::vec_reduce_all's AVX-512 shuffles trip gcc 12's
// -Wuninitialized inside its own intrinsic headers; this runs once per row,
// so a plain store-and-add costs nothing measurable and stays quiet.
template <typename S>
inline S reduce_add(const Vectorized<S>& v) {
  __at_align__ S lanes[Vectorized<S>::size()];
  v.store(lanes);
  S total = 0;
  for (int64_t i = 0; i < Vectorized<S>::size(); ++i) total += lanes[i];
  return total;
}

// ------------------------------------------------ row loops

// out[i] = op(a[i], b[i]) for i < n, computed in acc_t<T>.
template <typename T, typename Op>
inline void map2_row(const T* a, const T* b, T* out, int64_t n, const Op& op) {
  int64_t i = 0;
  for (; i + kStep<T> <= n; i += kStep<T>) {
    AccVec<T> a0, a1, b0, b1;
    load2(a + i, a0, a1);
    load2(b + i, b0, b1);
    store2(out + i, op(a0, b0), op(a1, b1));
  }
  for (; i < n; ++i) {
    out[i] = static_cast<T>(op(acc_t<T>(a[i]), acc_t<T>(b[i])));
  }
}

// out[i] = op(a[i], b) for i < n, with b one broadcast scalar.
template <typename T, typename Op>
inline void map1_row_scalar(const T* a, acc_t<T> b, T* out, int64_t n, const Op& op) {
  const AccVec<T> vb(b);
  int64_t i = 0;
  for (; i + kStep<T> <= n; i += kStep<T>) {
    AccVec<T> a0, a1;
    load2(a + i, a0, a1);
    store2(out + i, op(a0, vb), op(a1, vb));
  }
  for (; i < n; ++i) {
    out[i] = static_cast<T>(op(acc_t<T>(a[i]), b));
  }
}

// Sum of f(p[i]) for i < n, in acc_t<T>.
template <typename T, typename F>
inline acc_t<T> sum_row(const T* p, int64_t n, const F& f) {
  AccVec<T> acc0(0), acc1(0);
  int64_t i = 0;
  for (; i + kStep<T> <= n; i += kStep<T>) {
    AccVec<T> v0, v1;
    load2(p + i, v0, v1);
    acc0 = acc0 + f(v0);
    acc1 = acc1 + f(v1);
  }
  acc_t<T> total = reduce_add(acc0 + acc1);
  for (; i < n; ++i) total += f(acc_t<T>(p[i]));
  return total;
}

// ------------------------------------------------ parallelism

// Elements per parallel task; the value ATen's TensorIterator uses. Below it,
// waking another thread costs more than it saves.
constexpr int64_t kGrainSize = 32768;

// Rows per task so that a task touches about kGrainSize elements.
inline int64_t grain_rows(int64_t row_size) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, row_size));
}

// NOTE: [Deterministic partial sums]
// Column reductions (grad of a bias or a LayerNorm weight) are split into a
// fixed number of contiguous row blocks, each summed into its own row of a
// partials buffer that is reduced afterwards. The block count depends only on
// the problem size and the thread count, never on scheduling, so results are
// bitwise reproducible from run to run.
inline int64_t num_row_blocks(int64_t rows, int64_t row_size) {
  const int64_t by_work = rows * row_size / kGrainSize;
  return std::max<int64_t>(1, std::min<int64_t>({by_work, at::get_num_threads(), rows}));
}

// [begin, end) of block `block` when `rows` are split into `blocks` blocks.
inline std::pair<int64_t, int64_t> block_range(int64_t rows, int64_t blocks, int64_t block) {
  return {rows * block / blocks, rows * (block + 1) / blocks};
}

// Row of a score block: softmax over its first n entries in place, zeros after (masked keys), up to
// `width`. A row whose n entries are all -inf (every key masked) becomes zeros, as in SDPA. The
// exponentials use ATen's faster exp_u20 and are summed in the same pass. Every attention path (BLAS,
// oneDNN, the SIMD tiles) calls this one.
template <typename T>
void softmax_row(T* row, int64_t n, int64_t width) {
  using Vec = Vectorized<T>;
  const T max = at::vec::reduce_all<T>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, row, n);
  if (max == -std::numeric_limits<T>::infinity()) {
    std::fill(row, row + width, T(0));
    return;
  }
  const Vec vmax(max);
  Vec vsum(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(row + j) - vmax).exp_u20();
    e.store(row + j);
    vsum = vsum + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](const Vec& a, const Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] - max);
    sum += row[j];
  }
  const T inv = T(1) / sum;
  at::vec::map([inv](const Vec& x) { return x * Vec(inv); }, row, row, n);
  std::fill(row + n, row + width, T(0));
}

}  // namespace torchgraph::cpu
