// The whole DomainStudio loss of one batch in one pass over it, on CPU (docs/KERNELS.md):
//   domainstudio_grams(x, t)  = (x x^T, hf(x) hf(x)^T, sum((hf(x) - hf(t))^2))      (t absent: 0)
//   domainstudio_grams_backward(gi, gh, gs, x, t)
//       = (gi + gi^T) x + hf^T((gh + gh^T) hf(x) + 2 gs (hf(x) - hf(t)))
// The chunks of panel.h drive both. A chunk's image rows are read from x once, into a per-thread
// buffer X in the accumulation dtype, and its hf panel P is built from that buffer; both stay in
// L2 for the small products of small_gram.h (rows padded by a cache line: rows of x are often a
// multiple of 4 KB apart, which would make the N rows of a block collide in L1):
//   forward:  Gi += X X^T, Gh += P P^T (per-thread partial Grams), sse += |P - hf(t)|^2
//   backward: Y = Mi X, Q = Mh P, then one stencil pass writes every 2x2 block of grad_x once:
//             Y + (Q + 2 gs (P - hf(t))) * (wa, wb, wc, wd).
// hf(x), the bands and Q never exist for the whole batch: memory is a few panels per thread.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "../common.h"
#include "ops.h"
#include "panel.h"
#include "small_gram.h"

namespace dsfast::cpu {

namespace {

// hf panel of a chunk; its image rows are 4x as many bytes. 64 KB + 256 KB (+ Q, Y in the
// backward) per thread stay in L2 between the pass that reads x and the products.
constexpr int64_t kPanelBytes = int64_t{1} << 16;
constexpr int64_t kPad = 16;
constexpr int64_t kMaxRow = 256;  // scatter_row works on pieces of a row this long  // elements added to every buffer row (one or two cache lines)

// One thread's buffers: X (N rows of 4 * rows_per_chunk * w) and P (N rows of rows_per_chunk * w).
template <typename acc_t>
struct Chunk {
  int64_t ldx, ldp;
  std::vector<acc_t> x, panel;
  explicit Chunk(const Plan& p)
      : ldx(4 * p.rows_per_chunk * p.w + kPad), ldp(p.rows_per_chunk * p.w + kPad),
        x(p.n * ldx), panel(p.n * ldp) {}

  // Read hf rows [r0, r0 + nr) of every sample of xp into X and build P from X.
  template <typename scalar_t>
  void load(const scalar_t* xp, const Plan& p, int64_t r0, int64_t nr, const acc_t* wt) {
    const int64_t cols = 4 * nr * p.w;
    for (int64_t i = 0; i < p.n; ++i) {
      const scalar_t* src = xp + i * p.sample() + r0 * 4 * p.w;
      acc_t* dst = x.data() + i * ldx;
#pragma omp simd
      for (int64_t k = 0; k < cols; ++k) dst[k] = static_cast<acc_t>(src[k]);
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t* top = dst + r * 4 * p.w;
        hf_row<acc_t, acc_t, acc_t>(top, top + 2 * p.w, panel.data() + i * ldp + r * p.w, p.w, wt[0], wt[1],
                                    wt[2], wt[3]);
      }
    }
  }
};

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
    const int64_t m = std::min(kMaxRow, w - j0);
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

// The checked, contiguous target (undefined when absent).
at::Tensor target_of(const std::optional<at::Tensor>& target, const at::Tensor& x, const char* op) {
  if (!target.has_value() || !target->defined()) return {};
  check_image(*target, op, "target");
  check_like(*target, x, op, "target");
  return target->contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> domainstudio_grams(const at::Tensor& x_in,
                                                                  const std::optional<at::Tensor>& target,
                                                                  c10::ArrayRef<double> weights) {
  const char* op = "domainstudio_grams";
  const BelowAutograd below_autograd;
  check_image(x_in, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": expected a CPU tensor");
  const auto wt = check_weights(weights, op);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor t = target_of(target, x, op);
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const Plan p = make_plan(x, kPanelBytes);
  at::Tensor image = new_output({p.n, p.n}, acc_opts);
  at::Tensor hf = new_output({p.n, p.n}, acc_opts);
  at::Tensor sse = new_output({}, acc_opts);
  if (x.numel() == 0) return {image.zero_(), hf.zero_(), sse.zero_()};

  at::Tensor part_image = at::zeros({p.tasks, p.n, p.n}, acc_opts);
  at::Tensor part_hf = at::zeros({p.tasks, p.n, p.n}, acc_opts);
  std::vector<double> part_sse(p.tasks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "domainstudio_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    for_each_task(p, [&](int64_t task, int64_t cb, int64_t ce) {
      Chunk<acc_t> c(p);
      acc_t* gi = part_image[task].mutable_data_ptr<acc_t>();
      acc_t* gh = part_hf[task].mutable_data_ptr<acc_t>();
      double sum = 0;
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        c.load(xp, p, r0, nr, w4);
        for (int64_t i = 0; i < p.n; ++i) {
          acc_t row_sum = 0;
          for (int64_t r = 0; r < nr; ++r) {
            const scalar_t* ttop = tp ? tp + i * p.sample() + (r0 + r) * 4 * p.w : nullptr;
            row_sum += row_sse(c.panel.data() + i * c.ldp + r * p.w, ttop, ttop ? ttop + 2 * p.w : nullptr, p.w, w4);
          }
          sum += row_sum;
        }
        gram_update_upper(c.x.data(), c.ldx, p.n, 4 * nr * p.w, gi);
        gram_update_upper(c.panel.data(), c.ldp, p.n, nr * p.w, gh);
      }
      part_sse[task] = sum;
    });
  });
  at::sum_out(image, part_image, {0});
  at::sum_out(hf, part_hf, {0});
  AT_DISPATCH_FLOATING_TYPES(acc, "domainstudio_loss", [&] {
    mirror_upper(image.mutable_data_ptr<scalar_t>(), p.n);
    mirror_upper(hf.mutable_data_ptr<scalar_t>(), p.n);
  });
  double total = 0;
  for (double s : part_sse) total += s;
  sse.fill_(total);
  return {image, hf, sse};
}

