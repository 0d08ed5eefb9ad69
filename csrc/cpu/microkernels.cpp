// Implementations of the micro-kernels declared in microkernels.h: portable loops, and AVX-512
// and AVX2+FMA intrinsics compiled with function-level target attributes and picked by a run-time
// CPU check, so one binary runs on any x86-64 (and the portable part on any other architecture).
#include "cpu/microkernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>

// -DSMOG_PORTABLE_ONLY builds the portable kernels only (as on other architectures).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SMOG_PORTABLE_ONLY)
#define SMOG_X86_KERNELS 1
#include <immintrin.h>
// GCC's _mm512_reduce_* helpers start from _mm512_undefined_ps(), which -Wall reports.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#else
#define SMOG_X86_KERNELS 0
#endif

namespace smog::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Portable loops (the compiler vectorises what it can).

void tile_scores_portable(const float* block, const float* panel, int64_t dp, float scale,
                          int64_t valid, float* out, int64_t ldo) {
  float acc[kMR][kNR] = {};
  for (int64_t d = 0; d < dp; ++d) {
    const float* a = block + d * kMR;
    const float* b = panel + d * kNR;
    for (int64_t r = 0; r < kMR; ++r)
      for (int64_t j = 0; j < kNR; ++j) acc[r][j] += a[r] * b[j];
  }
  for (int64_t r = 0; r < kMR; ++r)
    for (int64_t j = 0; j < kNR; ++j) out[r * ldo + j] = j < valid ? scale * acc[r][j] : kNegInf;
}

void tile_argmax_portable(const float* block, const float* panel, int64_t dp, int64_t k0,
                          int64_t valid, float* best, int32_t* arg) {
  float acc[kMR][kNR] = {};
  for (int64_t d = 0; d < dp; ++d) {
    const float* a = block + d * kMR;
    const float* b = panel + d * kNR;
    for (int64_t r = 0; r < kMR; ++r)
      for (int64_t j = 0; j < kNR; ++j) acc[r][j] += a[r] * b[j];
  }
  const int64_t lanes = std::min(valid, kNR);
  for (int64_t r = 0; r < kMR; ++r)
    for (int64_t j = 0; j < lanes; ++j)
      if (acc[r][j] > best[r * kNR + j]) {
        best[r * kNR + j] = acc[r][j];
        arg[r * kNR + j] = static_cast<int32_t>(k0 + j);
      }
}

void gemm_acc_portable(int64_t rows, int64_t inner, const float* a, int64_t lda, const float* b,
                       int64_t ldb, float* c, int64_t ldc, int64_t dp) {
  for (int64_t r = 0; r < rows; ++r) {
    float* cr = c + r * ldc;
    for (int64_t j = 0; j < inner; ++j) {
      const float w = a[r * lda + j];
      const float* bj = b + j * ldb;
      for (int64_t d = 0; d < dp; ++d) cr[d] += w * bj[d];
    }
  }
}

float max_of_portable(const float* v, int64_t n) {
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, v[i]);
  return m;
}

float exp_shift_sum_portable(float* v, int64_t n, float shift) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = std::exp(v[i] - shift);
    sum += v[i];
  }
  return sum;
}

void exp_columns_portable(float* v, int64_t n, const float* shift, const float* weight) {
  for (int64_t i = 0; i < n; ++i) v[i] = weight[i] * std::exp(v[i] - shift[i]);
}

const MicroKernels kPortable = {tile_scores_portable, tile_argmax_portable,   gemm_acc_portable,
                                max_of_portable,     exp_shift_sum_portable, exp_columns_portable,
                                "portable"};

// ---------------------------------------------------------------------------------------------
// AVX-512: a kMR x kNR block of scores lives in 2 * kMR = 28 zmm accumulators; each d-step
// loads two panel vectors and broadcasts kMR row values straight from the packed row block.
#if SMOG_X86_KERNELS
#define SMOG_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))

// acc0[r], acc1[r] = <a_r, b_{0..15}>, <a_r, b_{16..31}>
#define SMOG_TILE_DOT(block, panel, dp, acc0, acc1)                                  \
  __m512 acc0[kMR], acc1[kMR];                                                       \
  _Pragma("GCC unroll 14") for (int r = 0; r < kMR; ++r) {                           \
    acc0[r] = _mm512_setzero_ps();                                                   \
    acc1[r] = _mm512_setzero_ps();                                                   \
  }                                                                                  \
  for (int64_t d = 0; d < (dp); ++d) {                                               \
    const __m512 b0 = _mm512_loadu_ps((panel) + d * kNR);                            \
    const __m512 b1 = _mm512_loadu_ps((panel) + d * kNR + 16);                       \
    const float* a = (block) + d * kMR;                                              \
    _Pragma("GCC unroll 14") for (int r = 0; r < kMR; ++r) {                         \
      const __m512 ar = _mm512_set1_ps(a[r]);                                        \
      acc0[r] = _mm512_fmadd_ps(ar, b0, acc0[r]);                                    \
      acc1[r] = _mm512_fmadd_ps(ar, b1, acc1[r]);                                    \
    }                                                                                \
  }

