// Gram matrix of a flattened batch and its backward, for every device.
// gram(x) = x @ x.T for x (N, D); gram_backward(g, x) = (g + g.T) @ x.
// These are plain GEMMs: at::mm (MKL/OpenBLAS on CPU, cuBLAS on CUDA), so one device-generic
// implementation is registered for both CPU and CUDA. Accumulation is float32 (float64 for float64).
// CPU: fp16/bf16 inputs are upcast once, and D is summed in column chunks (see gram).
// CUDA: one cuBLAS GEMM over all of D (its tiled, split-K accumulation has no long sequential sums),
// 16-bit inputs go to the tensor cores as they are (mm with a float32 out_dtype, no fp32 copy).
// float32 GEMMs run under at::NoTF32Guard: exact fp32 whatever torch's TF32 switch
// (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision) says.
#include <ATen/Context.h>
#include <ATen/ops/mm.h>

#include <algorithm>

#include "../common.h"
#include "ops.h"

namespace dsfast {

constexpr int64_t kGramChunk = 1 << 14;

namespace {
void check_2d(const at::Tensor& x, const char* op) {
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N, D), got shape ", x.sizes());
}
}  // namespace

at::Tensor gram(const at::Tensor& x) {
  const BelowAutograd below_autograd;
  check_2d(x, "gram");
  const at::NoTF32Guard no_tf32;  // exact fp32 GEMMs whatever torch's TF32 switch says
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor out = new_output({x.size(0), x.size(0)}, x.options().dtype(acc));
  if (x.is_cuda()) {
    if (x.scalar_type() == acc) {
      at::mm_out(out, x, x.t());
    } else {
      at::mm_out(out, x, x.t(), acc);
    }
    return out;
  }
  const at::Tensor xf = x.to(acc);  // a no-op view for float32 / float64
  // One GEMM over a very long D accumulates millions of float32 products per entry; summing
  // column chunks keeps the error at the level of a chunk (cosines of 3x1024x1024 samples
  // otherwise lose ~1e-4 relative).
  const int64_t d = x.size(1);
  const int64_t first = std::min(kGramChunk, d);
  at::mm_out(out, xf.narrow(1, 0, first), xf.narrow(1, 0, first).t());
  for (int64_t k = first; k < d; k += kGramChunk) {
    const at::Tensor chunk = xf.narrow(1, k, std::min(kGramChunk, d - k));
    out.addmm_(chunk, chunk.t());
  }
  return out;
}

at::Tensor gram_backward(const at::Tensor& grad_gram, const at::Tensor& x) {
  const BelowAutograd below_autograd;
  check_2d(x, "gram_backward");
  check_grad_gram(grad_gram, x.size(0), x, "gram_backward");
  const at::NoTF32Guard no_tf32;  // exact fp32 GEMMs whatever torch's TF32 switch says
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor g = grad_gram.to(acc);
  const at::Tensor m = g.add(g.t());
  at::Tensor out = new_output(x.sizes(), x.options());
  if (x.is_cuda() && x.scalar_type() != acc) {
    // One GEMM in x's dtype with float32 accumulation, no float32 copy of x: M = g + gᵀ is scaled by
    // a power of two to max |M| <= 1 (exact, and fp16 can neither overflow nor underflow), rounded
    // to x's dtype, and the product scaled back in place (exact). The scale stays on the device.
    const at::Tensor scale = m.abs().amax().clamp_min(1e-30).log2().ceil().exp2();
    at::mm_out(out, m.div(scale).to(x.scalar_type()), x);
    out.mul_(scale);
    return out;
  }
  if (x.scalar_type() == acc) {
    at::mm_out(out, m, x);
  } else {
    out.copy_(at::mm(m, x.to(acc)));
  }
  return out;
}

}  // namespace dsfast
