// Fused high-frequency Gram on CPU: hf_gram(x) = gram(high_frequency(x).reshape(N, -1)) and its
// backward, without materialising the (N, C, H/2, W/2) map.
//
// View x (N, C, H, W) as N samples of R = C*H/2 "hf rows": hf row r of sample n reads the two
// image rows 2r, 2r+1 of the (C*H, W) plane stack (channel boundaries fall between hf rows).
// The R rows are cut into chunks of `rows` hf rows (L = rows * w positions). For a chunk we build
// the N x L panel P of hf values in the accumulation dtype (x is read once, straight from memory),
// then
//   forward:  G += P @ P.T                 (BLAS rank-L update of the N x N Gram)
//   backward: Q  = (g + g.T) @ P; grad_x block = Q * (wa, wb, wc, wd)   (scatter, no reduction)
// Chunks are split into one contiguous range per thread; every thread owns its panel (sized to
// stay in cache) and, in the forward, its own partial Gram, summed at the end. Memory is one
// panel per thread, never the full map.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include "../common.h"
#include "ops.h"
#include "stencil.h"

namespace dsfast::cpu {

namespace {

// ~128 KB per panel: in the backward the panel P and Q = M @ P (same size) then both stay in a
// 512 KB L2; measured best of 16 KB .. 512 KB for N=16, 3x256x256 on one core.
constexpr int64_t kPanelBytes = int64_t{1} << 17;

struct Plan {
  int64_t n, rows, w, rows_per_chunk, chunks, tasks;
};

Plan make_plan(const at::Tensor& x) {
  Plan p{};
  p.n = x.size(0);
  p.rows = x.size(1) * (x.size(2) / 2);
  p.w = x.size(3) / 2;
  const int64_t elem = x.scalar_type() == at::kDouble ? 8 : 4;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  p.rows_per_chunk = rows_per_chunk(p.n, p.w, p.rows, elem, kPanelBytes);
  // Leave a few chunks per thread for load balance when the map is small.
  const int64_t balanced = std::max<int64_t>(1, p.rows / (4 * threads));
  p.rows_per_chunk = std::max<int64_t>(1, std::min(p.rows_per_chunk, balanced));
  p.chunks = (p.rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
  p.tasks = std::min(threads, p.chunks);
  return p;
}

// Fill panel (N, L) with the hf values of hf rows [r0, r0 + nr) of every sample.
template <typename scalar_t, typename acc_t>
void build_panel(const scalar_t* x, acc_t* panel, const Plan& p, int64_t r0, int64_t nr,
                 const acc_t* wt) {
  const int64_t sample = p.rows * 4 * p.w;  // elements per sample of x
  const int64_t len = nr * p.w;
  for (int64_t i = 0; i < p.n; ++i) {
    const scalar_t* xs = x + i * sample + r0 * 4 * p.w;
    acc_t* out = panel + i * len;
    for (int64_t r = 0; r < nr; ++r) {
      const scalar_t* top = xs + r * 4 * p.w;
      hf_row<scalar_t, acc_t, acc_t>(top, top + 2 * p.w, out + r * p.w, p.w, wt[0], wt[1], wt[2], wt[3]);
    }
  }
}

// Run body(task, chunk_begin, chunk_end) for every task in parallel; ATen ops inside `body`
// see the caller's thread-local state (grad mode, inference mode, dispatch keys).
template <typename F>
void for_each_task(const Plan& p, const F& body) {
  const at::ThreadLocalState state;
  at::parallel_for(0, p.tasks, 1, [&](int64_t tb, int64_t te) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = tb; t < te; ++t) {
      body(t, t * p.chunks / p.tasks, (t + 1) * p.chunks / p.tasks);
    }
  });
}

}  // namespace

at::Tensor hf_gram(const at::Tensor& x_in, c10::ArrayRef<double> weights) {
  const BelowAutograd below_autograd;
  check_image(x_in, "hf_gram");
  TORCH_CHECK(x_in.device().is_cpu(), "hf_gram: expected a CPU tensor");
  const auto wt = check_weights(weights, "hf_gram");
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const Plan p = make_plan(x);
  at::Tensor out = new_output({p.n, p.n}, acc_opts);
  if (p.n == 0) return out;
  if (p.rows == 0 || p.w == 0) return out.zero_();

  at::Tensor partial = at::zeros({p.tasks, p.n, p.n}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hf_gram", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for_each_task(p, [&](int64_t t, int64_t cb, int64_t ce) {
      at::Tensor panel = at::empty({p.n * p.rows_per_chunk * p.w}, acc_opts);
      at::Tensor part = partial[t];
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        build_panel<scalar_t, acc_t>(xp, panel.mutable_data_ptr<acc_t>(), p, r0, nr, w4);
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
  const Plan p = make_plan(x);
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;

  const at::Tensor g = grad_gram.to(acc);
  const at::Tensor m = g.add(g.t()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hf_gram_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w4[4] = {acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3])};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_x.mutable_data_ptr<scalar_t>();
    const int64_t sample = p.rows * 4 * p.w;
    for_each_task(p, [&](int64_t /*t*/, int64_t cb, int64_t ce) {
      at::Tensor panel = at::empty({p.n * p.rows_per_chunk * p.w}, acc_opts);
      at::Tensor qbuf = at::empty({p.n * p.rows_per_chunk * p.w}, acc_opts);
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = chunk * p.rows_per_chunk;
        const int64_t nr = std::min(p.rows_per_chunk, p.rows - r0);
        const int64_t len = nr * p.w;
        build_panel<scalar_t, acc_t>(xp, panel.mutable_data_ptr<acc_t>(), p, r0, nr, w4);
        at::Tensor q = qbuf.narrow(0, 0, p.n * len).view({p.n, len});
        at::mm_out(q, m, panel.narrow(0, 0, p.n * len).view({p.n, len}));
        const acc_t* qp = q.const_data_ptr<acc_t>();
        for (int64_t i = 0; i < p.n; ++i) {
          scalar_t* dst = gp + i * sample + r0 * 4 * p.w;
          for (int64_t r = 0; r < nr; ++r) {
            scalar_t* top = dst + r * 4 * p.w;
            hf_row_backward<acc_t, scalar_t, acc_t>(qp + i * len + r * p.w, top, top + 2 * p.w, p.w,
                                                    w4[0], w4[1], w4[2], w4[3]);
          }
        }
      }
    });
  });
  return grad_x;
}

}  // namespace dsfast::cpu
