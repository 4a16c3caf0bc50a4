// CUDA implementations of the dsfast kernels (docs/KERNELS.md), defined in csrc/cuda/*.cu and
// registered in csrc/cuda/bindings.cpp. Kept free of CUDA headers so host code can include it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace dsfast::cuda {

#include "../kernel_ops.h"

}  // namespace dsfast::cuda
