// Shared pieces of the CUDA kernels of smog: dtype traits, the streaming score-tile engine and the
// launch helpers.
//
// The engine: a thread block owns BM "query" rows of a matrix A [M, D] and streams over tiles of BN
// rows of a matrix B [R, D] (the "keys"). For every tile it computes the float32 score tile
// S = A_blk . B_tile^T [BM, BN] into shared memory, D in chunks of BK:
//   - bfloat16 / float16: tensor cores through WMMA (16x16x16, float32 accumulators), sm_80+;
//   - float32 (and 16-bit on older archs): CUDA cores, each thread a 4x4 micro-tile.
// Rows past M / R and columns past D are zero-filled in shared memory, so every score of a valid
// (row, key) pair is an exact float32-accumulated dot product and padding never produces NaN.
// The ops (assign, loss forward, group gradient) are epilogues over the score tile; none of
// them ever stores an N x K matrix.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>

namespace smog_cuda {

constexpr int kThreads = 256;  // 8 warps per block, every kernel of the engine
constexpr int BM = 64;         // rows of A per block
constexpr int BN = 64;         // rows of B per streamed tile
constexpr int BK = 32;         // D chunk of the score computation
constexpr int DC = 128;        // D slice of the float32 output accumulator (grid.z covers D / DC)
constexpr int LDH = BK + 8;    // leading dim (elements) of the 16-bit staging tiles (WMMA: multiple of 8)
constexpr int LDF = BK + 1;    // leading dim of the float32 staging tiles (odd: no bank conflicts)
constexpr int LDS = BN + 4;    // leading dim of the float32 score tile (WMMA store: multiple of 4)

// ---- dtype traits -----------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct IsTensorCoreType : std::integral_constant<bool, !std::is_same<T, float>::value> {};

// Whether this compilation pass uses tensor cores for T (bf16 WMMA needs sm_80).
template <typename T>
__device__ __forceinline__ constexpr bool use_tc() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return IsTensorCoreType<T>::value;
#else
  return false;
#endif
}

// ---- shared memory layout of the engine --------------------------------------------------------

// Byte offsets, all multiples of 128 so WMMA pointers stay 256-bit aligned.
constexpr int align128(int b) { return (b + 127) / 128 * 128; }
constexpr int kStageBytesF = align128(BM * LDF * 4) + align128(BN * LDF * 4);  // float staging A + B
constexpr int kStageBytesH = align128(BM * LDH * 2) + align128(BN * LDH * 2);  // 16-bit staging A + B
constexpr int kStageBytes = kStageBytesF > kStageBytesH ? kStageBytesF : kStageBytesH;
constexpr int kScoreOffset = kStageBytes;
constexpr int kScoreBytes = align128(BM * LDS * 4);
constexpr int kVecOffset = kScoreOffset + kScoreBytes;  // three float vectors of 64 (row scale, ...)
constexpr int kVecBytes = align128(3 * 64 * 4);
constexpr int kValueOffset = kVecOffset + kVecBytes;    // float V tile [BN][DC]
constexpr int kValueBytes = align128(BN * DC * 4);
constexpr int kSmemScoresOnly = kValueOffset;           // assign, log-sum-exp pass
constexpr int kSmemWithValues = kValueOffset + kValueBytes;  // CUDA-core loss forward, group gradient

// Tensor-core P . V pass (16-bit inputs): after the vectors, P [BM][LDP] and V [BN][LDV] in the input
// type, then the float32 output staging tile O [BM][LDO].
constexpr int LDP = BN + 8;
constexpr int LDV = DC + 8;
constexpr int LDO = DC + 4;
constexpr int kTcPOffset = kValueOffset;
constexpr int kTcVOffset = kTcPOffset + align128(BM * LDP * 2);
constexpr int kTcOutOffset = kTcVOffset + align128(BN * LDV * 2);
constexpr int kSmemTcValues = kTcOutOffset + align128(BM * LDO * 4);

// ---- score tile ----------------------------------------------------------------------------------

