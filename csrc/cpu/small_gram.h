// The two small-N products the fused CPU ops run per cache-resident panel of a batch (n rows):
// G += A A^T (forward) and Out = M A (backward). BLAS handles n = 16 poorly (it packs its operands
// per call and, for the Gram, computes both triangles); these keep blocks of accumulators in
// registers and read the strided rows in place; the Gram computes its upper triangle only.
// Part of the per-ISA loop source (loops.h): plain loops for the auto-vectoriser, compiled once per ISA.
#pragma once

#include <cstdint>

#ifndef DSFAST_CPU_ISA
#error "small_gram.h is part of the per-ISA loop source: include it from a loops_<isa>.cpp (see isa.h)"
#endif

namespace dsfast::cpu::DSFAST_CPU_ISA {

namespace small_gram_detail {

constexpr int64_t kColumnBlock = 1024;  // columns of the 4 + 4 rows of a block pair: 32 KB (fp32) in L1

// This copy's vector registers (set by the per-ISA file): AVX-512 32 x 64 bytes, AVX2 16 x 32, SSE2 16 x 16.
constexpr int64_t kVectorBytes = DSFAST_CPU_VECTOR_BYTES, kVectorRegisters = DSFAST_CPU_VECTOR_REGISTERS;
// Columns of a small_mm block: its 4 rows of sums fill half the vector registers (AVX-512 float: 4 x 64).
template <typename T>
constexpr int64_t kMmColumns = kVectorRegisters / 8 * kVectorBytes / static_cast<int64_t>(sizeof(T));

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// s[p * 4 + q] = sum_k r[p][k] * c[q][k]
template <typename T>
inline void block44(const T* const* r, const T* const* c, int64_t len, T* s) {
  const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *c0 = c[0], *c1 = c[1], *c2 = c[2], *c3 = c[3];
  T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  T s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t k = 0; k < len; ++k) {
    const T a0 = r0[k], a1 = r1[k], a2 = r2[k], a3 = r3[k], b0 = c0[k], b1 = c1[k], b2 = c2[k], b3 = c3[k];
    s00 += a0 * b0; s01 += a0 * b1; s02 += a0 * b2; s03 += a0 * b3;
    s10 += a1 * b0; s11 += a1 * b1; s12 += a1 * b2; s13 += a1 * b3;
    s20 += a2 * b0; s21 += a2 * b1; s22 += a2 * b2; s23 += a2 * b3;
    s30 += a3 * b0; s31 += a3 * b1; s32 += a3 * b2; s33 += a3 * b3;
  }
  s[0] = s00; s[1] = s01; s[2] = s02; s[3] = s03; s[4] = s10; s[5] = s11; s[6] = s12; s[7] = s13;
  s[8] = s20; s[9] = s21; s[10] = s22; s[11] = s23; s[12] = s30; s[13] = s31; s[14] = s32; s[15] = s33;
}

}  // namespace small_gram_detail

// Upper triangle (i <= j) of g (n x n, row-major) += a a^T over columns [0, len) of the n rows
// a + i * lda. The lower triangle is left alone (the caller mirrors it).
template <typename T>
void gram_update_upper(const T* a, int64_t lda, int64_t n, int64_t len, T* g) {
  using namespace small_gram_detail;
  for (int64_t k0 = 0; k0 < len; k0 += kColumnBlock) {
    const int64_t kl = min64(kColumnBlock, len - k0);
    for (int64_t ib = 0; ib < n; ib += 4) {
      for (int64_t jb = ib; jb < n; jb += 4) {
        const T* r[4];
        const T* c[4];
        for (int q = 0; q < 4; ++q) {  // rows past n repeat row n - 1; their sums are dropped
          r[q] = a + min64(ib + q, n - 1) * lda + k0;
          c[q] = a + min64(jb + q, n - 1) * lda + k0;
        }
        T s[16];
        block44(r, c, kl, s);
        for (int p = 0; p < 4; ++p) {
          for (int q = 0; q < 4; ++q) {
            const int64_t i = ib + p, j = jb + q;
            if (i < n && j < n && i <= j) g[i * n + j] += s[p * 4 + q];
          }
        }
      }
    }
  }
}

// o[p][k] = sum_j m[p][j] * a[j][k] for the 4 rows p, over the n rows j of a and the kl <= kMmColumns
// columns k. Full blocks (kl == kMmColumns<T>, a constant trip count) keep their sums in vector registers.
template <typename T, bool full>
inline void rows4_times(const T* const* m, const T* a, int64_t lda, int64_t n, int64_t kl, T* const* o) {
  constexpr int64_t kc = small_gram_detail::kMmColumns<T>;
  const int64_t cols = full ? kc : kl;
  T acc[4][kc] = {};
  for (int64_t j = 0; j < n; ++j) {
    const T* aj = a + j * lda;
    const T m0 = m[0][j], m1 = m[1][j], m2 = m[2][j], m3 = m[3][j];
#pragma omp simd
    for (int64_t k = 0; k < cols; ++k) {
      const T v = aj[k];
      acc[0][k] += m0 * v;
      acc[1][k] += m1 * v;
      acc[2][k] += m2 * v;
      acc[3][k] += m3 * v;
    }
  }
  for (int p = 0; p < 4; ++p) {
    if (o[p] == nullptr) continue;
    for (int64_t k = 0; k < cols; ++k) o[p][k] = acc[p][k];
  }
}

// out (n x len, row stride ldo) = m (n x n, row-major) @ a (n x len, row stride lda), in blocks of
// 4 output rows x kMmColumns<T> columns (see rows4_times).
template <typename T>
void small_mm(const T* m, const T* a, int64_t lda, int64_t n, int64_t len, T* out, int64_t ldo) {
  using namespace small_gram_detail;
  constexpr int64_t kc = kMmColumns<T>;
  for (int64_t k0 = 0; k0 < len; k0 += kc) {
    const int64_t kl = min64(kc, len - k0);
    for (int64_t ib = 0; ib < n; ib += 4) {
      const T* mr[4];
      T* o[4];
      for (int p = 0; p < 4; ++p) {  // rows past n repeat row n - 1 and are not stored
        mr[p] = m + min64(ib + p, n - 1) * n;
        o[p] = ib + p < n ? out + (ib + p) * ldo + k0 : nullptr;
      }
      if (kl == kc) {
        rows4_times<T, true>(mr, a + k0, lda, n, kl, o);
      } else {
        rows4_times<T, false>(mr, a + k0, lda, n, kl, o);
      }
    }
  }
}

}  // namespace dsfast::cpu::DSFAST_CPU_ISA