at::Tensor domainstudio_grams_backward(const at::Tensor& grad_image, const at::Tensor& grad_hf,
                                       const at::Tensor& grad_sse, const at::Tensor& x_in,
                                       const std::optional<at::Tensor>& target,
                                       c10::ArrayRef<double> weights) {
  const char* op = "domainstudio_grams_backward";
  const BelowAutograd below_autograd;
  check_image(x_in, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": expected a CPU tensor");
  check_domainstudio_grads(grad_image, grad_hf, grad_sse, x_in, op);
  const auto wt = check_weights(weights, op);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor t = target_of(target, x, op);
  const auto acc = acc_dtype(x.scalar_type());
  const Plan p = make_plan(x, kPanelBytes);
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;

  const at::Tensor gi = grad_image.to(acc), gh = grad_hf.to(acc);
  const at::Tensor mi = gi.add(gi.t()).contiguous();
  const at::Tensor mh = gh.add(gh.t()).contiguous();
  const double s2 = 2 * grad_sse.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "domainstudio_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const acc_t s = static_cast<acc_t>(s2);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* mip = mi.const_data_ptr<acc_t>();
    const acc_t* mhp = mh.const_data_ptr<acc_t>();
    scalar_t* gp = grad_x.mutable_data_ptr<scalar_t>();
    for_each_task(p, [&](int64_t /*task*/, int64_t cb, int64_t ce) {
      Chunk<acc_t> c(p);
      std::vector<acc_t> y(c.x.size()), q(c.panel.size());  // Mi X and Mh P, same layouts
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        c.load(xp, p, r0, nr, w4);
        small_mm(mip, c.x.data(), c.ldx, p.n, 4 * nr * p.w, y.data(), c.ldx);
        small_mm(mhp, c.panel.data(), c.ldp, p.n, nr * p.w, q.data(), c.ldp);
        for (int64_t i = 0; i < p.n; ++i) {
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t off = i * p.sample() + (r0 + r) * 4 * p.w;
            const acc_t* y_top = y.data() + i * c.ldx + r * 4 * p.w;
            const int64_t hf_off = i * c.ldp + r * p.w;
            const scalar_t* ttop = tp ? tp + off : nullptr;
            scatter_row<scalar_t, acc_t>(q.data() + hf_off, c.panel.data() + hf_off, s, ttop,
                                         ttop ? ttop + 2 * p.w : nullptr, y_top, y_top + 2 * p.w, gp + off,
                                         gp + off + 2 * p.w, p.w, w4);
          }
        }
      }
    });
  });
  return grad_x;
}

}  // namespace dsfast::cpu
