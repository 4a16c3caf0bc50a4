// The whole DomainStudio loss of one batch on CUDA (contract: docs/KERNELS.md, CPU twin:
// csrc/cpu/domainstudio_loss.cpp). The hf rows of the batch go in chunks (panel layout: stencil.cuh)
// whose image rows, N x 4L, fit in L2 (kPanelBytes), so that what one kernel reads from DRAM the
// next call re-reads from L2:
//   forward:  a kernel writes the hf panel P and per-block partial sums of sw_s (P - hf(t))^2; cuBLAS
//             adds X X^T (straight from x for float32/64, from a float32 copy of the chunk for
//             16-bit x) and P P^T to the Grams;
//   backward: Q = Mh P and Y = Mi X (cuBLAS, Y written into grad_x for float32/64), then a kernel
//             writes every 2x2 block once: Y + (Q + 2 g_sse sw_s (P - hf(t))) * (wa, wb, wc, wd).
// sw: the optional per-sample weights of the hf-MSE sum (absent: all ones; a weight of 1 gives the
// unweighted bits). g_sse and sw are read on the device (no host sync). The cuBLAS calls run under at::NoTF32Guard: float32
// products stay float32 when a script enables TF32 (torch.backends.cuda.matmul.allow_tf32). Everything runs in order on the current stream, so
// the workspaces are reused across chunks.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include "../common.h"
#include "launch.cuh"
#include "ops.h"
#include "stencil.cuh"

