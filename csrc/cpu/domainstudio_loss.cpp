// The whole DomainStudio loss of one batch in one pass over it, on CPU (docs/KERNELS.md):
//   domainstudio_grams(x, t)  = (x x^T, hf(x) hf(x)^T, sum((hf(x) - hf(t))^2))      (t absent: 0)
//   domainstudio_grams_backward(gi, gh, gs, x, t)
//       = (gi + gi^T) x + hf^T((gh + gh^T) hf(x) + 2 gs (hf(x) - hf(t)))
// The chunks of panel.h drive both: for a chunk, the hf panel P (and the hf-MSE partial sum) is
// built from x (and t) once, and the image rows of the same chunk, then still in cache, go to
// BLAS straight from x (fp16/bf16: through a float32 copy of the chunk):
//   forward:  Gi += X X^T, Gh += P P^T                        (per-thread partial Grams)
//   backward: grad_x chunk = Mi X (written by BLAS), Q = Mh P, then one stencil pass adds
//             (Q + 2 gs (P - hf(t))) * (wa, wb, wc, wd) to every 2x2 block.
// hf(x), the bands and Q never exist for the whole batch: memory is a few panels per thread.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <type_traits>
#include <vector>

#include "../common.h"
#include "ops.h"
#include "panel.h"

namespace dsfast::cpu {

namespace {

// hf panel of a chunk; its image rows are 4x as many bytes. 64 KB + 256 KB (+ Q) per thread stay
// in L2 between the stencil pass and the BLAS calls that re-read them.
constexpr int64_t kPanelBytes = int64_t{1} << 16;

// hf values of one row into `out`; returns sum((out - hf(t))^2) over the row (t null: sum(out^2)).
template <typename scalar_t, typename acc_t>
acc_t hf_row_sse(const scalar_t* top, const scalar_t* bot, const scalar_t* ttop, const scalar_t* tbot,
                 acc_t* __restrict__ out, int64_t w, const acc_t* wt) {
  const acc_t wa = wt[0], wb = wt[1], wc = wt[2], wd = wt[3];
  hf_row<scalar_t, acc_t, acc_t>(top, bot, out, w, wa, wb, wc, wd);
  acc_t sum = 0;
  if (ttop == nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < w; ++j) sum += out[j] * out[j];
    return sum;
  }
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < w; ++j) {
    const acc_t ht = wa * static_cast<acc_t>(ttop[2 * j]) + wb * static_cast<acc_t>(ttop[2 * j + 1]) +
                     wc * static_cast<acc_t>(tbot[2 * j]) + wd * static_cast<acc_t>(tbot[2 * j + 1]);
    const acc_t d = out[j] - ht;
    sum += d * d;
  }
  return sum;
}

// One row of the backward: v = q + s (p - hf(t)) (t null: q + s p); the 2x2 blocks of the row get
// g_img + v * (wa, wb, wc, wd). g_top/g_bot may alias top/bot (float32/64: BLAS wrote grad_x).
template <typename scalar_t, typename acc_t>
void scatter_row(const acc_t* __restrict__ q, const acc_t* __restrict__ p, acc_t s, const scalar_t* ttop,
                 const scalar_t* tbot, const acc_t* g_top, const acc_t* g_bot, scalar_t* top, scalar_t* bot,
                 int64_t w, const acc_t* wt) {
  const acc_t wa = wt[0], wb = wt[1], wc = wt[2], wd = wt[3];
  if (ttop == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const acc_t v = q[j] + s * p[j];
      top[2 * j] = static_cast<scalar_t>(g_top[2 * j] + wa * v);
      top[2 * j + 1] = static_cast<scalar_t>(g_top[2 * j + 1] + wb * v);
      bot[2 * j] = static_cast<scalar_t>(g_bot[2 * j] + wc * v);
      bot[2 * j + 1] = static_cast<scalar_t>(g_bot[2 * j + 1] + wd * v);
    }
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    const acc_t ht = wa * static_cast<acc_t>(ttop[2 * j]) + wb * static_cast<acc_t>(ttop[2 * j + 1]) +
                     wc * static_cast<acc_t>(tbot[2 * j]) + wd * static_cast<acc_t>(tbot[2 * j + 1]);
    const acc_t v = q[j] + s * (p[j] - ht);
    top[2 * j] = static_cast<scalar_t>(g_top[2 * j] + wa * v);
    top[2 * j + 1] = static_cast<scalar_t>(g_top[2 * j + 1] + wb * v);
    bot[2 * j] = static_cast<scalar_t>(g_bot[2 * j] + wc * v);
    bot[2 * j + 1] = static_cast<scalar_t>(g_bot[2 * j + 1] + wd * v);
  }
}

// The checked, contiguous target (undefined when absent).
at::Tensor target_of(const std::optional<at::Tensor>& target, const at::Tensor& x, const char* op) {
  if (!target.has_value() || !target->defined()) return {};
  check_image(*target, op, "target");
  check_like(*target, x, op, "target");
  return target->contiguous();
}

