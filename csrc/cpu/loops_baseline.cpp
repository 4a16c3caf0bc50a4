// The baseline copy of the CPU loops (loops.h), compiled with the extension's portable flags (x86-64:
// SSE2); also the float16/bfloat16 loops of every ISA. See isa.h.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define DSFAST_CPU_ISA baseline
#define DSFAST_CPU_VECTOR_BYTES 16
#define DSFAST_CPU_VECTOR_REGISTERS 16
#include "loops.h"

namespace dsfast::cpu::baseline {
const LoopTable table = {make_loops<float>(), make_loops<double>()};
const Loops<c10::Half> f16 = make_loops<c10::Half>();
const Loops<c10::BFloat16> bf16 = make_loops<c10::BFloat16>();
}  // namespace dsfast::cpu::baseline
