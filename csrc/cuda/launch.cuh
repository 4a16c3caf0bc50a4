// Launch helpers shared by the dsfast CUDA kernels: 1-D grid-stride loops over 64-bit indices
// on the current stream. Kernels compute in at::opmath_type (float for half types).
//
// The current stream comes from c10::cuda::getCurrentCUDAStream(), the function that
// at::cuda::getCurrentCUDAStream() re-exports; using the c10 header directly keeps these sources
// free of ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers a minimal CUDA
// toolkit (nvcc only, as on CI) does not ship.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace dsfast::cuda {

constexpr int kThreads = 256;

inline dim3 grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest; 2^20 blocks is far more than any GPU keeps resident.
  return dim3(static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 20))));
}

#define DSFAST_GRID_STRIDE_LOOP(i, total)                                                  \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (total); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

inline c10::cuda::CUDAStream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected a CUDA tensor, got device ", t.device());
}

}  // namespace dsfast::cuda
