// Fused high-frequency Gram on CPU: hf_gram(x) = gram(high_frequency(x).reshape(N, -1)) and its
// backward, without materialising the (N, C, H/2, W/2) map.
//
// View x (N, C, H, W) as N samples of R = C*H/2 "hf rows": hf row r of sample n reads the two
// image rows 2r, 2r+1 of the (C*H, W) plane stack (channel boundaries fall between hf rows).
// The R rows are cut into chunks of `rows` hf rows (L = rows * w positions). For a chunk we build
// the N x L panel P of hf values in the accumulation dtype (x is read once, straight from memory),
// then (the panel and the scatter are the active ISA's loops, loops.h)
//   forward:  G += P @ P.T                 (BLAS rank-L update of the N x N Gram)
//   backward: Q  = (g + g.T) @ P; grad_x block = Q * (wa, wb, wc, wd)   (scatter, no reduction)
// Chunks are split into one contiguous range per thread; every thread owns its panel (sized to
// stay in cache) and, in the forward, its own partial Gram, summed at the end. Memory is one
// panel per thread, never the full map.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include "../common.h"
#include "isa.h"
#include "ops.h"
#include "panel.h"

namespace dsfast::cpu {

namespace {

// ~128 KB per panel: in the backward the panel P and Q = M @ P (same size) then both stay in a
// 512 KB L2; measured best of 16 KB .. 512 KB for N=16, 3x256x256 on one core.
constexpr int64_t kPanelBytes = int64_t{1} << 17;

}  // namespace

at::Tensor hf_gram(const at::Tensor& x_in, c10::ArrayRef<double> weights) {
  const BelowAutograd below_autograd;
  check_image(x_in, "hf_gram");
  TORCH_CHECK(x_in.device().is_cpu(), "hf_gram: expected a CPU tensor");
  const auto wt = check_weights(weights, "hf_gram");
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const Plan p = make_plan(x, kPanelBytes);
  at::Tensor out = new_output({p.n, p.n}, acc_opts);
  if (p.n == 0) return out;
  if (p.rows == 0 || p.w == 0) return out.zero_();

  at::Tensor partial = at::zeros({p.tasks, p.n, p.n}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hf_gram", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const auto& k = loops<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for_each_task(p, [&](int64_t t, int64_t cb, int64_t ce) {
      at::Tensor panel = at::empty({p.n * p.rows_per_chunk * p.w}, acc_opts);
      at::Tensor part = partial[t];
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        k.hf_panel(xp, panel.mutable_data_ptr<acc_t>(), geometry(p, r0, nr, 4 * nr * p.w, nr * p.w), w4);
        const at::Tensor pm = panel.narrow(0, 0, p.n * nr * p.w).view({p.n, nr * p.w});
        part.addmm_(pm, pm.t());
      }
    });
  });
  at::sum_out(out, partial, {0});
  return out;
}

at::Tensor hf_gram_backward(const at::Tensor& grad_gram, const at::Tensor& x_in,
                            c10::ArrayRef<double> weights) {
  const BelowAutograd below_autograd;
  check_image(x_in, "hf_gram_backward");
  TORCH_CHECK(x_in.device().is_cpu(), "hf_gram_backward: expected a CPU tensor");
  check_grad_gram(grad_gram, x_in.size(0), x_in, "hf_gram_backward");
  const auto wt = check_weights(weights, "hf_gram_backward");
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const Plan p = make_plan(x, kPanelBytes);
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;

  const at::Tensor g = grad_gram.to(acc);
  const at::Tensor m = g.add(g.t()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hf_gram_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const auto& k = loops<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_x.mutable_data_ptr<scalar_t>();
    for_each_task(p, [&](int64_t /*t*/, int64_t cb, int64_t ce) {
      at::Tensor panel = at::empty({p.n * p.rows_per_chunk * p.w}, acc_opts);
      at::Tensor qbuf = at::empty({p.n * p.rows_per_chunk * p.w}, acc_opts);
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        const int64_t len = nr * p.w;
        const PanelGeometry geo = geometry(p, r0, nr, 4 * len, len);
        k.hf_panel(xp, panel.mutable_data_ptr<acc_t>(), geo, w4);
        at::Tensor q = qbuf.narrow(0, 0, p.n * len).view({p.n, len});
        at::mm_out(q, m, panel.narrow(0, 0, p.n * len).view({p.n, len}));
        k.hf_panel_backward(q.const_data_ptr<acc_t>(), gp, geo, w4);
      }
    });
  });
  return grad_x;
}

}  // namespace dsfast::cpu
