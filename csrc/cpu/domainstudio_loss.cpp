// The whole DomainStudio loss of one batch in one pass over it, on CPU (docs/KERNELS.md):
//   domainstudio_grams(x, t, sw)  = (x x^T, hf(x) hf(x)^T, sum_i sw_i sum((hf(x_i) - hf(t_i))^2))  (t absent: 0)
//   domainstudio_grams_backward(gi, gh, gs, x, t, sw)
//       = (gi + gi^T) x + hf^T((gh + gh^T) hf(x) + 2 gs diag(sw) (hf(x) - hf(t)))
// sw: optional per-sample weights of the hf-MSE sum (N,), absent = all ones.
// The chunks of panel.h drive both, through the active ISA's chunk loops (loops.h: grams_chunk,
// grams_backward_chunk). A chunk's image rows are read from x once, into a per-thread
// buffer X in the accumulation dtype, and its hf panel P is built from that buffer; both stay in
// L2 for the small products of small_gram.h (rows padded by a cache line: rows of x are often a
// multiple of 4 KB apart, which would make the N rows of a block collide in L1):
//   forward:  Gi += X X^T, Gh += P P^T (per-thread partial Grams), sse += sw_i |P_i - hf(t_i)|^2
//   backward: Y = Mi X, Q = Mh P, then one stencil pass writes every 2x2 block of grad_x once:
//             Y + (Q + 2 gs sw_i (P - hf(t))) * (wa, wb, wc, wd).
// hf(x), the bands and Q never exist for the whole batch: memory is a few panels per thread.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "../common.h"
#include "isa.h"
#include "ops.h"
#include "panel.h"

namespace dsfast::cpu {

namespace {

// hf panel of a chunk; its image rows are 4x as many bytes. 64 KB + 256 KB (+ Q, Y in the
// backward) per thread stay in L2 between the pass that reads x and the products.
constexpr int64_t kPanelBytes = int64_t{1} << 16;
constexpr int64_t kPad = 16;  // elements added to every buffer row (one or two cache lines)

// One thread's buffers: X (N rows of 4 * rows_per_chunk * w) and P (N rows of rows_per_chunk * w).
template <typename acc_t>
struct Chunk {
  int64_t ldx, ldp;
  std::vector<acc_t> x, panel;
  explicit Chunk(const Plan& p)
      : ldx(4 * p.rows_per_chunk * p.w + kPad), ldp(p.rows_per_chunk * p.w + kPad),
        x(p.n * ldx), panel(p.n * ldp) {}
};

// g[j][i] = g[i][j] for i < j.
template <typename T>
void mirror_upper(T* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i + 1; j < n; ++j) g[j * n + i] = g[i * n + j];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> domainstudio_grams(const at::Tensor& x_in,
                                                                  const std::optional<at::Tensor>& target,
                                                                  c10::ArrayRef<double> weights,
                                                                  const std::optional<at::Tensor>& sse_weights) {
  const char* op = "domainstudio_grams";
  const BelowAutograd below_autograd;
  check_image(x_in, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": expected a CPU tensor");
  const auto wt = check_weights(weights, op);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor t = target_of(target, x, op);
  const at::Tensor sw = sse_weights_of(sse_weights, x, at::kDouble, op);
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
    const double* swp = sw.defined() ? sw.const_data_ptr<double>() : nullptr;
    const auto& k = loops<scalar_t>();
    for_each_task(p, [&](int64_t task, int64_t cb, int64_t ce) {
      Chunk<acc_t> c(p);
      acc_t* gi = part_image[task].mutable_data_ptr<acc_t>();
      acc_t* gh = part_hf[task].mutable_data_ptr<acc_t>();
      double sum = 0;
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        sum += k.grams_chunk(xp, tp, geometry(p, r0, nr, c.ldx, c.ldp), w4, swp, c.x.data(), c.panel.data(), gi,
                             gh);
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
                                       c10::ArrayRef<double> weights,
                                       const std::optional<at::Tensor>& sse_weights) {
  const char* op = "domainstudio_grams_backward";
  const BelowAutograd below_autograd;
  check_image(x_in, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": expected a CPU tensor");
  check_domainstudio_grads(grad_image, grad_hf, grad_sse, x_in, op);
  const auto wt = check_weights(weights, op);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor t = target_of(target, x, op);
  const at::Tensor sw = sse_weights_of(sse_weights, x, at::kDouble, op);
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
    const double* swp = sw.defined() ? sw.const_data_ptr<double>() : nullptr;
    const acc_t* mip = mi.const_data_ptr<acc_t>();
    const acc_t* mhp = mh.const_data_ptr<acc_t>();
    scalar_t* gp = grad_x.mutable_data_ptr<scalar_t>();
    const auto& k = loops<scalar_t>();
    for_each_task(p, [&](int64_t /*task*/, int64_t cb, int64_t ce) {
      Chunk<acc_t> c(p);
      std::vector<acc_t> y(c.x.size()), q(c.panel.size());  // Mi X and Mh P, same layouts
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        k.grams_backward_chunk(xp, tp, geometry(p, r0, nr, c.ldx, c.ldp), w4, s, swp, mip, mhp, c.x.data(),
                               c.panel.data(), y.data(), q.data(), gp);
      }
    });
  });
  return grad_x;
}

}  // namespace dsfast::cpu
