// High-frequency map on CUDA: out = wa*a + wb*b + wc*c + wd*d per 2x2 block [[a, b], [c, d]],
// and its transpose (the backward). x (N, C, H, W) <-> map (N, C, h, w). One thread per block.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common.h"
#include "launch.cuh"
#include "ops.h"
#include "stencil.cuh"

namespace dsfast::cuda {

at::Tensor high_frequency(const at::Tensor& x_in, c10::ArrayRef<double> weights) {
  const BelowAutograd below_autograd;
  check_image(x_in, "high_frequency");
  check_cuda(x_in, "high_frequency");
  const auto wt = check_weights(weights, "high_frequency");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2) / 2, w = x.size(3) / 2;
  at::Tensor out = new_output({n, c, h, w}, x.options());
  const int64_t total = n * c * h * w;
  if (total == 0) return out;
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "high_frequency_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The whole map is one "panel": N = 1 sample of n*c*h rows starting at row 0.
    hf_panel_kernel<scalar_t, scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, n * c * h * w * 4,
        0, n * c * h, w, acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3]));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor high_frequency_backward(const at::Tensor& grad_in, c10::ArrayRef<double> weights) {
  const BelowAutograd below_autograd;
  check_float(grad_in, "high_frequency_backward", "grad");
  TORCH_CHECK(grad_in.dim() == 4, "high_frequency_backward: grad must be 4-D (N, C, h, w), got shape ",
              grad_in.sizes());
  check_cuda(grad_in, "high_frequency_backward");
  const auto wt = check_weights(weights, "high_frequency_backward");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor g = grad_in.contiguous();
  const int64_t n = g.size(0), c = g.size(1), h = g.size(2), w = g.size(3);
  at::Tensor out = new_output({n, c, 2 * h, 2 * w}, g.options());
  const int64_t total = n * c * h * w;
  if (total == 0) return out;
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "high_frequency_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    hf_scatter_kernel<scalar_t, scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, n * c * h * w * 4,
        0, n * c * h, w, acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3]));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace dsfast::cuda
