// What the attention kernels share for their oneDNN products: ATen's oneDNN
// matmul (declared weak), the per-thread workspace their intermediates live
// in, and an exact softmax over one row of scores.
#pragma once

#include <ATen/Config.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/ones.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <memory>
#include <utility>

#include "vec_utils.h"

// oneDNN's matmul as ATen runs it for bmm: result = beta * result + alpha *
// mat1 @ mat2 on 3-D float/bfloat16 tensors of any strides. Not in the
// wheel's headers, so declared here; weak, so that a torch built without it
// still loads this library (the kernels then stay on BLAS or are not called).
#if AT_MKLDNN_ENABLED()
namespace at::native {
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
                             float beta, float alpha) __attribute__((weak));
}  // namespace at::native
#endif

namespace torchgraph::cpu {

// NOTE: [oneDNN matmul needs AVX-512] ATen's mkldnn_matmul refuses to run, float32 included, on a CPU
// without AVX-512 (BW, VL, DQ), AVX-NE-CONVERT or Arm's bf16 (torch 2.13: "mkldnn_matmul bf16 path needs the
// cpu support ..."): an AVX2-only AMD EPYC (Zen 3) raised that from every attention kernel call, where the
// Zen 5 and Intel machines these kernels were written on ran them. Whether it runs is a property of the CPU
// and of the torch build, so it is probed once, with a 1 x 1 product, rather than re-derived from flags.

// Whether this torch exports ATen's oneDNN matmul and it runs on this CPU.
inline bool onednn_available() {
#if AT_MKLDNN_ENABLED()
  static const bool runs = [] {
    if (&at::native::mkldnn_matmul == nullptr) return false;
    try {
      const at::Tensor one = at::ones({1, 1, 1});
      at::native::mkldnn_matmul(one, one, at::empty({1, 1, 1}), 0.f, 1.f);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return runs;
#else
  return false;
#endif
}

// result = alpha * mat1 @ mat2 for 3-D float tensors (result of the product's shape, not aliasing the
// inputs): oneDNN's matmul where it runs, BLAS (at::bmm) elsewhere (NOTE: [oneDNN matmul needs AVX-512]).
inline void batched_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                           float alpha) {
#if AT_MKLDNN_ENABLED()
  if (onednn_available()) {
    at::native::mkldnn_matmul(mat1, mat2, result, 0.f, alpha);
    return;
  }
#endif
  at::Tensor out = result;  // bmm_out writes through the handle; result's storage is the caller's buffer
  at::bmm_out(out, mat1, mat2);
  if (alpha != 1.f) out.mul_(alpha);
}

// NOTE: [Attention workspace] The attention kernels' intermediates (heads
// copied apart, scores, P rounded to bfloat16, merged heads) live in a
// per-thread buffer kept between calls, up to kWorkspaceMaxBytes: allocated
// afresh, glibc gave their megabytes back to the OS after each call and the
// next call page-faulted them in again (GPT's 8 x 128 x 4 heads of 64: 1.27-
// 1.69 ms a call against 0.56-0.61 ms with freed memory kept, i.e. slower than
// the sgemm kernel's 0.78-1.01; NOTE: [Page faults from freed memory] in
// torchgraph/cpu_memory.py). Larger problems allocate as before, so the buffer
// never pins more than that per thread. One buffer per thread serves both
// kernels: a call uses it from start to end and calls do not nest.
constexpr int64_t kWorkspaceMaxBytes = int64_t{32} << 20;

class Workspace {
 public:
  explicit Workspace(int64_t bytes) {
    if (bytes > kWorkspaceMaxBytes) return;
    auto& [kept, kept_bytes] = buffer();
    if (kept_bytes < bytes) {
      kept.reset(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
      TORCH_CHECK(kept != nullptr, "torchgraph attention: could not allocate a ", bytes, "-byte workspace");
      kept_bytes = bytes;
    }
    base_ = static_cast<char*>(kept.get());
  }

  // A tensor of these sizes in the buffer (not owning it), or a fresh one beyond the cap.
  at::Tensor take(at::IntArrayRef sizes, at::ScalarType dtype) {
    const auto options = at::TensorOptions().dtype(dtype);
    if (base_ == nullptr) return at::empty(sizes, options);
    at::Tensor t = at::from_blob(base_ + used_, sizes, options);
    used_ += (t.nbytes() + 63) / 64 * 64;
    return t;
  }

  static int64_t bytes_for(std::initializer_list<std::pair<int64_t, at::ScalarType>> parts) {
    int64_t total = 0;
    for (const auto& [numel, dtype] : parts) total += (numel * c10::elementSize(dtype) + 63) / 64 * 64;
    return total;
  }

 private:
  using Buffer = std::pair<std::unique_ptr<void, decltype(&std::free)>, int64_t>;
  static Buffer& buffer() {
    thread_local Buffer kept{std::unique_ptr<void, decltype(&std::free)>(nullptr, &std::free), 0};
    return kept;
  }

  char* base_ = nullptr;
  int64_t used_ = 0;
};

}  // namespace torchgraph::cpu
