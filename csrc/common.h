// Shared helpers of the dsfast C++/CUDA kernels: argument checks, output allocation with
// debug poisoning, and the 2x2 stencil weights. See docs/KERNELS.md for the contract.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

namespace dsfast {

// Every kernel entry point opens one of these: the kernels are leaf ops whose autograd (if any)
// lives in the Python layer, so ATen calls inside them (contiguous, to, mm, ...) must not record
// autograd history even when an input requires grad.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// True when DSFAST_POISON_OUTPUTS=1. Read on every call (cheap) so tests can flip it at run time.
inline bool poison_outputs() {
  const char* v = std::getenv("DSFAST_POISON_OUTPUTS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Allocate an output; when poisoning is on, fill it with NaN so unwritten elements show.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  if (poison_outputs() && out.numel() > 0) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

// Accumulation dtype: float64 stays float64, everything else computes in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor (float16, bfloat16, float32, float64), got ",
              t.scalar_type());
}

// (N, C, H, W) with H and W even.
inline void check_image(const at::Tensor& x, const char* op, const char* name = "x") {
  check_float(x, op, name);
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, op, ": ", name,
              " must have even H and W, got shape ", x.sizes());
}

// Four stencil weights (wa, wb, wc, wd) for the block [[a, b], [c, d]].
inline std::array<double, 4> check_weights(c10::ArrayRef<double> w, const char* op) {
  TORCH_CHECK(w.size() == 4, op, ": weights must hold 4 floats (wa, wb, wc, wd), got ", w.size());
  return {w[0], w[1], w[2], w[3]};
}

inline void check_grad_gram(const at::Tensor& g, int64_t n, const at::Tensor& x, const char* op,
                            const char* name = "grad_gram") {
  check_float(g, op, name);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == n && g.size(1) == n, op, ": ", name,
              " must have shape (N, N) = (", n, ", ", n, "), got ", g.sizes());
  TORCH_CHECK(g.device() == x.device(), op, ": ", name, " and x must be on the same device, got ",
              g.device(), " and ", x.device());
}

// The output gradients of domainstudio_grams: (N, N), (N, N) and one number.
inline void check_domainstudio_grads(const at::Tensor& grad_image, const at::Tensor& grad_hf,
                                     const at::Tensor& grad_sse, const at::Tensor& x, const char* op) {
  check_grad_gram(grad_image, x.size(0), x, op, "grad_image");
  check_grad_gram(grad_hf, x.size(0), x, op, "grad_hf");
  check_float(grad_sse, op, "grad_sse");
  TORCH_CHECK(grad_sse.numel() == 1, op, ": grad_sse must hold one number, got shape ", grad_sse.sizes());
}

// `t` has the shape, dtype and device of `x` (e.g. the target of a fused loss).
inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x, got ", t.sizes(),
              " and ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x, got ",
              t.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x, got ",
              t.device(), " and ", x.device());
}

// The optional target of a fused loss, checked against x, contiguous (undefined when absent).
inline at::Tensor target_of(const std::optional<at::Tensor>& target, const at::Tensor& x, const char* op) {
  if (!target.has_value() || !target->defined()) return {};
  check_image(*target, op, "target");
  check_like(*target, x, op, "target");
  return target->contiguous();
}

// The optional per-sample weights of the hf-MSE sum, checked against x (shape (N,), its device), as
// contiguous `acc` (no copy when they already are; undefined when absent).
inline at::Tensor sse_weights_of(const std::optional<at::Tensor>& sse_weights, const at::Tensor& x,
                                 at::ScalarType acc, const char* op) {
  if (!sse_weights.has_value() || !sse_weights->defined()) return {};
  const at::Tensor& w = *sse_weights;
  check_float(w, op, "sse_weights");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(0), op, ": sse_weights must have shape (N,) = (", x.size(0),
              ",), got ", w.sizes());
  TORCH_CHECK(w.device() == x.device(), op, ": sse_weights must be on the device of x, got ", w.device(), " and ",
              x.device());
  return w.to(acc).contiguous();
}

// Number of hf-map rows (of width w = W/2) per chunk for the hf_gram kernels: the N x L panel
// (L = rows * w) holds about `target_bytes`, at least one row, at most all rows.
inline int64_t rows_per_chunk(int64_t n, int64_t w, int64_t total_rows, int64_t elem_bytes,
                              int64_t target_bytes) {
  int64_t per_row = std::max<int64_t>(1, n * w * elem_bytes);
  int64_t rows = std::max<int64_t>(1, target_bytes / per_row);
  return std::min<int64_t>(rows, std::max<int64_t>(1, total_rows));
}

}  // namespace dsfast
