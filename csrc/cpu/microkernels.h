// Register-blocked float32 micro-kernels shared by the fused CPU ops (csrc/cpu/ops_cpu.cpp).
//
// Operands are float32 buffers prepared by the ops: feature rows padded with zeros to a width
// dp that is a multiple of 16, then packed in blocks of rows transposed to [dp][rows] so that
// one d-step reads consecutive floats: "row blocks" of kMR rows and "panels" of kNR rows. Three
// implementations exist: AVX-512 intrinsics (chosen at run time when the CPU has AVX-512), AVX2 +
// FMA intrinsics (x86-64 CPUs without AVX-512) and portable loops for every other CPU.
#pragma once

#include <cstdint>

namespace smog::cpu {

constexpr int64_t kMR = 14;  // rows of a register block
constexpr int64_t kNR = 32;  // rows of a panel (two 16-float vectors)

struct MicroKernels {
  // out[r * ldo + j] = scale * <a_r, b_j> for r < kMR, j < kNR; columns j >= valid get -inf.
  // block: a row block [dp][kMR]; panel: [dp][kNR].
  void (*tile_scores)(const float* block, const float* panel, int64_t dp, float scale,
                      int64_t valid, float* out, int64_t ldo);
  // Running (max, argmax) per row r < kMR and lane j < kNR: where <a_r, b_j> >
  // best[r * kNR + j] (strictly, so an earlier index keeps a tie), best takes the score and
  // arg[r * kNR + j] the index k0 + j. Lanes j >= valid are left alone.
  void (*tile_argmax)(const float* block, const float* panel, int64_t dp, int64_t k0,
                      int64_t valid, float* best, int32_t* arg);
  // c[r][0:dp] += sum_{j < inner} a[r][j] * b[j][0:dp] for r < rows (row-major, strides lda,
  // ldb, ldc; dp a multiple of 16).
  void (*gemm_acc)(int64_t rows, int64_t inner, const float* a, int64_t lda, const float* b,
                   int64_t ldb, float* c, int64_t ldc, int64_t dp);
  // max of v[0:n]
  float (*max_of)(const float* v, int64_t n);
  // v[i] = exp(v[i] - shift) for i < n; returns the sum of the new v.
  float (*exp_shift_sum)(float* v, int64_t n, float shift);
  // v[i] = weight[i] * exp(v[i] - shift[i]) for i < n.
  void (*exp_columns)(float* v, int64_t n, const float* shift, const float* weight);
  const char* name;
};

// The fastest implementation this CPU runs (decided once; SMOG_CPU_KERNELS=avx2 or =portable
// forces a slower one).
const MicroKernels& micro_kernels();

}  // namespace smog::cpu
