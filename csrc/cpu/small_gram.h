// The two small-N products the fused CPU ops run per cache-resident panel of a batch (n rows):
// G += A A^T (forward) and Out = M A (backward). BLAS handles n = 16 poorly (it packs its operands
// per call and, for the Gram, computes both triangles); these keep 4 x 4 blocks of accumulators in
// registers and read the strided rows in place; the Gram computes its upper triangle only.
// float32 uses AVX-512 when the CPU has it (chosen at run time: the extension is built for the
// baseline ISA); the portable loop (auto-vectorised) covers everything else.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define DSFAST_X86_AVX512 1
#endif

namespace dsfast::cpu {

namespace small_gram_detail {

constexpr int64_t kColumnBlock = 1024;  // columns of the 4 + 4 rows of a block pair: 32 KB (fp32) in L1

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
  const T out[16] = {s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33};
  std::copy(out, out + 16, s);
}

#ifdef DSFAST_X86_AVX512
__attribute__((target("avx512f"))) inline void block44_avx512(const float* const* r, const float* const* c,
                                                               int64_t len, float* s) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 m = len - k >= 16 ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << (len - k)) - 1);
    __m512 a[4], b[4];
    for (int q = 0; q < 4; ++q) {
      a[q] = _mm512_maskz_loadu_ps(m, r[q] + k);
      b[q] = _mm512_maskz_loadu_ps(m, c[q] + k);
    }
    for (int p = 0; p < 4; ++p) {
      for (int q = 0; q < 4; ++q) acc[p * 4 + q] = _mm512_fmadd_ps(a[p], b[q], acc[p * 4 + q]);
    }
  }
  for (int i = 0; i < 16; ++i) s[i] = _mm512_reduce_add_ps(acc[i]);
}

// out[p][k0 + k] = sum_j m[p][j] * a[j][k0 + k] for the 4 rows p of m (row stride ldm), k < 64.
__attribute__((target("avx512f"))) inline void rows4_times_avx512(const float* const* m, const float* a,
                                                                   int64_t lda, int64_t n, int64_t k0,
                                                                   int64_t len, float* const* out) {
  __mmask16 mask[4];
  for (int q = 0; q < 4; ++q) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, len - k0 - 16 * q));
    mask[q] = static_cast<__mmask16>((1u << left) - 1);
  }
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 x[4];
    for (int q = 0; q < 4; ++q) x[q] = _mm512_maskz_loadu_ps(mask[q], a + j * lda + k0 + 16 * q);
    for (int p = 0; p < 4; ++p) {
      const __m512 mv = _mm512_set1_ps(m[p][j]);
      for (int q = 0; q < 4; ++q) acc[p * 4 + q] = _mm512_fmadd_ps(mv, x[q], acc[p * 4 + q]);
    }
  }
  for (int p = 0; p < 4; ++p) {
    if (out[p] == nullptr) continue;
    for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(out[p] + k0 + 16 * q, mask[q], acc[p * 4 + q]);
  }
}

inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}
#endif

template <typename T>
inline void block44_best(const T* const* r, const T* const* c, int64_t len, T* s) {
#ifdef DSFAST_X86_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) return block44_avx512(r, c, len, s);
  }
#endif
  block44(r, c, len, s);
}

}  // namespace small_gram_detail

// Upper triangle (i <= j) of g (n x n, row-major) += a a^T over columns [0, len) of the n rows
// a + i * lda. The lower triangle is left alone (see mirror_upper).
template <typename T>
void gram_update_upper(const T* a, int64_t lda, int64_t n, int64_t len, T* g) {
  using namespace small_gram_detail;
  for (int64_t k0 = 0; k0 < len; k0 += kColumnBlock) {
    const int64_t kl = std::min(kColumnBlock, len - k0);
    for (int64_t ib = 0; ib < n; ib += 4) {
      for (int64_t jb = ib; jb < n; jb += 4) {
        const T* r[4];
        const T* c[4];
        for (int q = 0; q < 4; ++q) {  // rows past n repeat row n - 1; their sums are dropped
          r[q] = a + std::min(ib + q, n - 1) * lda + k0;
          c[q] = a + std::min(jb + q, n - 1) * lda + k0;
        }
        T s[16];
        block44_best(r, c, kl, s);
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

// out (n x len, row stride ldo) = m (n x n, row-major) @ a (n x len, row stride lda).
template <typename T>
void small_mm(const T* m, const T* a, int64_t lda, int64_t n, int64_t len, T* out, int64_t ldo) {
  using namespace small_gram_detail;
#ifdef DSFAST_X86_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) {
      for (int64_t k0 = 0; k0 < len; k0 += 64) {  // the n x 64 block of a stays in L1
        for (int64_t ib = 0; ib < n; ib += 4) {
          const T* mr[4];
          T* orow[4];
          for (int p = 0; p < 4; ++p) {  // rows past n reuse row n - 1 and are not stored
            mr[p] = m + std::min(ib + p, n - 1) * n;
            orow[p] = ib + p < n ? out + (ib + p) * ldo : nullptr;
          }
          rows4_times_avx512(mr, a, lda, n, k0, len, orow);
        }
      }
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    T* o = out + i * ldo;
    std::fill(o, o + len, T(0));
    for (int64_t j = 0; j < n; ++j) {
      const T mij = m[i * n + j];
      const T* aj = a + j * lda;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) o[k] += mij * aj[k];
    }
  }
}

// g[j][i] = g[i][j] for i < j.
template <typename T>
void mirror_upper(T* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i + 1; j < n; ++j) g[j * n + i] = g[i * n + j];
  }
}

}  // namespace dsfast::cpu
