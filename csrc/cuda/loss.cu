// smog::loss_forward and smog::loss_group_grad on CUDA.
//
// loss_forward is attention with queries p and keys = values = groups, flash-attention style: a
// block owns 64 rows of p and a 128-wide slice of D (grid.z, so any D works; for D <= 128 there is one
// slice) and streams over 64-group tiles. Per tile: the score tile (tensor cores for bf16/fp16),
// logits l = s * inv_t, the running row max m and sum-exp l rescaled by exp(m_old - m_new), the
// numerators exp(l - m_new) written over the score tile, and the float32 accumulator
// acc = acc * exp(m_old - m_new) + P . C_tile (CUDA cores, float32). At the end
// attention = acc / l and lse = m + log(l). Nothing of size N x K is ever stored. The target logits
// <p_b, c_y> * inv_t come from a small kernel (one warp per (t, b)).
// That single pass is the path of float32 inputs. For bf16/fp16 on sm_80+ the default is two passes
// so that P . C runs on tensor cores too: pass 1 = the same kernel without values (lse only), pass 2
// = softmax_values_tc_kernel, whose probabilities exp(l - lse) are final per tile, so its WMMA
// accumulators need no rescaling. SMOG_CUDA_LOSS=simt selects the single pass for 16-bit inputs too.
//
// loss_group_grad swaps the roles: a block owns 64 groups and a D slice and streams over
// 64-row tiles of p: P[k][b] = w_b exp(<c_k, p_b> inv_t - lse_b), acc += P . p_tile, out = inv_t acc
// (CUDA cores for float32 or SMOG_CUDA_LOSS=simt, softmax_values_tc_kernel otherwise).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common.cuh"

namespace smog_cuda {
namespace {

// kValues = false: the log-sum-exp only (first pass of the tensor-core path), attention unused. Then
// blockIdx.y may split the groups (tiles_per_split tiles each): with part_m != nullptr every split
// writes its running (max, sum-exp) to part_m / part_l [splits, N] and lse_merge_kernel combines them.
// kValues = true: one split (tiles_per_split covers K), part_m == nullptr.
template <typename T, bool kValues>
__global__ void __launch_bounds__(kThreads)
loss_forward_kernel(const T* __restrict__ p, const T* __restrict__ c, int64_t N, int64_t K, int64_t D,
                    float inv_t, int64_t tiles_per_split, float* __restrict__ lse, float* __restrict__ part_m,
                    float* __restrict__ part_l, float* __restrict__ attention) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.z) * DC;
  float* S = reinterpret_cast<float*>(smem + kScoreOffset);
  float* row_scale = reinterpret_cast<float*>(smem + kVecOffset);
  float* row_sum = row_scale + 64;
  const int r = threadIdx.x >> 2, q = threadIdx.x & 3;  // softmax: 4 threads per row, 16 columns each

  float m_run = -INFINITY, l_run = 0.0f;
  float acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split * BN;
  const int64_t k_end = min(K, k_begin + tiles_per_split * BN);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BN) {
    score_tile<T>(p, N, row0, c, K, k0, D, smem);
    float* srow = S + r * LDS + q * 16;
    float mt = -INFINITY;
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if (k0 + q * 16 + j < K) mt = fmaxf(mt, srow[j] * inv_t);
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
    const float m_new = fmaxf(m_run, mt);
    const float scale = expf(m_run - m_new);  // 0 on the first tile (m_run = -inf)
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float e = (k0 + q * 16 + j < K) ? expf(srow[j] * inv_t - m_new) : 0.0f;
      srow[j] = e;
      sum += e;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    l_run = l_run * scale + sum;
    m_run = m_new;
    if constexpr (kValues) {
      if (q == 0) row_scale[r] = scale;
      load_value_tile<T>(c, K, k0, D, d0, smem);
      __syncthreads();
      accumulate_pv(acc, smem, row_scale);
    }
    __syncthreads();  // the next tile overwrites S, V and row_scale
  }
  if (q == 0) {
    row_sum[r] = l_run;
    const int64_t row = row0 + r;
    if (blockIdx.z == 0 && row < N) {
      if (part_m == nullptr) {
        lse[row] = m_run + logf(l_run);
      } else {
        part_m[static_cast<int64_t>(blockIdx.y) * N + row] = m_run;
        part_l[static_cast<int64_t>(blockIdx.y) * N + row] = l_run;
      }
    }
  }
  if constexpr (!kValues) return;
  __syncthreads();
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= N) continue;
    const float inv_l = 1.0f / row_sum[ty + 16 * i];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t d = d0 + tx + 16 * j;
      if (d < D) attention[row * D + d] = acc[i][j] * inv_l;
    }
  }
}

