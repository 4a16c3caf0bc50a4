// Run-time choice of the CPU loops by instruction set, the way ATen's DispatchStub does it: loops.h is
// compiled once per ISA (loops_baseline.cpp, loops_avx2.cpp, loops_avx512.cpp, each with that ISA's code
// generation flags) into the namespaces dsfast::cpu::baseline, ::avx2 and ::avx512, and the op drivers
// (haar_dwt2.cpp, ...) call the copy that loops<scalar_t>() returns: the widest ISA that the CPU and the OS
// support (cpuid + xgetbv, isa.cpp), or the one DSFAST_CPU_ISA=baseline|avx2|avx512 names (refused when the
// CPU lacks it). float16/bfloat16 always run the baseline copy (their conversions are c10's inline code,
// which must not be compiled with wider-ISA flags; see below).
//
// The per-ISA files include this header, so it holds declarations and plain types only: an inline
// function (or a template instantiation) outside the per-ISA namespace that one of those files emitted
// could be the copy the linker keeps for every caller, and would then run AVX code on any CPU.
#pragma once

#include <cstdint>

namespace c10 {
struct Half;
struct BFloat16;
}  // namespace c10

namespace dsfast::cpu {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

// Accumulation type: float64 stays float64, everything else computes in float32.
template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// hf rows [r0, r0 + nr) of every sample of a contiguous (N, C, H, W) batch (panel.h): sample n starts at
// n * sample, hf row r reads image rows 2r and 2r+1, i.e. 4 * w elements from offset r * 4 * w. The
// buffers of a chunk hold one row per sample: ldx apart for its image rows, ldp for its hf values.
struct PanelGeometry {
  int64_t n, sample, w, r0, nr, ldx, ldp;
};

// The loops of one ISA for inputs of type scalar_t (see loops.h for what each computes).
template <typename scalar_t>
struct Loops {
  using acc_t = typename AccOf<scalar_t>::type;
  void (*dwt_rows)(const scalar_t* x, scalar_t* bands, int64_t begin, int64_t end, int64_t w, int64_t plane);
  void (*idwt_rows)(const scalar_t* bands, scalar_t* x, int64_t begin, int64_t end, int64_t w, int64_t plane);
  void (*hf_rows)(const scalar_t* x, scalar_t* map, int64_t begin, int64_t end, int64_t w, const acc_t* wt);
  void (*hf_rows_backward)(const scalar_t* grad, scalar_t* grad_x, int64_t begin, int64_t end, int64_t w,
                           const acc_t* wt);
  void (*hf_panel)(const scalar_t* x, acc_t* panel, const PanelGeometry& g, const acc_t* wt);
  void (*hf_panel_backward)(const acc_t* q, scalar_t* grad_x, const PanelGeometry& g, const acc_t* wt);
  double (*grams_chunk)(const scalar_t* x, const scalar_t* target, const PanelGeometry& g, const acc_t* wt,
                        const double* sse_w, acc_t* xbuf, acc_t* panel, acc_t* gram_image, acc_t* gram_hf);
  void (*grams_backward_chunk)(const scalar_t* x, const scalar_t* target, const PanelGeometry& g,
                               const acc_t* wt, acc_t s, const double* sse_w, const acc_t* m_image,
                               const acc_t* m_hf, acc_t* xbuf, acc_t* panel, acc_t* y, acc_t* q, scalar_t* grad_x);
};

struct LoopTable {
  Loops<float> f32;
  Loops<double> f64;
};

namespace baseline {
extern const LoopTable table;
extern const Loops<c10::Half> f16;
extern const Loops<c10::BFloat16> bf16;
}  // namespace baseline
#if defined(__x86_64__)
namespace avx2 {
extern const LoopTable table;
}  // namespace avx2
namespace avx512 {
extern const LoopTable table;
}  // namespace avx512
#endif

// The ISA whose loops run: chosen once, at the first call (DSFAST_CPU_ISA, or the best supported).
Isa active_isa();

// The active ISA's loops (float16/bfloat16: the baseline's).
template <typename scalar_t>
const Loops<scalar_t>& loops();
template <>
const Loops<float>& loops<float>();
template <>
const Loops<double>& loops<double>();
template <>
const Loops<c10::Half>& loops<c10::Half>();
template <>
const Loops<c10::BFloat16>& loops<c10::BFloat16>();

}  // namespace dsfast::cpu
