// CUDA implementations of the dsfast kernels (docs/KERNELS.md), defined in csrc/cuda/*.cu and
// registered in csrc/cuda/bindings.cpp. Kept free of CUDA headers so host code can include it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace dsfast::cuda {

at::Tensor haar_dwt2(const at::Tensor& x);
at::Tensor haar_idwt2(const at::Tensor& bands);
at::Tensor high_frequency(const at::Tensor& x, c10::ArrayRef<double> weights);
at::Tensor high_frequency_backward(const at::Tensor& grad, c10::ArrayRef<double> weights);
at::Tensor hf_gram(const at::Tensor& x, c10::ArrayRef<double> weights);
at::Tensor hf_gram_backward(const at::Tensor& grad_gram, const at::Tensor& x,
                            c10::ArrayRef<double> weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> domainstudio_grams(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& target,
                                                                  c10::ArrayRef<double> weights);
at::Tensor domainstudio_grams_backward(const at::Tensor& grad_image, const at::Tensor& grad_hf,
                                       const at::Tensor& grad_sse, const at::Tensor& x,
                                       const std::optional<at::Tensor>& target,
                                       c10::ArrayRef<double> weights);

}  // namespace dsfast::cuda