// lse of every row from the per-split (max, sum-exp) pairs; every split saw at least one group.
__global__ void lse_merge_kernel(const float* __restrict__ part_m, const float* __restrict__ part_l, int64_t N,
                                 int64_t splits, float* __restrict__ lse) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  float m = part_m[row];
  for (int64_t s = 1; s < splits; ++s) m = fmaxf(m, part_m[s * N + row]);
  float l = 0.0f;
  for (int64_t s = 0; s < splits; ++s) l += part_l[s * N + row] * expf(part_m[s * N + row] - m);
  lse[row] = m + logf(l);
}

// out[i] = sum_s part[s][i], splits added in order (deterministic).
__global__ void sum_splits_kernel(const float* __restrict__ part, int64_t total, int64_t splits,
                                  float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = part[i];
    for (int64_t s = 1; s < splits; ++s) acc += part[s * total + i];
    out[i] = acc;
  }
}

// Tensor-core P . V pass for bf16/fp16 (sm_80+), given the log-sum-exp of every row from a first pass:
// the probabilities are exact per tile (no running rescale), so the output accumulates in WMMA
// fragments across all tiles. P = col_w * exp(s * inv_t - lse) is rounded to the input type (as in
// flash attention) and multiplied with the value tile on tensor cores, float32 accumulation.
//   kGroupGrad = false: A = p [N], B = groups [K], lse per row of A: out = attention [N, D]
//   kGroupGrad = true:  A = groups [K], B = p [N], lse and weight per row of B:
//                          out = out_scale * sum_b w_b softmax_bk p_b  [K, D]; the weights enter P
//                          divided by *weight_max (max |w|, on the device) and the output is multiplied
//                          back, so that small weights (1 / (T N) for a mean) do not underflow float16.
// blockIdx.y splits the rows of B (tiles_per_split tiles each); split y writes out + y * rows_a * D, a
// partial sum that sum_splits_kernel adds up when there is more than one split.
template <typename T, bool kGroupGrad>
__global__ void __launch_bounds__(kThreads)
softmax_values_tc_kernel(const T* __restrict__ A, int64_t rows_a, const T* __restrict__ B, int64_t rows_b,
                         int64_t D, const float* __restrict__ lse, const float* __restrict__ weight,
                         const float* __restrict__ weight_max, float inv_t, float out_scale,
                         int64_t tiles_per_split, float* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.z) * DC;
  const float* S = reinterpret_cast<const float*>(smem + kScoreOffset);
  float* row_lse = reinterpret_cast<float*>(smem + kVecOffset);
  float* col_lse = row_lse + 64;
  float* col_w = row_lse + 128;
  T* P = reinterpret_cast<T*>(smem + kTcPOffset);
  T* V = reinterpret_cast<T*>(smem + kTcVOffset);
  float* O = reinterpret_cast<float*>(smem + kTcOutOffset);
  const T zero = from_float<T>(0.0f);
  const int tid = threadIdx.x, warp = tid >> 5;
  const int wr = warp >> 1;        // 16-row slab of the output tile
  const int wc = (warp & 1) * 64;  // first of four 16-column slabs

  if (!kGroupGrad && tid < BM) row_lse[tid] = row0 + tid < rows_a ? lse[row0 + tid] : 0.0f;
  float w_unit = 1.0f;  // the weights are stored as w / w_unit
  if (kGroupGrad) {
    const float wm = *weight_max;
    if (wm > 0.0f && wm < INFINITY) w_unit = wm;
  }
  const float inv_w_unit = 1.0f / w_unit;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.0f);

  out += static_cast<int64_t>(blockIdx.y) * rows_a * D;
  const int64_t key_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split * BN;
  const int64_t key_end = min(rows_b, key_begin + tiles_per_split * BN);
  for (int64_t key0 = key_begin; key0 < key_end; key0 += BN) {
    if (kGroupGrad && tid < BN) {
      const int64_t b = key0 + tid;
      col_lse[tid] = b < rows_b ? lse[b] : 0.0f;
      col_w[tid] = b < rows_b ? weight[b] * inv_w_unit : 0.0f;
    }
    score_tile<T>(A, rows_a, row0, B, rows_b, key0, D, smem);  // its barriers publish the vectors
    for (int e = tid; e < BM * BN; e += kThreads) {
      const int r = e / BN, cc = e % BN;
      float v = 0.0f;
      if (key0 + cc < key_end) {
        const float s = S[r * LDS + cc] * inv_t;
        v = kGroupGrad ? col_w[cc] * expf(s - col_lse[cc]) : expf(s - row_lse[r]);
      }
      P[r * LDP + cc] = from_float<T>(v);
    }
    for (int e = tid; e < BN * DC; e += kThreads) {
      const int cc = e / DC, d = e % DC;
      const int64_t gr = key0 + cc, gd = d0 + d;
      V[cc * LDV + d] = (gr < key_end && gd < D) ? B[gr * D + gd] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BN; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, P + (wr * 16) * LDP + kk, LDP);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, V + kk * LDV + wc + j * 16, LDV);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    __syncthreads();  // the next tile overwrites P, V, S and the vectors
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    wmma::store_matrix_sync(O + (wr * 16) * LDO + wc + j * 16, acc[j], LDO, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * DC; e += kThreads) {
    const int r = e / DC, d = e % DC;
    const int64_t row = row0 + r, gd = d0 + d;
    if (row < rows_a && gd < D) out[row * D + gd] = O[r * LDO + d] * (out_scale * w_unit);
  }
