// The inner loops of the CPU ops: the one source that loops_baseline.cpp, loops_avx2.cpp and
// loops_avx512.cpp compile into dsfast::cpu::baseline, ::avx2 and ::avx512 (isa.h picks the copy at run
// time). Everything here works on raw pointers and is defined inside the per-ISA namespace; it includes
// no ATen/c10/standard-library code that the per-ISA files would compile with their ISA's instructions.
// The drivers (haar_dwt2.cpp, high_frequency.cpp, hf_pairwise_similarity_kl.cpp, domainstudio_loss.cpp)
// check arguments, allocate, and split the work into the row ranges and chunks these loops take.
#pragma once

#include <cstdint>

#include "isa.h"
#include "small_gram.h"
#include "stencil.h"

namespace dsfast::cpu::DSFAST_CPU_ISA {

template <typename scalar_t>
using acc_of = typename AccOf<scalar_t>::type;

// ---------------------------------------------------------------------------- Haar DWT (haar_dwt2.cpp)
// Output row r of the N*C*h rows reads input rows 2r and 2r+1 of the (N*C*H, W) view; the four bands
// are `plane` elements apart (LL, H, V, D).
template <typename scalar_t>
void dwt_rows(const scalar_t* x, scalar_t* out, int64_t begin, int64_t end, int64_t w, int64_t plane) {
  using acc_t = acc_of<scalar_t>;
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
}

template <typename scalar_t>
void idwt_rows(const scalar_t* bands, scalar_t* out, int64_t begin, int64_t end, int64_t w, int64_t plane) {
  using acc_t = acc_of<scalar_t>;
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
}

// ---------------------------------------------------------------------------- hf map (high_frequency.cpp)
// Rows [begin, end) of the N*C*h hf rows: map row r from image rows 2r, 2r+1, and back.
template <typename scalar_t>
void hf_rows(const scalar_t* x, scalar_t* map, int64_t begin, int64_t end, int64_t w, const acc_of<scalar_t>* wt) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* top = x + r * 4 * w;
    hf_row(top, top + 2 * w, map + r * w, w, wt[0], wt[1], wt[2], wt[3]);
  }
}

template <typename scalar_t>
void hf_rows_backward(const scalar_t* grad, scalar_t* grad_x, int64_t begin, int64_t end, int64_t w,
                      const acc_of<scalar_t>* wt) {
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* top = grad_x + r * 4 * w;
    hf_row_backward(grad + r * w, top, top + 2 * w, w, wt[0], wt[1], wt[2], wt[3]);
  }
}

// ---------------------------------------------------------------------------- hf Gram (hf_pairwise_similarity_kl.cpp)
// The chunk's hf panel, N rows of nr * w (row stride ldp), straight from x.
template <typename scalar_t>
void hf_panel(const scalar_t* x, acc_of<scalar_t>* panel, const PanelGeometry& g, const acc_of<scalar_t>* wt) {
  for (int64_t i = 0; i < g.n; ++i) {
    const scalar_t* xs = x + i * g.sample + g.r0 * 4 * g.w;
    for (int64_t r = 0; r < g.nr; ++r) {
      const scalar_t* top = xs + r * 4 * g.w;
      hf_row(top, top + 2 * g.w, panel + i * g.ldp + r * g.w, g.w, wt[0], wt[1], wt[2], wt[3]);
    }
  }
}

// grad_x of the chunk from Q (the gradient of its hf panel, same layout): the transposed stencil.
template <typename scalar_t>
void hf_panel_backward(const acc_of<scalar_t>* q, scalar_t* grad_x, const PanelGeometry& g,
                       const acc_of<scalar_t>* wt) {
  for (int64_t i = 0; i < g.n; ++i) {
    scalar_t* dst = grad_x + i * g.sample + g.r0 * 4 * g.w;
    for (int64_t r = 0; r < g.nr; ++r) {
      scalar_t* top = dst + r * 4 * g.w;
      hf_row_backward(q + i * g.ldp + r * g.w, top, top + 2 * g.w, g.w, wt[0], wt[1], wt[2], wt[3]);
    }
  }
}

