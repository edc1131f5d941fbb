// Small helpers shared by the CUDA kernels.
//
// The CUDA kernels favour plain, reviewable code over peak speed: grid-stride
// loops for elementwise work, one block per row for row reductions, and all
// arithmetic in at::opmath_type<T> (float for bfloat16/float, double for double).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace torchgraph::cuda {

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int kThreads = 256;  // a multiple of the warp size (block_sum relies on it)
constexpr int kWarpSize = 32;

// Blocks for a grid-stride loop over n elements. Capping the grid keeps the
// launch valid for any n; each thread then handles several elements.
inline unsigned int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, 65535));
}

// Index of the first element of this thread, and the grid-wide stride.
__device__ __forceinline__ int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(blockDim.x) * gridDim.x;
}

// Sum of `value` over all threads of the block, returned to every thread.
// `shared` must hold kWarpSize elements; blockDim.x must be a multiple of 32.
template <typename T>
__device__ T block_sum(T value, T* shared) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffff, value, offset);
  }
  __syncthreads();  // every thread has read the result of a previous call
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < num_warps ? shared[lane] : T(0);
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffff, value, offset);
    }
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  return shared[0];
}

}  // namespace torchgraph::cuda