#endif
}

// The tensor-core P . V path serves bf16/fp16 on sm_80+ unless SMOG_CUDA_LOSS=simt asks for the
// single-pass CUDA-core path (float32 probabilities, float32 P . V), which float32 inputs always take.
bool use_tensor_core_values(at::ScalarType st) {
  if (st != at::kHalf && st != at::kBFloat16) return false;
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  const char* env = std::getenv("SMOG_CUDA_LOSS");
  return env == nullptr || std::strcmp(env, "simt") != 0;
}

// out[t, b] = <p_b, c_{targets[t, b]}> * inv_t, one warp per (t, b).
template <typename T>
__global__ void target_logits_kernel(const T* __restrict__ p, const T* __restrict__ c,
                                     const int64_t* __restrict__ targets, int64_t TN, int64_t N, int64_t D,
                                     float inv_t, float* __restrict__ out) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= TN) return;
  const int64_t b = w % N;
  const T* prow = p + b * D;
  const T* crow = c + targets[w] * D;
  float dot = 0.0f;
  for (int64_t d = lane; d < D; d += 32) dot = fmaf(to_float(prow[d]), to_float(crow[d]), dot);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  if (lane == 0) out[w] = dot * inv_t;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
group_grad_kernel(const T* __restrict__ p, const T* __restrict__ c, const float* __restrict__ lse,
                     const float* __restrict__ row_weight, int64_t N, int64_t K, int64_t D, float inv_t,
                     float* __restrict__ out) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t k_first = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.z) * DC;
  float* S = reinterpret_cast<float*>(smem + kScoreOffset);
  float* col_weight = reinterpret_cast<float*>(smem + kVecOffset);
  float* col_lse = col_weight + 64;

  float acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  for (int64_t b0 = 0; b0 < N; b0 += BN) {
    if (threadIdx.x < BN) {
      const int64_t b = b0 + threadIdx.x;
      col_weight[threadIdx.x] = b < N ? row_weight[b] : 0.0f;
      col_lse[threadIdx.x] = b < N ? lse[b] : 0.0f;
    }
    score_tile<T>(c, K, k_first, p, N, b0, D, smem);  // S[k][b]; its barriers publish col_*
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int rr = e / BN, cc = e % BN;
      float* s = S + rr * LDS + cc;
      *s = (b0 + cc < N) ? col_weight[cc] * expf(*s * inv_t - col_lse[cc]) : 0.0f;
    }
    load_value_tile<T>(p, N, b0, D, d0, smem);
    __syncthreads();
    accumulate_pv(acc, smem, nullptr);
    __syncthreads();
  }
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t k = k_first + ty + 16 * i;
    if (k >= K) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t d = d0 + tx + 16 * j;
      if (d < D) out[k * D + d] = acc[i][j] * inv_t;
    }
  }
}

