// CPU implementations of the dsfast kernels (docs/KERNELS.md), registered in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>
#include <tuple>

namespace dsfast::cpu {

#include "../kernel_ops.h"

// The copy of the CPU loops that runs (isa.cpp): "baseline", "avx2" or "avx512".
std::string cpu_isa();
// For tests: switch to another copy (refused as DSFAST_CPU_ISA is when the CPU lacks it); returns the previous.
std::string set_cpu_isa(const std::string& isa);
// For tests: the ISA that DSFAST_CPU_ISA=requested gives on a CPU whose best is `supported` (or the error).
std::string check_cpu_isa(const std::string& requested, const std::string& supported);

}  // namespace dsfast::cpu

namespace dsfast {
// Device-generic (ATen GEMMs), registered for CPU and CUDA: csrc/cpu/pairwise_similarity_kl.cpp.
at::Tensor gram(const at::Tensor& x);
at::Tensor gram_backward(const at::Tensor& grad_gram, const at::Tensor& x);
}  // namespace dsfast