SMOG_AVX512 inline __mmask16 lane_mask(int64_t valid) {
  return valid >= 16 ? __mmask16(0xFFFF) : valid <= 0 ? __mmask16(0) : __mmask16((1u << valid) - 1u);
}

SMOG_AVX512 void tile_scores_avx512(const float* block, const float* panel, int64_t dp, float scale,
                                    int64_t valid, float* out, int64_t ldo) {
  SMOG_TILE_DOT(block, panel, dp, acc0, acc1)
  const __m512 s = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(kNegInf);
  const __mmask16 m0 = lane_mask(valid), m1 = lane_mask(valid - 16);
#pragma GCC unroll 14
  for (int r = 0; r < kMR; ++r) {
    _mm512_storeu_ps(out + r * ldo, _mm512_mask_mul_ps(ninf, m0, acc0[r], s));
    _mm512_storeu_ps(out + r * ldo + 16, _mm512_mask_mul_ps(ninf, m1, acc1[r], s));
  }
}

SMOG_AVX512 void tile_argmax_avx512(const float* block, const float* panel, int64_t dp, int64_t k0,
                                    int64_t valid, float* best, int32_t* arg) {
  SMOG_TILE_DOT(block, panel, dp, acc0, acc1)
  const __m512i idx0 = _mm512_add_epi32(
      _mm512_set1_epi32(static_cast<int32_t>(k0)),
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(16));
  const __mmask16 m0 = lane_mask(valid), m1 = lane_mask(valid - 16);
#pragma GCC unroll 14
  for (int r = 0; r < kMR; ++r) {
    float* br = best + r * kNR;
    int32_t* ar = arg + r * kNR;
    const __m512 best0 = _mm512_loadu_ps(br), best1 = _mm512_loadu_ps(br + 16);
    const __mmask16 g0 = _mm512_mask_cmp_ps_mask(m0, acc0[r], best0, _CMP_GT_OQ);
    const __mmask16 g1 = _mm512_mask_cmp_ps_mask(m1, acc1[r], best1, _CMP_GT_OQ);
    _mm512_mask_storeu_ps(br, g0, acc0[r]);
    _mm512_mask_storeu_ps(br + 16, g1, acc1[r]);
    _mm512_mask_storeu_epi32(ar, g0, idx0);
    _mm512_mask_storeu_epi32(ar + 16, g1, idx1);
  }
}

// c[r][0:width] += sum_{j < inner} a[r][j] b[j][0:width] for R rows and width <= 64 columns,
// held as R x 4 vectors in registers.
template <int R>
SMOG_AVX512 void gemm_rows_avx512(int64_t inner, const float* a, int64_t lda, const float* b,
                                  int64_t ldb, float* c, int64_t ldc, int64_t width) {
  __mmask16 m[4];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) m[v] = lane_mask(width - 16 * v);
  __m512 acc[R][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_maskz_loadu_ps(m[v], c + r * ldc + 16 * v);
  for (int64_t j = 0; j < inner; ++j) {
    __m512 bv[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) bv[v] = _mm512_maskz_loadu_ps(m[v], b + j * ldb + 16 * v);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * lda + j]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, m[v], acc[r][v]);
}

// Blocks of kInner rows of b by 64 columns (28 KiB) stay in L1 while every 6-row block of a and
// c passes over them; the sum over j still runs in increasing order for every element.
SMOG_AVX512 void gemm_acc_avx512(int64_t rows, int64_t inner, const float* a, int64_t lda,
                                 const float* b, int64_t ldb, float* c, int64_t ldc, int64_t dp) {
  constexpr int64_t kRows = 6, kInner = 112;
  for (int64_t j0 = 0; j0 < inner; j0 += kInner) {
    const int64_t jn = std::min(kInner, inner - j0);
    for (int64_t c0 = 0; c0 < dp; c0 += 64) {
      const int64_t width = std::min<int64_t>(64, dp - c0);
      const float* bb = b + j0 * ldb + c0;
      int64_t r = 0;
      for (; r + kRows <= rows; r += kRows)
        gemm_rows_avx512<kRows>(jn, a + r * lda + j0, lda, bb, ldb, c + r * ldc + c0, ldc, width);
      const float* ar = a + r * lda + j0;
      float* cr = c + r * ldc + c0;
      switch (rows - r) {
        case 5: gemm_rows_avx512<5>(jn, ar, lda, bb, ldb, cr, ldc, width); break;
        case 4: gemm_rows_avx512<4>(jn, ar, lda, bb, ldb, cr, ldc, width); break;
        case 3: gemm_rows_avx512<3>(jn, ar, lda, bb, ldb, cr, ldc, width); break;
        case 2: gemm_rows_avx512<2>(jn, ar, lda, bb, ldb, cr, ldc, width); break;
        case 1: gemm_rows_avx512<1>(jn, ar, lda, bb, ldb, cr, ldc, width); break;
        default: break;
      }
    }
  }
}