namespace dsfast::cuda {

namespace {

constexpr int64_t kPanelBytes = int64_t{4} << 20;  // hf panel 4 MB, image rows 16 MB: L2-resident

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t stencil_at(const scalar_t* top, int64_t w2, acc_t wa, acc_t wb, acc_t wc,
                                            acc_t wd) {
  return wa * static_cast<acc_t>(top[0]) + wb * static_cast<acc_t>(top[1]) +
         wc * static_cast<acc_t>(top[w2]) + wd * static_cast<acc_t>(top[w2 + 1]);
}

// panel[i] = hf(x) of block (s, r0 + r, j); partial[blockIdx.x] = sum over the block's elements of
// sw[s] (hf(x) - hf(t))^2 (t null: hf(x)^2; sw null: weight 1).
template <typename scalar_t, typename acc_t>
__global__ void ds_panel_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ t,
                                const acc_t* __restrict__ sw, acc_t* __restrict__ panel,
                                acc_t* __restrict__ partial, int64_t total,
                                int64_t sample, int64_t r0, int64_t nr, int64_t w, acc_t wa, acc_t wb,
                                acc_t wc, acc_t wd) {
  __shared__ acc_t red[kThreads];
  const int64_t len = nr * w;
  acc_t sum = 0;
  DSFAST_GRID_STRIDE_LOOP(i, total) {
    const int64_t s = i / len;
    const int64_t rem = i - s * len;
    const int64_t r = rem / w;
    const int64_t j = rem - r * w;
    const int64_t off = s * sample + (r0 + r) * 4 * w + 2 * j;
    const acc_t hf = stencil_at(x + off, 2 * w, wa, wb, wc, wd);
    panel[i] = hf;
    const acc_t d = t == nullptr ? hf : hf - stencil_at(t + off, 2 * w, wa, wb, wc, wd);
    const acc_t dw = sw == nullptr ? d : d * sw[s];  // weight 1: d itself, the same (FMA-contracted) sum
    sum += dw * d;
  }
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

// Every block (s, r0 + r, j) of grad: y + v * (wa, wb, wc, wd), v = q + 2 g_sse sw[s] (p - hf(t))
// (sw null: weight 1). y (row stride ldy per sample, 4 * w per hf row) may alias grad.
template <typename scalar_t, typename acc_t>
__global__ void ds_scatter_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ panel,
                                  const scalar_t* __restrict__ t, const acc_t* y, int64_t ldy,
                                  const acc_t* __restrict__ grad_sse, const acc_t* __restrict__ sw,
                                  scalar_t* grad, int64_t total,
                                  int64_t sample, int64_t r0, int64_t nr, int64_t w, acc_t wa, acc_t wb,
                                  acc_t wc, acc_t wd) {
  const int64_t len = nr * w;
  const acc_t s2 = 2 * grad_sse[0];
  DSFAST_GRID_STRIDE_LOOP(i, total) {
    const int64_t s = i / len;
    const int64_t rem = i - s * len;
    const int64_t r = rem / w;
    const int64_t j = rem - r * w;
    const int64_t off = s * sample + (r0 + r) * 4 * w + 2 * j;
    const acc_t p = t == nullptr ? panel[i] : panel[i] - stencil_at(t + off, 2 * w, wa, wb, wc, wd);
    const acc_t v = q[i] + (sw == nullptr ? s2 : s2 * sw[s]) * p;
    const acc_t* yb = y + s * ldy + r * 4 * w + 2 * j;
    const acc_t y0 = yb[0], y1 = yb[1], y2 = yb[2 * w], y3 = yb[2 * w + 1];
    grad[off] = static_cast<scalar_t>(y0 + wa * v);
    grad[off + 1] = static_cast<scalar_t>(y1 + wb * v);
    grad[off + 2 * w] = static_cast<scalar_t>(y2 + wc * v);
    grad[off + 2 * w + 1] = static_cast<scalar_t>(y3 + wd * v);
  }
}

// The image rows [col0, col0 + cols) of x2d in the accumulation dtype: x itself for float32/64,
// else copied into buf.
at::Tensor image_rows(const at::Tensor& x2d, const at::Tensor& buf, int64_t col0, int64_t cols) {
  const at::Tensor rows = x2d.narrow(1, col0, cols);
  if (!buf.defined()) return rows;
  at::Tensor out = buf.narrow(1, 0, cols);
  out.copy_(rows);
  return out;
}

struct Chunks {
  int64_t n, rows, w, rpc, sample;
};

Chunks plan(const at::Tensor& x) {
  const int64_t n = x.size(0), rows = x.size(1) * (x.size(2) / 2), w = x.size(3) / 2;
  const auto acc = acc_dtype(x.scalar_type());
  return {n, rows, w, rows_per_chunk(n, w, rows, c10::elementSize(acc), kPanelBytes), rows * 4 * w};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> domainstudio_grams(const at::Tensor& x_in,
                                                                  const std::optional<at::Tensor>& target,
                                                                  c10::ArrayRef<double> weights,
                                                                  const std::optional<at::Tensor>& sse_weights) {
  const char* op = "domainstudio_grams";
  const BelowAutograd below_autograd;
  check_image(x_in, op);
  check_cuda(x_in, op);
  const auto wt = check_weights(weights, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::NoTF32Guard no_tf32;  // exact fp32 GEMMs whatever torch's TF32 switch says
  const at::Tensor x = x_in.contiguous();
  const at::Tensor t = target_of(target, x, op);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor sw = sse_weights_of(sse_weights, x, acc, op);
  const auto acc_opts = x.options().dtype(acc);
  const Chunks c = plan(x);
  at::Tensor image = new_output({c.n, c.n}, acc_opts);
  at::Tensor hf = new_output({c.n, c.n}, acc_opts);
  at::Tensor sse = new_output({}, acc_opts);
  image.zero_();
  hf.zero_();
  if (x.numel() == 0) return {image, hf, sse.zero_()};

  const int64_t chunks = (c.rows + c.rpc - 1) / c.rpc;
  const int64_t blocks = grid_for(c.n * c.rpc * c.w).x;  // of the largest chunk
  at::Tensor panel = at::empty({c.n * c.rpc * c.w}, acc_opts);
  at::Tensor partial = at::zeros({chunks, blocks}, acc_opts);  // chunks with fewer blocks leave zeros
  at::Tensor buf;
  if (x.scalar_type() != acc) buf = at::empty({c.n, 4 * c.rpc * c.w}, acc_opts);
  const at::Tensor x2d = x.view({c.n, c.sample});
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "domainstudio_grams_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tp = t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* swp = sw.defined() ? sw.const_data_ptr<acc_t>() : nullptr;
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t r0 = k * c.rpc;
      const int64_t nr = std::min(c.rpc, c.rows - r0);
      const int64_t total = c.n * nr * c.w;
      ds_panel_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), tp, swp, panel.mutable_data_ptr<acc_t>(),
          partial.mutable_data_ptr<acc_t>() + k * blocks, total, c.sample, r0, nr, c.w, acc_t(wt[0]),
          acc_t(wt[1]), acc_t(wt[2]), acc_t(wt[3]));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor xi = image_rows(x2d, buf, r0 * 4 * c.w, 4 * nr * c.w);
      image.addmm_(xi, xi.t());
      const at::Tensor p = panel.narrow(0, 0, total).view({c.n, nr * c.w});
      hf.addmm_(p, p.t());
    }
  });
  sse.copy_(partial.sum());
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
  check_cuda(x_in, op);
  check_domainstudio_grads(grad_image, grad_hf, grad_sse, x_in, op);
  const auto wt = check_weights(weights, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::NoTF32Guard no_tf32;  // exact fp32 GEMMs whatever torch's TF32 switch says
  const at::Tensor x = x_in.contiguous();
  const at::Tensor t = target_of(target, x, op);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor sw = sse_weights_of(sse_weights, x, acc, op);
  const auto acc_opts = x.options().dtype(acc);
  const Chunks c = plan(x);
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;

  const at::Tensor gi = grad_image.to(acc), gh = grad_hf.to(acc);
  const at::Tensor mi = gi.add(gi.t()).contiguous();
  const at::Tensor mh = gh.add(gh.t()).contiguous();
  const at::Tensor gs = grad_sse.to(acc).contiguous();
  const bool direct = x.scalar_type() == acc;  // cuBLAS writes Mi X into grad_x itself
  at::Tensor panel = at::empty({c.n * c.rpc * c.w}, acc_opts);
  at::Tensor qbuf = at::empty({c.n * c.rpc * c.w}, acc_opts);
  at::Tensor buf, ybuf;
  if (!direct) {
    buf = at::empty({c.n, 4 * c.rpc * c.w}, acc_opts);
    ybuf = at::empty({c.n, 4 * c.rpc * c.w}, acc_opts);
  }
  const at::Tensor x2d = x.view({c.n, c.sample});
  const at::Tensor grad2d = grad_x.view({c.n, c.sample});
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "domainstudio_grams_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t wa = wt[0], wb = wt[1], wc = wt[2], wd = wt[3];
    const scalar_t* tp = t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* swp = sw.defined() ? sw.const_data_ptr<acc_t>() : nullptr;
    for (int64_t r0 = 0; r0 < c.rows; r0 += c.rpc) {
      const int64_t nr = std::min(c.rpc, c.rows - r0);
      const int64_t total = c.n * nr * c.w, col0 = r0 * 4 * c.w, cols = 4 * nr * c.w;
      hf_panel_kernel<scalar_t, acc_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), panel.mutable_data_ptr<acc_t>(), total, c.sample, r0, nr, c.w,
          wa, wb, wc, wd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor q = qbuf.narrow(0, 0, total).view({c.n, nr * c.w});
      at::mm_out(q, mh, panel.narrow(0, 0, total).view({c.n, nr * c.w}));
      at::Tensor y = direct ? grad2d.narrow(1, col0, cols) : ybuf.narrow(1, 0, cols);
      at::mm_out(y, mi, image_rows(x2d, buf, col0, cols));
      ds_scatter_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          q.const_data_ptr<acc_t>(), panel.const_data_ptr<acc_t>(), tp, y.const_data_ptr<acc_t>(),
          y.stride(0), gs.const_data_ptr<acc_t>(), swp, grad_x.mutable_data_ptr<scalar_t>(), total, c.sample,
          r0, nr, c.w, wa, wb, wc, wd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad_x;
}

}  // namespace dsfast::cuda
