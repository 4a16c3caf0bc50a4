// The per-device kernels' signatures, declared once and included inside the namespace of each
// device's ops.h (dsfast::cpu, dsfast::cuda): the two implement the same contract (docs/KERNELS.md).
// No include guard or pragma once on purpose: it is included once per namespace.

at::Tensor haar_dwt2(const at::Tensor& x);
at::Tensor haar_idwt2(const at::Tensor& bands);
at::Tensor high_frequency(const at::Tensor& x, c10::ArrayRef<double> weights);
at::Tensor high_frequency_backward(const at::Tensor& grad, c10::ArrayRef<double> weights);
at::Tensor hf_gram(const at::Tensor& x, c10::ArrayRef<double> weights);
at::Tensor hf_gram_backward(const at::Tensor& grad_gram, const at::Tensor& x,
                            c10::ArrayRef<double> weights);
// sse_weights: optional per-sample weights (N,) of the hf-MSE sum (absent: all ones).
std::tuple<at::Tensor, at::Tensor, at::Tensor> domainstudio_grams(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& target,
                                                                  c10::ArrayRef<double> weights,
                                                                  const std::optional<at::Tensor>& sse_weights);
at::Tensor domainstudio_grams_backward(const at::Tensor& grad_image, const at::Tensor& grad_hf,
                                       const at::Tensor& grad_sse, const at::Tensor& x,
                                       const std::optional<at::Tensor>& target,
                                       c10::ArrayRef<double> weights,
                                       const std::optional<at::Tensor>& sse_weights);
