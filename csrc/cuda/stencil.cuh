// The 2x2 stride-2 stencil as CUDA kernels over an "hf panel", shared by high_frequency.cu and
// hf_pairwise_similarity_kl.cu.
//
// x (N, C, H, W), contiguous, is seen as N samples of R = C*H/2 hf rows of width w = W/2; hf row r
// of a sample reads image rows 2r and 2r+1 (4*w elements from offset r*4*w). A panel holds hf rows
// [r0, r0 + nr) of every sample as an (N, nr*w) matrix: element i = (s, r, j) with
// i = (s*nr + r)*w + j. `sample` is the number of x elements per sample (R*4*w).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "launch.cuh"

namespace dsfast::cuda {
namespace {  // internal linkage: every .cu gets its own copy of the kernels

// panel[i] = wa*a + wb*b + wc*c + wd*d of block (s, r0 + r, j).
template <typename scalar_t, typename out_t, typename acc_t>
__global__ void hf_panel_kernel(const scalar_t* __restrict__ x, out_t* __restrict__ panel,
                                int64_t total, int64_t sample, int64_t r0, int64_t nr, int64_t w,
                                acc_t wa, acc_t wb, acc_t wc, acc_t wd) {
  const int64_t len = nr * w;
  DSFAST_GRID_STRIDE_LOOP(i, total) {
    const int64_t s = i / len;
    const int64_t rem = i - s * len;
    const int64_t r = rem / w;
    const int64_t j = rem - r * w;
    const scalar_t* top = x + s * sample + (r0 + r) * 4 * w + 2 * j;
    const scalar_t* bot = top + 2 * w;
    const acc_t a = static_cast<acc_t>(top[0]);
    const acc_t b = static_cast<acc_t>(top[1]);
    const acc_t c = static_cast<acc_t>(bot[0]);
    const acc_t d = static_cast<acc_t>(bot[1]);
    panel[i] = static_cast<out_t>(wa * a + wb * b + wc * c + wd * d);
  }
}

// Transposed stencil: block (s, r0 + r, j) of grad = q[i] * (wa, wb, wc, wd). Every grad element
// of the panel's rows is written exactly once.
template <typename in_t, typename scalar_t, typename acc_t>
__global__ void hf_scatter_kernel(const in_t* __restrict__ q, scalar_t* __restrict__ grad,
                                  int64_t total, int64_t sample, int64_t r0, int64_t nr, int64_t w,
                                  acc_t wa, acc_t wb, acc_t wc, acc_t wd) {
  const int64_t len = nr * w;
  DSFAST_GRID_STRIDE_LOOP(i, total) {
    const int64_t s = i / len;
    const int64_t rem = i - s * len;
    const int64_t r = rem / w;
    const int64_t j = rem - r * w;
    const acc_t v = static_cast<acc_t>(q[i]);
    scalar_t* top = grad + s * sample + (r0 + r) * 4 * w + 2 * j;
    scalar_t* bot = top + 2 * w;
    top[0] = static_cast<scalar_t>(wa * v);
    top[1] = static_cast<scalar_t>(wb * v);
    bot[0] = static_cast<scalar_t>(wc * v);
    bot[1] = static_cast<scalar_t>(wd * v);
  }
}

}  // namespace
}  // namespace dsfast::cuda
