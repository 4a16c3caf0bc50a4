// One-level 2-D Haar DWT and its inverse on CPU (pywt.dwt2 / idwt2 'haar' convention).
// Layout: x (N, C, H, W) <-> bands (4, N, C, h, w) with bands LL, H, V, D; h = H/2, w = W/2.
// Every output row r of the N*C*h rows depends on input rows 2r and 2r+1 of the (N*C*H, W)
// view, so the work is a flat parallel loop over rows of the active ISA's row loops (loops.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../common.h"
#include "isa.h"
#include "ops.h"
#include "panel.h"

namespace dsfast::cpu {

at::Tensor haar_dwt2(const at::Tensor& x_in) {
  const BelowAutograd below_autograd;
  check_image(x_in, "haar_dwt2");
  TORCH_CHECK(x_in.device().is_cpu(), "haar_dwt2: expected a CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2) / 2, w = x.size(3) / 2;
  at::Tensor out = new_output({4, n, c, h, w}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "haar_dwt2", [&] {
    const auto& k = loops<scalar_t>();
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t rows = n * c * h;
    at::parallel_for(0, rows, grain_rows(4 * w), [&](int64_t begin, int64_t end) {
      k.dwt_rows(src, dst, begin, end, w, rows * w);
    });
  });
  return out;
}

at::Tensor haar_idwt2(const at::Tensor& bands_in) {
  const BelowAutograd below_autograd;
  check_float(bands_in, "haar_idwt2", "bands");
  TORCH_CHECK(bands_in.dim() == 5 && bands_in.size(0) == 4,
              "haar_idwt2: bands must have shape (4, N, C, h, w), got ", bands_in.sizes());
  TORCH_CHECK(bands_in.device().is_cpu(), "haar_idwt2: expected a CPU tensor");
  const at::Tensor bands = bands_in.contiguous();
  const int64_t n = bands.size(1), c = bands.size(2), h = bands.size(3), w = bands.size(4);
  at::Tensor out = new_output({n, c, 2 * h, 2 * w}, bands.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bands.scalar_type(), "haar_idwt2", [&] {
    const auto& k = loops<scalar_t>();
    const scalar_t* src = bands.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t rows = n * c * h;
    at::parallel_for(0, rows, grain_rows(4 * w), [&](int64_t begin, int64_t end) {
      k.idwt_rows(src, dst, begin, end, w, rows * w);
    });
  });
  return out;
}

}  // namespace dsfast::cpu
