// Fused high-frequency Gram on CUDA: hf_gram(x) = gram(high_frequency(x).reshape(N, -1)) and
// its backward, without materialising the full (N, C, H/2, W/2) map.
//
// The N samples' hf rows are processed in chunks (see stencil.cuh for the panel layout): a kernel
// writes the N x L panel P of a chunk (in float32, float64 for float64 input) into a workspace,
// then cuBLAS does the rest:
//   forward:  G += P @ P.T                            (at::addmm_, rank-L update)
//   backward: Q  = (g + g.T) @ P, then a kernel scatters Q * (wa, wb, wc, wd) into grad_x.
// Workspaces are bounded (kPanelBytes), so memory stays O(panel) for any image size. Everything
// runs on the current stream, in order, so reusing the workspaces across chunks is safe. cuBLAS runs
// under at::NoTF32Guard (float32 stays float32 whatever torch's TF32 switch says).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/mm.h>

#include "../common.h"
#include "launch.cuh"
#include "ops.h"
#include "stencil.cuh"

namespace dsfast::cuda {

namespace {
constexpr int64_t kPanelBytes = int64_t{64} << 20;  // 64 MB workspace per panel
}  // namespace

at::Tensor hf_gram(const at::Tensor& x_in, c10::ArrayRef<double> weights) {
  const BelowAutograd below_autograd;
  check_image(x_in, "hf_gram");
  check_cuda(x_in, "hf_gram");
  const auto wt = check_weights(weights, "hf_gram");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::NoTF32Guard no_tf32;  // exact fp32 GEMMs whatever torch's TF32 switch says
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const int64_t n = x.size(0), rows = x.size(1) * (x.size(2) / 2), w = x.size(3) / 2;
  at::Tensor out = new_output({n, n}, acc_opts);
  if (n == 0) return out;
  out.zero_();
  if (rows == 0 || w == 0) return out;

  const int64_t rpc = rows_per_chunk(n, w, rows, c10::elementSize(acc), kPanelBytes);
  const int64_t sample = rows * 4 * w;
  at::Tensor panel = at::empty({n * rpc * w}, acc_opts);
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hf_gram_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t r0 = 0; r0 < rows; r0 += rpc) {
      const int64_t nr = std::min(rpc, rows - r0);
      const int64_t total = n * nr * w;
      hf_panel_kernel<scalar_t, acc_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), panel.mutable_data_ptr<acc_t>(), total, sample, r0, nr, w,
          acc_t(wt[0]), acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3]));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor p = panel.narrow(0, 0, total).view({n, nr * w});
      out.addmm_(p, p.t());
    }
  });
  return out;
}

at::Tensor hf_gram_backward(const at::Tensor& grad_gram, const at::Tensor& x_in,
                            c10::ArrayRef<double> weights) {
  const BelowAutograd below_autograd;
  check_image(x_in, "hf_gram_backward");
  check_cuda(x_in, "hf_gram_backward");
  check_grad_gram(grad_gram, x_in.size(0), x_in, "hf_gram_backward");
  const auto wt = check_weights(weights, "hf_gram_backward");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::NoTF32Guard no_tf32;  // exact fp32 GEMMs whatever torch's TF32 switch says
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const int64_t n = x.size(0), rows = x.size(1) * (x.size(2) / 2), w = x.size(3) / 2;
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;

  const at::Tensor g = grad_gram.to(acc);
  const at::Tensor m = g.add(g.t()).contiguous();
  const int64_t rpc = rows_per_chunk(n, w, rows, c10::elementSize(acc), kPanelBytes);
  const int64_t sample = rows * 4 * w;
  at::Tensor panel = at::empty({n * rpc * w}, acc_opts);
  at::Tensor qbuf = at::empty({n * rpc * w}, acc_opts);
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hf_gram_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t wa = wt[0], wb = wt[1], wc = wt[2], wd = wt[3];
    for (int64_t r0 = 0; r0 < rows; r0 += rpc) {
      const int64_t nr = std::min(rpc, rows - r0);
      const int64_t total = n * nr * w;
      hf_panel_kernel<scalar_t, acc_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), panel.mutable_data_ptr<acc_t>(), total, sample, r0, nr, w,
          wa, wb, wc, wd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor q = qbuf.narrow(0, 0, total).view({n, nr * w});
      at::mm_out(q, m, panel.narrow(0, 0, total).view({n, nr * w}));
      hf_scatter_kernel<acc_t, scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          q.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(), total, sample, r0, nr, w,
          wa, wb, wc, wd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad_x;
}

}  // namespace dsfast::cuda