// exp(x) = 2^n exp(r) with x = n ln2 + r, |r| <= ln2 / 2 (ln2 split into a high part exact in float
// and a low part), exp(r) by its degree-7 Taylor polynomial (relative error < 1e-7), Horner from the
// top coefficient; shared by the AVX-512 and AVX2 versions, which differ in how they make 2^n.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187045e-06f;
constexpr float kExpTaylor[8] = {1.f / 5040.f, 1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};

// exp(x) for 16 lanes, 2^n by scalef. Below -104 the result is 0; NaN stays NaN.
SMOG_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);  // max(c, NaN) returns the NaN operand
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTaylor[i]));
  return _mm512_scalef_ps(p, n);
}

SMOG_AVX512 float max_of_avx512(const float* v, int64_t n) {
  __m512 m = _mm512_set1_ps(kNegInf);
  for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, lane_mask(n - i), v + i));
  return _mm512_reduce_max_ps(m);
}

SMOG_AVX512 float exp_shift_sum_avx512(float* v, int64_t n, float shift) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lane_mask(n - i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, v + i), s));
    _mm512_mask_storeu_ps(v + i, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

SMOG_AVX512 void exp_columns_avx512(float* v, int64_t n, const float* shift, const float* weight) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lane_mask(n - i);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, v + i), _mm512_maskz_loadu_ps(m, shift + i));
    _mm512_mask_storeu_ps(v + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, weight + i), exp16(x)));
  }
}

const MicroKernels kAvx512 = {tile_scores_avx512, tile_argmax_avx512,   gemm_acc_avx512,
                              max_of_avx512,      exp_shift_sum_avx512, exp_columns_avx512,
                              "avx512"};

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA (16 ymm registers): the kMR x kNR tile is computed as four kMR x 8 column groups,
// 14 accumulators each; the second product uses 6 rows x 16 columns.
#define SMOG_AVX2 __attribute__((target("avx2,fma")))

// acc[r] = <a_r, b_{8g..8g+7}> for r < kMR
SMOG_AVX2 inline void group_dot_avx2(const float* block, const float* panel, int64_t dp, int g,
                                     __m256* acc) {
#pragma GCC unroll 14
  for (int r = 0; r < kMR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dp; ++d) {
    const __m256 b = _mm256_loadu_ps(panel + d * kNR + 8 * g);
    const float* a = block + d * kMR;
#pragma GCC unroll 14
    for (int r = 0; r < kMR; ++r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a[r]), b, acc[r]);
  }
}

// all-ones lanes where column 8g + lane < valid
SMOG_AVX2 inline __m256 valid_lanes_avx2(int64_t valid, int g) {
  const __m256i cols = _mm256_add_epi32(_mm256_set1_epi32(8 * g), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const int32_t v = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(valid, 0), kNR));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(v), cols));
}

SMOG_AVX2 void tile_scores_avx2(const float* block, const float* panel, int64_t dp, float scale,
                                int64_t valid, float* out, int64_t ldo) {
  const __m256 s = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(kNegInf);
  for (int g = 0; g < 4; ++g) {
    __m256 acc[kMR];
    group_dot_avx2(block, panel, dp, g, acc);
    const __m256 ok = valid_lanes_avx2(valid, g);
#pragma GCC unroll 14
    for (int r = 0; r < kMR; ++r)
      _mm256_storeu_ps(out + r * ldo + 8 * g, _mm256_blendv_ps(ninf, _mm256_mul_ps(acc[r], s), ok));
  }
}

