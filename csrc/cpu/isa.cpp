// Which copy of the CPU loops runs (isa.h): the widest ISA that both the CPU (cpuid) and the OS (xgetbv:
// it saves the wider registers on context switches) support, unless DSFAST_CPU_ISA names one. Baseline
// code: it runs before anything is known about the CPU.
#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "ops.h"

namespace dsfast::cpu {

namespace {

constexpr const char* kNames[] = {"baseline", "avx2", "avx512"};
constexpr const char* kNeeds[] = {"", "AVX2 and FMA", "AVX-512 (AVX512F)"};

#if defined(__x86_64__)
// XCR0: the register states the OS saves and restores.
uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t{hi} << 32) | lo;
}

Isa detect() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::baseline;
  const bool fma = c & bit_FMA, osxsave = c & bit_OSXSAVE, avx = c & bit_AVX;
  if (!(avx && osxsave)) return Isa::baseline;
  const uint64_t xcr = xcr0();
  if ((xcr & 0x6) != 0x6) return Isa::baseline;  // XMM and YMM state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::baseline;
  if (!(fma && (b & bit_AVX2))) return Isa::baseline;
  if ((b & bit_AVX512F) && (xcr & 0xe6) == 0xe6) return Isa::avx512;  // + opmask, ZMM0-15 high, ZMM16-31
  return Isa::avx2;
}
#else
Isa detect() { return Isa::baseline; }
#endif

Isa best() {
  static const Isa isa = detect();
  return isa;
}

// `requested` as an Isa that `supported` (the best the CPU has) covers; `what` names the setting in errors.
Isa parse(const std::string& requested, Isa supported, const char* what) {
  std::string choices;
  for (int i = 0; i <= static_cast<int>(supported); ++i) choices += std::string(i ? ", " : "") + kNames[i];
  for (int i = 0; i < 3; ++i) {
    if (requested != kNames[i]) continue;
    TORCH_CHECK(i <= static_cast<int>(supported), what, "=", requested, ": this CPU (or its OS) lacks ",
                kNeeds[i], "; it runs ", choices);
    return static_cast<Isa>(i);
  }
  TORCH_CHECK(false, what, "='", requested, "' is not one of baseline, avx2, avx512 (unset: the best this CPU ",
              "runs, ", kNames[static_cast<int>(supported)], ")");
}

std::atomic<int> active{-1};  // the chosen Isa, -1 until the first call

const LoopTable& table(Isa isa) {
  switch (isa) {
#if defined(__x86_64__)
    case Isa::avx512:
      return avx512::table;
    case Isa::avx2:
      return avx2::table;
#endif
    default:
      return baseline::table;
  }
}

}  // namespace

Isa active_isa() {
  int isa = active.load(std::memory_order_relaxed);
  if (isa < 0) {
    const char* env = std::getenv("DSFAST_CPU_ISA");
    isa = static_cast<int>(env != nullptr && *env != '\0' ? parse(env, best(), "DSFAST_CPU_ISA") : best());
    active.store(isa, std::memory_order_relaxed);
  }
  return static_cast<Isa>(isa);
}

template <>
const Loops<float>& loops<float>() {
  return table(active_isa()).f32;
}
template <>
const Loops<double>& loops<double>() {
  return table(active_isa()).f64;
}
template <>
const Loops<c10::Half>& loops<c10::Half>() {
  return baseline::f16;
}
template <>
const Loops<c10::BFloat16>& loops<c10::BFloat16>() {
  return baseline::bf16;
}

std::string cpu_isa() { return kNames[static_cast<int>(active_isa())]; }

std::string set_cpu_isa(const std::string& isa) {
  const std::string before = cpu_isa();
  active.store(static_cast<int>(parse(isa, best(), "set_cpu_isa")), std::memory_order_relaxed);
  return before;
}

std::string check_cpu_isa(const std::string& requested, const std::string& supported) {
  return kNames[static_cast<int>(parse(requested, parse(supported, Isa::avx512, "supported"), "DSFAST_CPU_ISA"))];
}

}  // namespace dsfast::cpu
