// Row kernels of the 2x2 stride-2 stencil shared by the CPU loops. A "row" is one output row of
// width w; its input is the two image rows `top` and `bot` of width 2w (blocks [[a, b], [c, d]]).
// Part of the per-ISA loop source (loops.h): written for the auto-vectoriser (`omp simd`), which the
// per-ISA files compile with SSE2, AVX2+FMA or AVX-512 code generation.
#pragma once

#include <cstdint>

#ifndef DSFAST_CPU_ISA
#error "stencil.h is part of the per-ISA loop source: include it from a loops_<isa>.cpp (see isa.h)"
#endif

namespace dsfast::cpu::DSFAST_CPU_ISA {

// out[j] = wa*a + wb*b + wc*c + wd*d, in acc_t.
template <typename scalar_t, typename out_t, typename acc_t>
inline void hf_row(const scalar_t* __restrict__ top, const scalar_t* __restrict__ bot,
                   out_t* __restrict__ out, int64_t w, acc_t wa, acc_t wb, acc_t wc, acc_t wd) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    const acc_t a = static_cast<acc_t>(top[2 * j]);
    const acc_t b = static_cast<acc_t>(top[2 * j + 1]);
    const acc_t c = static_cast<acc_t>(bot[2 * j]);
    const acc_t d = static_cast<acc_t>(bot[2 * j + 1]);
    out[j] = static_cast<out_t>(wa * a + wb * b + wc * c + wd * d);
  }
}

// Transposed stencil: top = (wa*g, wb*g), bot = (wc*g, wd*g) for every g of the row.
template <typename in_t, typename scalar_t, typename acc_t>
inline void hf_row_backward(const in_t* __restrict__ g, scalar_t* __restrict__ top,
                            scalar_t* __restrict__ bot, int64_t w, acc_t wa, acc_t wb, acc_t wc,
                            acc_t wd) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    const acc_t v = static_cast<acc_t>(g[j]);
    top[2 * j] = static_cast<scalar_t>(wa * v);
    top[2 * j + 1] = static_cast<scalar_t>(wb * v);
    bot[2 * j] = static_cast<scalar_t>(wc * v);
    bot[2 * j + 1] = static_cast<scalar_t>(wd * v);
  }
}

}  // namespace dsfast::cpu::DSFAST_CPU_ISA