// The image rows of a chunk, (N, 4 * nr * w), as a BLAS operand in acc_t: a strided view of x
// itself when x is already acc_t, else a copy into `buf`.
at::Tensor image_rows(const at::Tensor& x2d, at::Tensor& buf, int64_t col0, int64_t cols) {
  const at::Tensor rows = x2d.narrow(1, col0, cols);
  if (!buf.defined()) return rows;
  at::Tensor out = buf.narrow(1, 0, cols);
  out.copy_(rows);
  return out;
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

  const at::Tensor x2d = x.view({p.n, p.sample()});
  at::Tensor part_image = at::zeros({p.tasks, p.n, p.n}, acc_opts);
  at::Tensor part_hf = at::zeros({p.tasks, p.n, p.n}, acc_opts);
  std::vector<double> part_sse(p.tasks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "domainstudio_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    for_each_task(p, [&](int64_t task, int64_t cb, int64_t ce) {
      at::Tensor panel = at::empty({p.n * p.rows_per_chunk * p.w}, acc_opts);
      at::Tensor buf;
      if (!std::is_same_v<scalar_t, acc_t>) buf = at::empty({p.n, 4 * p.rows_per_chunk * p.w}, acc_opts);
      at::Tensor gi = part_image[task], gh = part_hf[task];
      acc_t* pp = panel.mutable_data_ptr<acc_t>();
      double sum = 0;
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        const int64_t len = nr * p.w;
        for (int64_t i = 0; i < p.n; ++i) {
          acc_t row_sum = 0;
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t off = i * p.sample() + (r0 + r) * 4 * p.w;
            const scalar_t* top = xp + off;
            const scalar_t* ttop = tp ? tp + off : nullptr;
            row_sum += hf_row_sse<scalar_t, acc_t>(top, top + 2 * p.w, ttop, ttop ? ttop + 2 * p.w : nullptr,
                                                   pp + i * len + r * p.w, p.w, w4);
          }
          sum += row_sum;
        }
        const at::Tensor xi = image_rows(x2d, buf, r0 * 4 * p.w, 4 * len);
        gi.addmm_(xi, xi.t());
        const at::Tensor pm = panel.narrow(0, 0, p.n * len).view({p.n, len});
        gh.addmm_(pm, pm.t());
      }
      part_sse[task] = sum;
    });
  });
  at::sum_out(image, part_image, {0});
  at::sum_out(hf, part_hf, {0});
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
  check_grad_gram(grad_image, x_in.size(0), x_in, op, "grad_image");
  check_grad_gram(grad_hf, x_in.size(0), x_in, op, "grad_hf");
  check_float(grad_sse, op, "grad_sse");
  TORCH_CHECK(grad_sse.numel() == 1, op, ": grad_sse must hold one number, got shape ", grad_sse.sizes());
  const auto wt = check_weights(weights, op);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor t = target_of(target, x, op);
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const Plan p = make_plan(x, kPanelBytes);
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;

  const at::Tensor gi = grad_image.to(acc), gh = grad_hf.to(acc);
  const at::Tensor mi = gi.add(gi.t()).contiguous();
  const at::Tensor mh = gh.add(gh.t()).contiguous();
  const double s2 = 2 * grad_sse.item<double>();
  const at::Tensor x2d = x.view({p.n, p.sample()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "domainstudio_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;  // BLAS writes grad_x itself
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const acc_t s = static_cast<acc_t>(s2);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = grad_x.mutable_data_ptr<scalar_t>();
    const at::Tensor grad2d = grad_x.view({p.n, p.sample()});
    for_each_task(p, [&](int64_t /*task*/, int64_t cb, int64_t ce) {
      const int64_t most = p.n * p.rows_per_chunk * p.w;
      at::Tensor panel = at::empty({most}, acc_opts);
      at::Tensor qbuf = at::empty({most}, acc_opts);
      at::Tensor buf, gbuf;
      if (!direct) {
        buf = at::empty({p.n, 4 * p.rows_per_chunk * p.w}, acc_opts);
        gbuf = at::empty({p.n, 4 * p.rows_per_chunk * p.w}, acc_opts);
      }
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        const int64_t len = nr * p.w, col0 = r0 * 4 * p.w;
        build_panel<scalar_t, acc_t>(xp, panel.mutable_data_ptr<acc_t>(), p, r0, nr, w4);
        at::Tensor q = qbuf.narrow(0, 0, p.n * len).view({p.n, len});
        at::mm_out(q, mh, panel.narrow(0, 0, p.n * len).view({p.n, len}));
        // image-Gram term of the chunk: into grad_x (float32/64) or a float32 buffer
        at::Tensor g = direct ? grad2d.narrow(1, col0, 4 * len) : gbuf.narrow(1, 0, 4 * len);
        at::mm_out(g, mi, image_rows(x2d, buf, col0, 4 * len));
        const acc_t* gv = g.const_data_ptr<acc_t>();
        const int64_t g_ld = g.stride(0);
        const acc_t* qp = q.const_data_ptr<acc_t>();
        const acc_t* pp = panel.const_data_ptr<acc_t>();
        for (int64_t i = 0; i < p.n; ++i) {
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t off = i * p.sample() + col0 + r * 4 * p.w;
            const acc_t* g_top = gv + i * g_ld + r * 4 * p.w;
            const scalar_t* ttop = tp ? tp + off : nullptr;
            scatter_row<scalar_t, acc_t>(qp + i * len + r * p.w, pp + i * len + r * p.w, s, ttop,
                                         ttop ? ttop + 2 * p.w : nullptr, g_top, g_top + 2 * p.w,
                                         gp + off, gp + off + 2 * p.w, p.w, w4);
          }
        }
      }
    });
  });
  return grad_x;
}

}  // namespace dsfast::cpu
