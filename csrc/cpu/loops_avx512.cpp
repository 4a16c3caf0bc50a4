// The AVX-512 copy of the CPU loops (loops.h); run only where isa.cpp found AVX2, FMA, AVX512F and the OS
// saving the ZMM and mask registers. The build has one set of flags for all sources (setuptools,
// torch.utils.cpp_extension), so this file sets its own code generation before any include: the same
// as compiling it with -mavx2 -mfma -mavx512f. It must include nothing but loops.h (see isa.h).
#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,avx512f")
#endif

#define DSFAST_CPU_ISA avx512
#define DSFAST_CPU_VECTOR_BYTES 64
#define DSFAST_CPU_VECTOR_REGISTERS 32
#include "loops.h"

namespace dsfast::cpu::avx512 {
const LoopTable table = {make_loops<float>(), make_loops<double>()};
}  // namespace dsfast::cpu::avx512

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
