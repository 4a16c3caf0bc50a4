// CPU implementations of the dsfast kernels (docs/KERNELS.md), registered in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace dsfast::cpu {

#include "../kernel_ops.h"

}  // namespace dsfast::cpu

namespace dsfast {
// Device-generic (ATen GEMMs), registered for CPU and CUDA: csrc/cpu/pairwise_similarity_kl.cpp.
at::Tensor gram(const at::Tensor& x);
at::Tensor gram_backward(const at::Tensor& grad_gram, const at::Tensor& x);
}  // namespace dsfast