SMOG_AVX2 void tile_argmax_avx2(const float* block, const float* panel, int64_t dp, int64_t k0,
                                int64_t valid, float* best, int32_t* arg) {
  for (int g = 0; g < 4; ++g) {
    __m256 acc[kMR];
    group_dot_avx2(block, panel, dp, g, acc);
    const __m256 ok = valid_lanes_avx2(valid, g);
    const __m256 idx = _mm256_castsi256_ps(_mm256_add_epi32(
        _mm256_set1_epi32(static_cast<int32_t>(k0 + 8 * g)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
#pragma GCC unroll 14
    for (int r = 0; r < kMR; ++r) {
      float* br = best + r * kNR + 8 * g;
      float* ar = reinterpret_cast<float*>(arg + r * kNR + 8 * g);
      const __m256 old = _mm256_loadu_ps(br);
      const __m256 gt = _mm256_and_ps(_mm256_cmp_ps(acc[r], old, _CMP_GT_OQ), ok);
      _mm256_storeu_ps(br, _mm256_blendv_ps(old, acc[r], gt));
      _mm256_storeu_ps(ar, _mm256_blendv_ps(_mm256_loadu_ps(ar), idx, gt));
    }
  }
}

// c[r][0:16] += sum_{j < inner} a[r][j] b[j][0:16] for R rows
template <int R>
SMOG_AVX2 void gemm_rows_avx2(int64_t inner, const float* a, int64_t lda, const float* b, int64_t ldb,
                              float* c, int64_t ldc) {
  __m256 acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm256_loadu_ps(c + r * ldc);
    acc[r][1] = _mm256_loadu_ps(c + r * ldc + 8);
  }
  for (int64_t j = 0; j < inner; ++j) {
    const __m256 b0 = _mm256_loadu_ps(b + j * ldb), b1 = _mm256_loadu_ps(b + j * ldb + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_set1_ps(a[r * lda + j]);
      acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

SMOG_AVX2 void gemm_acc_avx2(int64_t rows, int64_t inner, const float* a, int64_t lda, const float* b,
                             int64_t ldb, float* c, int64_t ldc, int64_t dp) {
  constexpr int64_t kRows = 6, kInner = 224;
  for (int64_t j0 = 0; j0 < inner; j0 += kInner) {
    const int64_t jn = std::min(kInner, inner - j0);
    for (int64_t c0 = 0; c0 < dp; c0 += 16) {
      const float* bb = b + j0 * ldb + c0;
      int64_t r = 0;
      for (; r + kRows <= rows; r += kRows)
        gemm_rows_avx2<kRows>(jn, a + r * lda + j0, lda, bb, ldb, c + r * ldc + c0, ldc);
      const float* ar = a + r * lda + j0;
      float* cr = c + r * ldc + c0;
      switch (rows - r) {
        case 5: gemm_rows_avx2<5>(jn, ar, lda, bb, ldb, cr, ldc); break;
        case 4: gemm_rows_avx2<4>(jn, ar, lda, bb, ldb, cr, ldc); break;
        case 3: gemm_rows_avx2<3>(jn, ar, lda, bb, ldb, cr, ldc); break;
        case 2: gemm_rows_avx2<2>(jn, ar, lda, bb, ldb, cr, ldc); break;
        case 1: gemm_rows_avx2<1>(jn, ar, lda, bb, ldb, cr, ldc); break;
        default: break;
      }
    }
  }
}

// exp(x) for 8 lanes, 2^n built in the exponent bits: x is clamped to [-87.3, 88.7] (results
// below 2^-126 are not flushed to 0, which no softmax sum notices).
SMOG_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);  // max/min(c, NaN) return the NaN operand
  x = _mm256_min_ps(_mm256_set1_ps(88.7f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[i]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

SMOG_AVX2 float max_of_avx2(const float* v, int64_t n) {
  __m256 m = _mm256_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(v + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float top = kNegInf;
  for (float l : lanes) top = std::max(top, l);
  for (; i < n; ++i) top = std::max(top, v[i]);
  return top;
}

SMOG_AVX2 float exp_shift_sum_avx2(float* v, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), s));
    _mm256_storeu_ps(v + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float total = 0.f;
  for (float l : lanes) total += l;
  for (; i < n; ++i) total += (v[i] = std::exp(v[i] - shift));
  return total;
}

SMOG_AVX2 void exp_columns_avx2(float* v, int64_t n, const float* shift, const float* weight) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(v + i), _mm256_loadu_ps(shift + i));
    _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), exp8(x)));
  }
  for (; i < n; ++i) v[i] = weight[i] * std::exp(v[i] - shift[i]);
}

const MicroKernels kAvx2 = {tile_scores_avx2, tile_argmax_avx2,   gemm_acc_avx2,
                            max_of_avx2,      exp_shift_sum_avx2, exp_columns_avx2,
                            "avx2"};

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif  // SMOG_X86_KERNELS

const MicroKernels& choose() {
  const char* force = std::getenv("SMOG_CPU_KERNELS");
  const std::string want = force == nullptr ? "" : force;
  if (want == "portable") return kPortable;
#if SMOG_X86_KERNELS
  if (want != "avx2" && cpu_has_avx512()) return kAvx512;
  if (cpu_has_avx2()) return kAvx2;
#endif
  return kPortable;
}

}  // namespace

const MicroKernels& micro_kernels() {
  static const MicroKernels& chosen = choose();
  return chosen;
}

}  // namespace smog::cpu
