// One-level 2-D Haar DWT and its inverse on CPU (pywt.dwt2 / idwt2 'haar' convention).
// Layout: x (N, C, H, W) <-> bands (4, N, C, h, w) with bands LL, H, V, D; h = H/2, w = W/2.
// Every output row r of the N*C*h rows depends on input rows 2r and 2r+1 of the (N*C*H, W)
// view, so the work is a flat parallel loop over rows with a vectorisable inner loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../common.h"
#include "ops.h"
#include "stencil.h"

namespace dsfast::cpu {

namespace {

template <typename scalar_t>
void dwt_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t rows, int64_t w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = rows * w;  // elements per band
  at::parallel_for(0, rows, grain_rows(4 * w), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ top = x + r * 4 * w;
      const scalar_t* __restrict__ bot = top + 2 * w;
      scalar_t* __restrict__ ll = out + r * w;
      scalar_t* __restrict__ hh = ll + plane;
      scalar_t* __restrict__ vv = ll + 2 * plane;
      scalar_t* __restrict__ dd = ll + 3 * plane;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const acc_t a = static_cast<acc_t>(top[2 * j]);
        const acc_t b = static_cast<acc_t>(top[2 * j + 1]);
        const acc_t c = static_cast<acc_t>(bot[2 * j]);
        const acc_t d = static_cast<acc_t>(bot[2 * j + 1]);
        const acc_t half = acc_t(0.5);
        ll[j] = static_cast<scalar_t>((a + b + c + d) * half);
        hh[j] = static_cast<scalar_t>((a + b - c - d) * half);
        vv[j] = static_cast<scalar_t>((a - b + c - d) * half);
        dd[j] = static_cast<scalar_t>((a - b - c + d) * half);
      }
    }
  });
}

template <typename scalar_t>
void idwt_rows(const scalar_t* __restrict__ bands, scalar_t* __restrict__ out, int64_t rows,
               int64_t w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = rows * w;
  at::parallel_for(0, rows, grain_rows(4 * w), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ ll = bands + r * w;
      const scalar_t* __restrict__ hh = ll + plane;
      const scalar_t* __restrict__ vv = ll + 2 * plane;
      const scalar_t* __restrict__ dd = ll + 3 * plane;
      scalar_t* __restrict__ top = out + r * 4 * w;
      scalar_t* __restrict__ bot = top + 2 * w;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const acc_t l = static_cast<acc_t>(ll[j]);
        const acc_t h = static_cast<acc_t>(hh[j]);
        const acc_t v = static_cast<acc_t>(vv[j]);
        const acc_t d = static_cast<acc_t>(dd[j]);
        const acc_t half = acc_t(0.5);
        top[2 * j] = static_cast<scalar_t>((l + h + v + d) * half);
        top[2 * j + 1] = static_cast<scalar_t>((l + h - v - d) * half);
        bot[2 * j] = static_cast<scalar_t>((l - h + v - d) * half);
        bot[2 * j + 1] = static_cast<scalar_t>((l - h - v + d) * half);
      }
    }
  });
}

}  // namespace

at::Tensor haar_dwt2(const at::Tensor& x_in) {
  const BelowAutograd below_autograd;
  check_image(x_in, "haar_dwt2");
  TORCH_CHECK(x_in.device().is_cpu(), "haar_dwt2: expected a CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2) / 2, w = x.size(3) / 2;
  at::Tensor out = new_output({4, n, c, h, w}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "haar_dwt2", [&] {
    dwt_rows<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n * c * h, w);
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
    idwt_rows<scalar_t>(bands.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n * c * h, w);
  });
  return out;
}

}  // namespace dsfast::cpu