// ---------------------------------------------------------------------------- one-pass loss (domainstudio_loss.cpp)
constexpr int64_t kMaxRow = 256;  // scatter_row works on pieces of a row this long

// Read the chunk's image rows of every sample into xbuf (row stride ldx, accumulation dtype) and build
// its hf panel (row stride ldp) from that buffer.
template <typename scalar_t>
void load_chunk(const scalar_t* x, const PanelGeometry& g, const acc_of<scalar_t>* wt, acc_of<scalar_t>* xbuf,
                acc_of<scalar_t>* panel) {
  using acc_t = acc_of<scalar_t>;
  const int64_t cols = 4 * g.nr * g.w;
  for (int64_t i = 0; i < g.n; ++i) {
    const scalar_t* __restrict__ src = x + i * g.sample + g.r0 * 4 * g.w;
    acc_t* __restrict__ dst = xbuf + i * g.ldx;
#pragma omp simd
    for (int64_t k = 0; k < cols; ++k) dst[k] = static_cast<acc_t>(src[k]);
    for (int64_t r = 0; r < g.nr; ++r) {
      const acc_t* top = dst + r * 4 * g.w;
      hf_row(top, top + 2 * g.w, panel + i * g.ldp + r * g.w, g.w, wt[0], wt[1], wt[2], wt[3]);
    }
  }
}

// hf(t) of the 2x2 blocks [[a, b], [c, d]] at column j of the rows top/bot.
template <typename scalar_t, typename acc_t>
inline acc_t hf_at(const scalar_t* top, const scalar_t* bot, int64_t j, const acc_t* wt) {
  return wt[0] * static_cast<acc_t>(top[2 * j]) + wt[1] * static_cast<acc_t>(top[2 * j + 1]) +
         wt[2] * static_cast<acc_t>(bot[2 * j]) + wt[3] * static_cast<acc_t>(bot[2 * j + 1]);
}

// sum((hf - hf(t))^2) over one row (t null: sum(hf^2)).
template <typename scalar_t, typename acc_t>
acc_t row_sse(const acc_t* __restrict__ hf, const scalar_t* ttop, const scalar_t* tbot, int64_t w,
              const acc_t* wt) {
  acc_t sum = 0;
  if (ttop == nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < w; ++j) sum += hf[j] * hf[j];
    return sum;
  }
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < w; ++j) {
    const acc_t d = hf[j] - hf_at(ttop, tbot, j, wt);
    sum += d * d;
  }
  return sum;
}

// One row of the backward: v = q + s (p - hf(t)) (t null: q + s p); the 2x2 blocks of the output
// row get y + v * (wa, wb, wc, wd).
template <typename scalar_t, typename acc_t>
void scatter_row(const acc_t* __restrict__ q, const acc_t* __restrict__ p, acc_t s, const scalar_t* ttop,
                 const scalar_t* tbot, const acc_t* __restrict__ y_top, const acc_t* __restrict__ y_bot,
                 scalar_t* __restrict__ top, scalar_t* __restrict__ bot, int64_t w, const acc_t* wt) {
  const acc_t wa = wt[0], wb = wt[1], wc = wt[2], wd = wt[3];
  acc_t v[kMaxRow];
  for (int64_t j0 = 0; j0 < w; j0 += kMaxRow) {
    const int64_t m = small_gram_detail::min64(kMaxRow, w - j0);
    if (ttop == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) v[j] = q[j0 + j] + s * p[j0 + j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) v[j] = q[j0 + j] + s * (p[j0 + j] - hf_at(ttop, tbot, j0 + j, wt));
    }
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const int64_t k = 2 * (j0 + j);
      top[k] = static_cast<scalar_t>(y_top[k] + wa * v[j]);
      top[k + 1] = static_cast<scalar_t>(y_top[k + 1] + wb * v[j]);
      bot[k] = static_cast<scalar_t>(y_bot[k] + wc * v[j]);
      bot[k + 1] = static_cast<scalar_t>(y_bot[k + 1] + wd * v[j]);
    }
  }
}

