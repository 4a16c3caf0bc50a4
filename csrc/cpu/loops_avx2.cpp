// The AVX2 + FMA copy of the CPU loops (loops.h); run only where isa.cpp found AVX2, FMA and the OS
// saving the YMM registers. The build has one set of flags for all sources (setuptools,
// torch.utils.cpp_extension), so this file sets its own code generation before any include: the same
// as compiling it with -mavx2 -mfma. It must include nothing but loops.h (see isa.h).
#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif

#define DSFAST_CPU_ISA avx2
#define DSFAST_CPU_VECTOR_BYTES 32
#define DSFAST_CPU_VECTOR_REGISTERS 16
#include "loops.h"

namespace dsfast::cpu::avx2 {
const LoopTable table = {make_loops<float>(), make_loops<double>()};
}  // namespace dsfast::cpu::avx2

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
