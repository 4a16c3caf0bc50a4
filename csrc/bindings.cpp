// dsfast._C: registers the dsfast kernels (docs/KERNELS.md) as torch.ops.dsfast.<name>.
// The schemas are defined here once; this file registers the CPU implementations, and
// csrc/cuda/bindings.cpp registers the CUDA ones when the extension is built with CUDA. Importing dsfast._C (an otherwise empty Python module) runs the registrations.
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(dsfast, m) {
  m.def("haar_dwt2(Tensor x) -> Tensor");
  m.def("haar_idwt2(Tensor bands) -> Tensor");
  m.def("high_frequency(Tensor x, float[] weights) -> Tensor");
  m.def("high_frequency_backward(Tensor grad, float[] weights) -> Tensor");
  m.def("gram(Tensor x) -> Tensor");
  m.def("gram_backward(Tensor grad_gram, Tensor x) -> Tensor");
  m.def("hf_gram(Tensor x, float[] weights) -> Tensor");
  m.def("hf_gram_backward(Tensor grad_gram, Tensor x, float[] weights) -> Tensor");
  // sse_weights: per-sample weights (N,) of the hf-MSE sum, None = all ones.
  m.def("domainstudio_grams(Tensor x, Tensor? target, float[] weights, Tensor? sse_weights=None) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("domainstudio_grams_backward(Tensor grad_image, Tensor grad_hf, Tensor grad_sse, Tensor x, "
        "Tensor? target, float[] weights, Tensor? sse_weights=None) -> Tensor");
  // Which copy of the CPU loops runs (csrc/cpu/isa.h), and two hooks for its tests.
  m.def("cpu_isa() -> str", &dsfast::cpu::cpu_isa);
  m.def("_set_cpu_isa(str isa) -> str", &dsfast::cpu::set_cpu_isa);
  m.def("_check_cpu_isa(str requested, str supported) -> str", &dsfast::cpu::check_cpu_isa);
}

TORCH_LIBRARY_IMPL(dsfast, CPU, m) {
  m.impl("haar_dwt2", &dsfast::cpu::haar_dwt2);
  m.impl("haar_idwt2", &dsfast::cpu::haar_idwt2);
  m.impl("high_frequency", &dsfast::cpu::high_frequency);
  m.impl("high_frequency_backward", &dsfast::cpu::high_frequency_backward);
  m.impl("gram", &dsfast::gram);
  m.impl("gram_backward", &dsfast::gram_backward);
  m.impl("hf_gram", &dsfast::cpu::hf_gram);
  m.impl("hf_gram_backward", &dsfast::cpu::hf_gram_backward);
  m.impl("domainstudio_grams", &dsfast::cpu::domainstudio_grams);
  m.impl("domainstudio_grams_backward", &dsfast::cpu::domainstudio_grams_backward);
}

// A Python extension module with no functions: `import dsfast._C` loads the shared library,
// which runs the static registrations above.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "dsfast kernels, registered as torch.ops.dsfast.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
