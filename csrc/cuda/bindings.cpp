// Registers the CUDA implementations of the dsfast ops (schemas: csrc/bindings.cpp). Compiled by
// the host compiler, and only into CUDA builds of dsfast._C; the kernels live in csrc/cuda/*.cu,
// which stay free of torch/library.h (nvcc compiles them much faster that way).
#include <torch/library.h>

#include "../cpu/ops.h"  // the device-generic gram
#include "ops.h"

TORCH_LIBRARY_IMPL(dsfast, CUDA, m) {
  m.impl("haar_dwt2", &dsfast::cuda::haar_dwt2);
  m.impl("haar_idwt2", &dsfast::cuda::haar_idwt2);
  m.impl("high_frequency", &dsfast::cuda::high_frequency);
  m.impl("high_frequency_backward", &dsfast::cuda::high_frequency_backward);
  m.impl("gram", &dsfast::gram);
  m.impl("gram_backward", &dsfast::gram_backward);
  m.impl("hf_gram", &dsfast::cuda::hf_gram);
  m.impl("hf_gram_backward", &dsfast::cuda::hf_gram_backward);
  m.impl("domainstudio_grams", &dsfast::cuda::domainstudio_grams);
  m.impl("domainstudio_grams_backward", &dsfast::cuda::domainstudio_grams_backward);
}
