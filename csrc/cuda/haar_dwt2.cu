// One-level 2-D Haar DWT and its inverse on CUDA (pywt.dwt2 / idwt2 'haar' convention).
// x (N, C, H, W) <-> bands (4, N, C, h, w) = LL, H, V, D. One thread per 2x2 block.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common.h"
#include "launch.cuh"
#include "ops.h"

namespace dsfast::cuda {

namespace {

// total = N*C*h*w blocks; block i = (row r, column j) of the (N*C*h, w) band view.
template <typename scalar_t>
__global__ void dwt_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t total,
                           int64_t w) {
  using acc_t = at::opmath_type<scalar_t>;
  DSFAST_GRID_STRIDE_LOOP(i, total) {
    const int64_t r = i / w;
    const int64_t j = i - r * w;
    const scalar_t* top = x + r * 4 * w + 2 * j;
    const scalar_t* bot = top + 2 * w;
    const acc_t a = static_cast<acc_t>(top[0]);
    const acc_t b = static_cast<acc_t>(top[1]);
    const acc_t c = static_cast<acc_t>(bot[0]);
    const acc_t d = static_cast<acc_t>(bot[1]);
    const acc_t half = acc_t(0.5);
    out[i] = static_cast<scalar_t>((a + b + c + d) * half);
    out[i + total] = static_cast<scalar_t>((a + b - c - d) * half);
    out[i + 2 * total] = static_cast<scalar_t>((a - b + c - d) * half);
    out[i + 3 * total] = static_cast<scalar_t>((a - b - c + d) * half);
  }
}

template <typename scalar_t>
__global__ void idwt_kernel(const scalar_t* __restrict__ bands, scalar_t* __restrict__ out,
                            int64_t total, int64_t w) {
  using acc_t = at::opmath_type<scalar_t>;
  DSFAST_GRID_STRIDE_LOOP(i, total) {
    const int64_t r = i / w;
    const int64_t j = i - r * w;
    const acc_t l = static_cast<acc_t>(bands[i]);
    const acc_t h = static_cast<acc_t>(bands[i + total]);
    const acc_t v = static_cast<acc_t>(bands[i + 2 * total]);
    const acc_t d = static_cast<acc_t>(bands[i + 3 * total]);
    const acc_t half = acc_t(0.5);
    scalar_t* top = out + r * 4 * w + 2 * j;
    scalar_t* bot = top + 2 * w;
    top[0] = static_cast<scalar_t>((l + h + v + d) * half);
    top[1] = static_cast<scalar_t>((l + h - v - d) * half);
    bot[0] = static_cast<scalar_t>((l - h + v - d) * half);
    bot[1] = static_cast<scalar_t>((l - h - v + d) * half);
  }
}

}  // namespace

at::Tensor haar_dwt2(const at::Tensor& x_in) {
  const BelowAutograd below_autograd;
  check_image(x_in, "haar_dwt2");
  check_cuda(x_in, "haar_dwt2");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2) / 2, w = x.size(3) / 2;
  at::Tensor out = new_output({4, n, c, h, w}, x.options());
  const int64_t total = n * c * h * w;
  if (total == 0) return out;
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "haar_dwt2_cuda", [&] {
    dwt_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor haar_idwt2(const at::Tensor& bands_in) {
  const BelowAutograd below_autograd;
  check_float(bands_in, "haar_idwt2", "bands");
  TORCH_CHECK(bands_in.dim() == 5 && bands_in.size(0) == 4,
              "haar_idwt2: bands must have shape (4, N, C, h, w), got ", bands_in.sizes());
  check_cuda(bands_in, "haar_idwt2");
  const c10::cuda::CUDAGuard guard(bands_in.device());
  const at::Tensor bands = bands_in.contiguous();
  const int64_t n = bands.size(1), c = bands.size(2), h = bands.size(3), w = bands.size(4);
  at::Tensor out = new_output({n, c, 2 * h, 2 * w}, bands.options());
  const int64_t total = n * c * h * w;
  if (total == 0) return out;
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bands.scalar_type(), "haar_idwt2_cuda", [&] {
    idwt_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        bands.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace dsfast::cuda
