// High-frequency map: the fixed 2x2 stride-2 stencil wa*a + wb*b + wc*c + wd*d per block
// [[a, b], [c, d]], and its transpose (the backward). x (N, C, H, W) <-> map (N, C, h, w); a parallel
// loop over the N*C*h rows of the active ISA's row loops (loops.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../common.h"
#include "isa.h"
#include "ops.h"
#include "panel.h"

namespace dsfast::cpu {

at::Tensor high_frequency(const at::Tensor& x_in, c10::ArrayRef<double> weights) {
  const BelowAutograd below_autograd;
  check_image(x_in, "high_frequency");
  TORCH_CHECK(x_in.device().is_cpu(), "high_frequency: expected a CPU tensor");
  const auto wt = check_weights(weights, "high_frequency");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2) / 2, w = x.size(3) / 2;
  at::Tensor out = new_output({n, c, h, w}, x.options());
  if (out.numel() == 0) return out;
  const int64_t rows = n * c * h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "high_frequency", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const auto& k = loops<scalar_t>();
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(4 * w), [&](int64_t begin, int64_t end) {
      k.hf_rows(src, dst, begin, end, w, w4);
    });
  });
  return out;
}

at::Tensor high_frequency_backward(const at::Tensor& grad_in, c10::ArrayRef<double> weights) {
  const BelowAutograd below_autograd;
  check_float(grad_in, "high_frequency_backward", "grad");
  TORCH_CHECK(grad_in.dim() == 4, "high_frequency_backward: grad must be 4-D (N, C, h, w), got shape ",
              grad_in.sizes());
  TORCH_CHECK(grad_in.device().is_cpu(), "high_frequency_backward: expected a CPU tensor");
  const auto wt = check_weights(weights, "high_frequency_backward");
  const at::Tensor g = grad_in.contiguous();
  const int64_t n = g.size(0), c = g.size(1), h = g.size(2), w = g.size(3);
  at::Tensor out = new_output({n, c, 2 * h, 2 * w}, g.options());
  if (out.numel() == 0) return out;
  const int64_t rows = n * c * h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "high_frequency_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const auto& k = loops<scalar_t>();
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(4 * w), [&](int64_t begin, int64_t end) {
      k.hf_rows_backward(src, dst, begin, end, w, w4);
    });
  });
  return out;
}

}  // namespace dsfast::cpu
