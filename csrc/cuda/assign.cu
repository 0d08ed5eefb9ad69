// smog::assign on CUDA: argmax_k <x_i, c_k> with ties to the smallest k.
//
// Each block owns 64 rows of x and streams over 64-group tiles (score_tile: tensor cores for
// bf16/fp16, CUDA cores for float32), keeping a running (max, argmax) per row: 4 threads per row
// scan 16 columns each in increasing k, combine with warp shuffles (larger score, or equal score and
// smaller index), and the running value only moves on a strictly larger score, so the first maximal
// index wins. When the row blocks are too few to fill the GPU, K is split across blockIdx.y: every
// split writes its (max, argmax) to its own slot of a partial buffer and a second kernel merges the
// splits in increasing k order (no atomics, no races, deterministic).
#include <torch/library.h>

#include "common.cuh"

namespace smog_cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
assign_kernel(const T* __restrict__ x, const T* __restrict__ c, int64_t N, int64_t K, int64_t D,
              int64_t tiles_per_split, float* __restrict__ out_score, int64_t* __restrict__ out_index) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t num_tiles = ceil_div(K, BN);
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t t_end = min(num_tiles, t_begin + tiles_per_split);
  const float* S = reinterpret_cast<const float*>(smem + kScoreOffset);
  const int r = threadIdx.x >> 2, q = threadIdx.x & 3;  // 4 threads per row, 16 columns each

  float best = -INFINITY;
  int64_t best_k = t_begin * BN;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t k0 = t * BN;
    score_tile<T>(x, N, row0, c, K, k0, D, smem);
    float v = -INFINITY;
    int64_t vk = k0 + q * 16;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int col = q * 16 + j;
      const float s = S[r * LDS + col];
      if (k0 + col < K && s > v) {
        v = s;
        vk = k0 + col;
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int64_t ok = __shfl_xor_sync(0xffffffffu, vk, off);
      if (ov > v || (ov == v && ok < vk)) {
        v = ov;
        vk = ok;
      }
    }
    if (v > best) {
      best = v;
      best_k = vk;
    }
    __syncthreads();  // the next tile overwrites S
  }
  const int64_t row = row0 + r;
  if (q == 0 && row < N) {
    const int64_t slot = static_cast<int64_t>(blockIdx.y) * N + row;
    out_score[slot] = best;
    out_index[slot] = best_k;
  }
}

// Merge of the K splits: splits cover increasing k, so a strictly larger score is needed to move.
__global__ void assign_merge_kernel(const float* __restrict__ part_score, const int64_t* __restrict__ part_index,
                                    int64_t N, int64_t splits, float* __restrict__ score,
                                    int64_t* __restrict__ index) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  float best = part_score[row];
  int64_t best_k = part_index[row];
  for (int64_t s = 1; s < splits; ++s) {
    const float v = part_score[s * N + row];
    if (v > best) {
      best = v;
      best_k = part_index[s * N + row];
    }
  }
  score[row] = best;
  index[row] = best_k;
}

std::tuple<at::Tensor, at::Tensor> assign_cuda(const at::Tensor& x_in, const at::Tensor& c_in) {
  TORCH_CHECK(x_in.dim() == 2 && c_in.dim() == 2 && x_in.size(1) == c_in.size(1),
              "smog::assign: x [N, D] and groups [K, D] expected");
  TORCH_CHECK(x_in.scalar_type() == c_in.scalar_type(), "smog::assign: x and groups must share a dtype");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), c = c_in.contiguous();
  const int64_t N = x.size(0), K = c.size(0), D = x.size(1);
  auto index = at::empty({N}, x.options().dtype(at::kLong));
  auto score = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {index, score};
  TORCH_CHECK(K >= 1, "smog::assign: groups must hold at least one row");

  const int64_t row_blocks = ceil_div(N, BM);
  const int64_t num_tiles = ceil_div(K, BN);
  // Split K when the row blocks alone leave SMs idle: aim for about 2 blocks per SM.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = 1;
  if (row_blocks < 2 * sms) splits = std::min<int64_t>(num_tiles, ceil_div(2 * sms, row_blocks));
  splits = std::min<int64_t>(splits, 65535);
  const int64_t tiles_per_split = ceil_div(num_tiles, splits);
  splits = ceil_div(num_tiles, tiles_per_split);  // no empty split

  at::Tensor part_score = score, part_index = index;
  if (splits > 1) {
    part_score = at::empty({splits, N}, score.options());
    part_index = at::empty({splits, N}, index.options());
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_feature_type(x.scalar_type(), "smog::assign", [&](auto tag) {
    using T = decltype(tag);
    auto kernel = assign_kernel<T>;
    allow_dynamic_smem(kernel, kSmemScoresOnly);
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
    kernel<<<grid, kThreads, kSmemScoresOnly, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(c.data_ptr()), N, K, D,
        tiles_per_split, part_score.data_ptr<float>(), part_index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (splits > 1) {
    assign_merge_kernel<<<static_cast<unsigned>(ceil_div(N, 256)), 256, 0, stream>>>(
        part_score.data_ptr<float>(), part_index.data_ptr<int64_t>(), N, splits, score.data_ptr<float>(),
        index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {index, score};
}

}  // namespace
}  // namespace smog_cuda

TORCH_LIBRARY_IMPL(smog, CUDA, m) { m.impl("assign", &smog_cuda::assign_cuda); }