// Forward of one chunk: upper triangles of gram_image += X X^T and gram_hf += P P^T; returns the chunk's
// sum((P - hf(t))^2) (t null: sum(P^2)), sample i's part times sse_w[i] where sse_w is not null.
template <typename scalar_t>
double grams_chunk(const scalar_t* x, const scalar_t* t, const PanelGeometry& g, const acc_of<scalar_t>* wt,
                   const double* sse_w, acc_of<scalar_t>* xbuf, acc_of<scalar_t>* panel,
                   acc_of<scalar_t>* gram_image, acc_of<scalar_t>* gram_hf) {
  using acc_t = acc_of<scalar_t>;
  load_chunk(x, g, wt, xbuf, panel);
  double sum = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    acc_t row_sum = 0;
    for (int64_t r = 0; r < g.nr; ++r) {
      const scalar_t* ttop = t ? t + i * g.sample + (g.r0 + r) * 4 * g.w : nullptr;
      row_sum += row_sse(panel + i * g.ldp + r * g.w, ttop, ttop ? ttop + 2 * g.w : nullptr, g.w, wt);
    }
    // a weight of 1 changes nothing (an exact product, also when contracted into an FMA)
    sum += sse_w ? sse_w[i] * static_cast<double>(row_sum) : static_cast<double>(row_sum);
  }
  gram_update_upper(xbuf, g.ldx, g.n, 4 * g.nr * g.w, gram_image);
  gram_update_upper(panel, g.ldp, g.n, g.nr * g.w, gram_hf);
  return sum;
}

// Backward of one chunk: Y = Mi X, Q = Mh P, then one stencil pass writes every 2x2 block of grad_x once:
// Y + (Q + s_i (P - hf(t))) * (wa, wb, wc, wd), s_i = s * sse_w[i] for sample i (s where sse_w is null).
template <typename scalar_t>
void grams_backward_chunk(const scalar_t* x, const scalar_t* t, const PanelGeometry& g, const acc_of<scalar_t>* wt,
                          acc_of<scalar_t> s, const double* sse_w, const acc_of<scalar_t>* m_image,
                          const acc_of<scalar_t>* m_hf, acc_of<scalar_t>* xbuf, acc_of<scalar_t>* panel,
                          acc_of<scalar_t>* y, acc_of<scalar_t>* q, scalar_t* grad_x) {
  using acc_t = acc_of<scalar_t>;
  load_chunk(x, g, wt, xbuf, panel);
  small_mm(m_image, xbuf, g.ldx, g.n, 4 * g.nr * g.w, y, g.ldx);
  small_mm(m_hf, panel, g.ldp, g.n, g.nr * g.w, q, g.ldp);
  for (int64_t i = 0; i < g.n; ++i) {
    const acc_t si = sse_w ? static_cast<acc_t>(static_cast<double>(s) * sse_w[i]) : s;
    for (int64_t r = 0; r < g.nr; ++r) {
      const int64_t off = i * g.sample + (g.r0 + r) * 4 * g.w;
      const acc_t* y_top = y + i * g.ldx + r * 4 * g.w;
      const int64_t hf_off = i * g.ldp + r * g.w;
      const scalar_t* ttop = t ? t + off : nullptr;
      scatter_row<scalar_t, acc_t>(q + hf_off, panel + hf_off, si, ttop, ttop ? ttop + 2 * g.w : nullptr, y_top,
                                   y_top + 2 * g.w, grad_x + off, grad_x + off + 2 * g.w, g.w, wt);
    }
  }
}

template <typename scalar_t>
constexpr Loops<scalar_t> make_loops() {
  return {&dwt_rows<scalar_t>,   &idwt_rows<scalar_t>,         &hf_rows<scalar_t>,     &hf_rows_backward<scalar_t>,
          &hf_panel<scalar_t>,   &hf_panel_backward<scalar_t>, &grams_chunk<scalar_t>, &grams_backward_chunk<scalar_t>};
}

}  // namespace dsfast::cpu::DSFAST_CPU_ISA