// S[r][c] = <A[row0 + r], B[key0 + c]> for r < BM, c < BN (0 where the row or key is out of range).
// Ends with __syncthreads(): S is complete and visible to the whole block.
template <typename T>
__device__ __forceinline__ void score_tile(const T* __restrict__ A, int64_t rows_a, int64_t row0,
                                           const T* __restrict__ B, int64_t rows_b, int64_t key0,
                                           int64_t D, unsigned char* smem) {
  const int tid = threadIdx.x;
  float* S = reinterpret_cast<float*>(smem + kScoreOffset);
  if constexpr (use_tc<T>()) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = reinterpret_cast<T*>(smem + align128(BM * LDH * 2));
    const T zero = from_float<T>(0.0f);
    const int warp = tid >> 5;
    const int wr = warp >> 1;         // 16-row slab 0..3
    const int wc = (warp & 1) * 2;    // first of two 16-column slabs
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int64_t d0 = 0; d0 < D; d0 += BK) {
      for (int e = tid; e < BM * BK; e += kThreads) {
        const int r = e / BK, c = e % BK;
        const int64_t gr = row0 + r, gc = d0 + c;
        As[r * LDH + c] = (gr < rows_a && gc < D) ? A[gr * D + gc] : zero;
      }
      for (int e = tid; e < BN * BK; e += kThreads) {
        const int r = e / BK, c = e % BK;
        const int64_t gr = key0 + r, gc = d0 + c;
        Bs[r * LDH + c] = (gr < rows_b && gc < D) ? B[gr * D + gc] : zero;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, As + (wr * 16) * LDH + kk, LDH);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // B tile stored [key][d] = the K x N operand in column-major order
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, Bs + ((wc + j) * 16) * LDH + kk, LDH);
          wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(S + (wr * 16) * LDS + (wc + j) * 16, acc[j], LDS, wmma::mem_row_major);
    __syncthreads();
#endif
  } else {
    float* As = reinterpret_cast<float*>(smem);
    float* Bs = reinterpret_cast<float*>(smem + align128(BM * LDF * 4));
    const int tx = tid & 15, ty = tid >> 4;  // micro-tile rows ty + 16 i, columns tx + 16 j
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int64_t d0 = 0; d0 < D; d0 += BK) {
      for (int e = tid; e < BM * BK; e += kThreads) {
        const int r = e / BK, c = e % BK;
        const int64_t gr = row0 + r, gc = d0 + c;
        As[r * LDF + c] = (gr < rows_a && gc < D) ? to_float(A[gr * D + gc]) : 0.0f;
      }
      for (int e = tid; e < BN * BK; e += kThreads) {
        const int r = e / BK, c = e % BK;
        const int64_t gr = key0 + r, gc = d0 + c;
        Bs[r * LDF + c] = (gr < rows_b && gc < D) ? to_float(B[gr * D + gc]) : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < BK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[(ty + 16 * i) * LDF + kk];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[(tx + 16 * j) * LDF + kk];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) S[(ty + 16 * i) * LDS + tx + 16 * j] = acc[i][j];
    __syncthreads();
  }
}

// V[c][d] = B[key0 + c][d0 + d] as float for c < BN, d < DC (0 out of range). No barrier.
template <typename T>
__device__ __forceinline__ void load_value_tile(const T* __restrict__ B, int64_t rows_b, int64_t key0,
                                                int64_t D, int64_t d0, unsigned char* smem) {
  float* V = reinterpret_cast<float*>(smem + kValueOffset);
  for (int e = threadIdx.x; e < BN * DC; e += kThreads) {
    const int c = e / DC, d = e % DC;
    const int64_t gr = key0 + c, gd = d0 + d;
    V[e] = (gr < rows_b && gd < D) ? to_float(B[gr * D + gd]) : 0.0f;
  }
}

// acc[i][j] (row ty + 16 i, column d0 + tx + 16 j) = acc * scale[row] + sum_c P[row][c] V[c][col].
// P is the score tile after the epilogue; scale == nullptr means 1. No barrier.
__device__ __forceinline__ void accumulate_pv(float (&acc)[4][8], const unsigned char* smem,
                                              const float* scale) {
  const float* P = reinterpret_cast<const float*>(smem + kScoreOffset);
  const float* V = reinterpret_cast<const float*>(smem + kValueOffset);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  if (scale != nullptr) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float s = scale[ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] *= s;
    }
  }
#pragma unroll 4
  for (int c = 0; c < BN; ++c) {
    float p[4], v[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = P[(ty + 16 * i) * LDS + c];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = V[c * DC + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(p[i], v[j], acc[i][j]);
  }
}

// ---- host helpers ------------------------------------------------------------------------------

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls fn.template operator()<T>() with T the device type of the tensor's dtype.
template <typename Fn>
void dispatch_feature_type(at::ScalarType st, const char* op, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(__half{}); break;
    case at::kBFloat16: fn(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16 features, got ", st);
  }
}

// Opts a kernel into more than 48 KiB of dynamic shared memory, once per (kernel, device), so that
// later calls (and CUDA-graph captures) make no driver call.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::set<std::tuple<const void*, int, int>> done;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, bytes);
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert(key);
}

}  // namespace smog_cuda