// Splits of the streamed rows so that about two blocks per SM run when the output blocks are few.
struct SplitPlan {
  int64_t splits, tiles_per_split;
};
SplitPlan plan_splits(int64_t output_blocks, int64_t rows_streamed) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div(rows_streamed, BN));
  const int64_t target = 2LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = 1;
  if (output_blocks < target) splits = std::min<int64_t>({tiles, ceil_div(target, output_blocks), 32});
  const int64_t per = ceil_div(tiles, splits);
  return {ceil_div(tiles, per), per};
}

// Runs the tensor-core values kernel over the split plan into out (float32 [rows_a, D]).
template <typename T, bool kGroupGrad>
void launch_tc_values(const T* A, int64_t rows_a, const T* B, int64_t rows_b, int64_t D, const float* lse,
                      const float* weight, const float* weight_max, float inv_t, float out_scale, at::Tensor& out,
                      cudaStream_t stream) {
  const int64_t row_blocks = ceil_div(rows_a, BM), slices = std::max<int64_t>(1, ceil_div(D, DC));
  const SplitPlan plan = plan_splits(row_blocks * slices, rows_b);
  at::Tensor target = out;
  if (plan.splits > 1) target = at::empty({plan.splits, rows_a, D}, out.options());
  auto kernel = softmax_values_tc_kernel<T, kGroupGrad>;
  allow_dynamic_smem(kernel, kSmemTcValues);
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(plan.splits), static_cast<unsigned>(slices));
  kernel<<<grid, kThreads, kSmemTcValues, stream>>>(A, rows_a, B, rows_b, D, lse, weight, weight_max, inv_t,
                                                   out_scale, plan.tiles_per_split, target.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (plan.splits > 1) {
    const int64_t total = rows_a * D;
    if (total == 0) return;
    const int64_t blocks = std::min<int64_t>(ceil_div(total, 256), 4096);
    sum_splits_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(target.data_ptr<float>(), total,
                                                                         plan.splits, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_target_logits(const T* p, const T* c, const at::Tensor& targets, int64_t N, int64_t D, float inv_t,
                          at::Tensor& target_logits, cudaStream_t stream) {
  const int64_t TN = targets.numel();
  if (TN == 0) return;
  target_logits_kernel<T><<<static_cast<unsigned>(ceil_div(TN, 8)), 256, 0, stream>>>(
      p, c, targets.data_ptr<int64_t>(), TN, N, D, inv_t, target_logits.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward_cuda(const at::Tensor& p_in, const at::Tensor& c_in,
                                                                 const at::Tensor& targets_in,
                                                                 double inv_temperature) {
  TORCH_CHECK(p_in.dim() == 2 && c_in.dim() == 2 && p_in.size(1) == c_in.size(1),
              "smog::loss_forward: p [N, D] and groups [K, D] expected");
  TORCH_CHECK(p_in.scalar_type() == c_in.scalar_type(), "smog::loss_forward: p and groups must share a dtype");
  TORCH_CHECK(targets_in.dim() == 2 && targets_in.size(1) == p_in.size(0) && targets_in.scalar_type() == at::kLong,
              "smog::loss_forward: targets must be int64 [T, N]");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous(), c = c_in.contiguous(), targets = targets_in.contiguous();
  const int64_t N = p.size(0), D = p.size(1), K = c.size(0), T_ = targets.size(0);
  const auto f32 = p.options().dtype(at::kFloat);
  auto lse = at::empty({N}, f32);
  auto target_logits = at::empty({T_, N}, f32);
  auto attention = at::empty({N, D}, f32);
  if (N == 0) return {lse, target_logits, attention};
  TORCH_CHECK(K >= 1, "smog::loss_forward: groups must hold at least one row");
  const float inv_t = static_cast<float>(inv_temperature);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_feature_type(p.scalar_type(), "smog::loss_forward", [&](auto tag) {
    using T = decltype(tag);
    const T* pp = reinterpret_cast<const T*>(p.data_ptr());
    const T* cp = reinterpret_cast<const T*>(c.data_ptr());
    const unsigned row_blocks = static_cast<unsigned>(ceil_div(N, BM));
    const unsigned slices = static_cast<unsigned>(std::max<int64_t>(1, ceil_div(D, DC)));
    if constexpr (!std::is_same<T, float>::value) {
      if (use_tensor_core_values(p.scalar_type())) {
        const SplitPlan plan = plan_splits(row_blocks, K);
        at::Tensor part_m, part_l;
        if (plan.splits > 1) {
          part_m = at::empty({plan.splits, N}, f32);
          part_l = at::empty({plan.splits, N}, f32);
        }
        auto lse_kernel = loss_forward_kernel<T, false>;
        lse_kernel<<<dim3(row_blocks, static_cast<unsigned>(plan.splits)), kThreads, kSmemScoresOnly, stream>>>(
            pp, cp, N, K, D, inv_t, plan.tiles_per_split, lse.data_ptr<float>(),
            plan.splits > 1 ? part_m.data_ptr<float>() : nullptr, plan.splits > 1 ? part_l.data_ptr<float>() : nullptr,
            attention.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (plan.splits > 1) {
          lse_merge_kernel<<<static_cast<unsigned>(ceil_div(N, 256)), 256, 0, stream>>>(
              part_m.data_ptr<float>(), part_l.data_ptr<float>(), N, plan.splits, lse.data_ptr<float>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        launch_tc_values<T, false>(pp, N, cp, K, D, lse.data_ptr<float>(), nullptr, nullptr, inv_t, 1.0f, attention,
                                   stream);
        launch_target_logits<T>(pp, cp, targets, N, D, inv_t, target_logits, stream);
        return;
      }
    }
    auto kernel = loss_forward_kernel<T, true>;
    allow_dynamic_smem(kernel, kSmemWithValues);
    kernel<<<dim3(row_blocks, 1, slices), kThreads, kSmemWithValues, stream>>>(
        pp, cp, N, K, D, inv_t, ceil_div(K, BN), lse.data_ptr<float>(), nullptr, nullptr,
        attention.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_target_logits<T>(pp, cp, targets, N, D, inv_t, target_logits, stream);
  });
  return {lse, target_logits, attention};
}

at::Tensor loss_group_grad_cuda(const at::Tensor& p_in, const at::Tensor& c_in, const at::Tensor& lse_in,
                                   const at::Tensor& w_in, double inv_temperature) {
  TORCH_CHECK(p_in.dim() == 2 && c_in.dim() == 2 && p_in.size(1) == c_in.size(1),
              "smog::loss_group_grad: p [N, D] and groups [K, D] expected");
  TORCH_CHECK(p_in.scalar_type() == c_in.scalar_type(),
              "smog::loss_group_grad: p and groups must share a dtype");
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == p_in.size(0) && w_in.dim() == 1 && w_in.size(0) == p_in.size(0),
              "smog::loss_group_grad: lse and row_weight must be [N]");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous(), c = c_in.contiguous();
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous(), w = w_in.to(at::kFloat).contiguous();
  const int64_t N = p.size(0), D = p.size(1), K = c.size(0);
  auto out = at::empty({K, D}, p.options().dtype(at::kFloat));
  if (K == 0) return out;
  const float inv_t = static_cast<float>(inv_temperature);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_feature_type(p.scalar_type(), "smog::loss_group_grad", [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(ceil_div(K, BM)), 1,
                    static_cast<unsigned>(std::max<int64_t>(1, ceil_div(D, DC))));
    if constexpr (!std::is_same<T, float>::value) {
      if (use_tensor_core_values(p.scalar_type()) && N > 0) {
        const at::Tensor w_max = w.abs().amax();  // stays on the device
        launch_tc_values<T, true>(reinterpret_cast<const T*>(c.data_ptr()), K, reinterpret_cast<const T*>(p.data_ptr()),
                                  N, D, lse.data_ptr<float>(), w.data_ptr<float>(), w_max.data_ptr<float>(), inv_t,
                                  inv_t, out, stream);
        return;
      }
    }
    auto kernel = group_grad_kernel<T>;
    allow_dynamic_smem(kernel, kSmemWithValues);
    kernel<<<grid, kThreads, kSmemWithValues, stream>>>(
        reinterpret_cast<const T*>(p.data_ptr()), reinterpret_cast<const T*>(c.data_ptr()), lse.data_ptr<float>(),
        w.data_ptr<float>(), N, K, D, inv_t, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace smog_cuda

TORCH_LIBRARY_IMPL(smog, CUDA, m) {
  m.impl("loss_forward", &smog_cuda::loss_forward_cuda);
  m.impl("loss_group_grad", &smog_cuda::loss_group_grad_cuda);
}
