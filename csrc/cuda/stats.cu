// smog::group_stats and smog::momentum_update on CUDA.
//
// group_stats has two paths, both float32 sums [K, D] and int64 counts [K]:
//   - atomic (default): one thread per element of x adds it to its group's row with a float32
//     atomicAdd (and one thread per row counts it); fast, but the order of the float additions, hence
//     the last bits of the sums, varies from run to run;
//   - deterministic: a stable sort of the group indices (at::sort, a radix sort on CUDA) gives the
//     rows of every group as one contiguous segment of the permutation; a kernel marks the segment
//     bounds and a segmented sum adds every group's rows in ascending row order. Bitwise reproducible.
// The deterministic path is taken when the environment variable SMOG_DETERMINISTIC is set to a value
// other than "" / "0", or when torch.use_deterministic_algorithms(True) is in force
// (at::globalContext().deterministicAlgorithms()); otherwise the atomic path runs.
//
// momentum_update: one warp per group row: v = beta c + (1 - beta) sum / count, written as
// v / max(||v||, 1e-12) (F.normalize) for rows with count > 0, the row unchanged otherwise.
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common.cuh"

namespace smog_cuda {
namespace {

bool deterministic_stats() {
  const char* env = std::getenv("SMOG_DETERMINISTIC");
  if (env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0) return true;
  return at::globalContext().deterministicAlgorithms();
}

// ---- atomic path ---------------------------------------------------------------------------------

template <typename T>
__global__ void stats_atomic_kernel(const T* __restrict__ x, const int64_t* __restrict__ index, int64_t N,
                                    int64_t D, float* __restrict__ sums, unsigned long long* __restrict__ counts) {
  const int64_t total = N * D > N ? N * D : N;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (e < N * D) {
      const int64_t row = e / D, d = e - row * D;
      atomicAdd(sums + index[row] * D + d, to_float(x[e]));
    }
    if (e < N) atomicAdd(counts + index[e], 1ull);
  }
}

// ---- deterministic path --------------------------------------------------------------------------

// sorted_keys ascending: start[k] / end[k] = the segment of group k (left 0 / 0 for empty groups).
__global__ void segment_bounds_kernel(const int64_t* __restrict__ sorted_keys, int64_t N,
                                      int64_t* __restrict__ start, int64_t* __restrict__ end) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t k = sorted_keys[i];
  if (i == 0 || sorted_keys[i - 1] != k) start[k] = i;
  if (i == N - 1 || sorted_keys[i + 1] != k) end[k] = i + 1;
}

constexpr int kSegThreads = 128;

// grid (K, ceil(D / 128)): block (k, slice) sums the rows perm[start[k] .. end[k]) of x in order.
template <typename T>
__global__ void segment_sum_kernel(const T* __restrict__ x, const int64_t* __restrict__ perm,
                                   const int64_t* __restrict__ start, const int64_t* __restrict__ end, int64_t D,
                                   float* __restrict__ sums, int64_t* __restrict__ counts) {
  const int64_t k = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kSegThreads + threadIdx.x;
  const int64_t s = start[k], e = end[k];
  if (blockIdx.y == 0 && threadIdx.x == 0) counts[k] = e - s;
  if (d >= D) return;
  // Rows added one by one in ascending sorted position; four loads in flight per step for large groups.
  float acc = 0.0f;
  int64_t i = s;
  for (; i + 4 <= e; i += 4) {
    const int64_t r0 = perm[i], r1 = perm[i + 1], r2 = perm[i + 2], r3 = perm[i + 3];
    const float v0 = to_float(x[r0 * D + d]), v1 = to_float(x[r1 * D + d]);
    const float v2 = to_float(x[r2 * D + d]), v3 = to_float(x[r3 * D + d]);
    acc += v0;
    acc += v1;
    acc += v2;
    acc += v3;
  }
  for (; i < e; ++i) acc += to_float(x[perm[i] * D + d]);
  sums[k * D + d] = acc;
}

std::tuple<at::Tensor, at::Tensor> group_stats_cuda(const at::Tensor& x_in, const at::Tensor& index_in,
                                                    int64_t num_groups) {
  TORCH_CHECK(x_in.dim() == 2, "smog::group_stats: x must be [N, D]");
  TORCH_CHECK(index_in.dim() == 1 && index_in.size(0) == x_in.size(0) && index_in.scalar_type() == at::kLong,
              "smog::group_stats: index must be int64 [N]");
  TORCH_CHECK(num_groups >= 1, "smog::group_stats: num_groups must be >= 1");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), index = index_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1), K = num_groups;
  auto stream = at::cuda::getCurrentCUDAStream();

  if (!deterministic_stats()) {
    auto sums = at::zeros({K, D}, x.options().dtype(at::kFloat));
    auto counts = at::zeros({K}, x.options().dtype(at::kLong));
    const int64_t total = std::max(N * D, N);
    if (total == 0) return {sums, counts};
    const int64_t blocks = std::min<int64_t>(ceil_div(total, 256), 65535LL * 8);
    dispatch_feature_type(x.scalar_type(), "smog::group_stats", [&](auto tag) {
      using T = decltype(tag);
      stats_atomic_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
          reinterpret_cast<const T*>(x.data_ptr()), index.data_ptr<int64_t>(), N, D, sums.data_ptr<float>(),
          reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {sums, counts};
  }

  auto sums = at::empty({K, D}, x.options().dtype(at::kFloat));
  auto counts = at::empty({K}, x.options().dtype(at::kLong));
  auto start = at::zeros({K}, index.options());
  auto end = at::zeros({K}, index.options());
  at::Tensor perm;
  if (N > 0) {
    auto sorted = at::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor keys = std::get<0>(sorted).contiguous();
    perm = std::get<1>(sorted).contiguous();
    segment_bounds_kernel<<<static_cast<unsigned>(ceil_div(N, 256)), 256, 0, stream>>>(
        keys.data_ptr<int64_t>(), N, start.data_ptr<int64_t>(), end.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    perm = at::empty({0}, index.options());
  }
  const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(std::max<int64_t>(1, ceil_div(D, kSegThreads))));
  dispatch_feature_type(x.scalar_type(), "smog::group_stats", [&](auto tag) {
    using T = decltype(tag);
    segment_sum_kernel<T><<<grid, kSegThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), perm.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
        end.data_ptr<int64_t>(), D, sums.data_ptr<float>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts};
}

// ---- momentum update -----------------------------------------------------------------------------

constexpr int kRowsPerBlock = 8;  // one warp per row

template <typename T>
__global__ void momentum_update_kernel(const T* __restrict__ c, const float* __restrict__ sums,
                                       const int64_t* __restrict__ counts, int64_t K, int64_t D, float beta,
                                       float one_minus_beta, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (k >= K) return;
  const T* crow = c + k * D;
  T* orow = out + k * D;
  const int64_t n = counts[k];
  if (n <= 0) {
    for (int64_t d = lane; d < D; d += 32) orow[d] = crow[d];
    return;
  }
  const float fn = static_cast<float>(n);
  const float* srow = sums + k * D;
  float ss = 0.0f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = beta * to_float(crow[d]) + one_minus_beta * (srow[d] / fn);
    ss = fmaf(v, v, ss);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float denom = fmaxf(sqrtf(ss), 1e-12f);
  for (int64_t d = lane; d < D; d += 32) {
    const float v = beta * to_float(crow[d]) + one_minus_beta * (srow[d] / fn);
    orow[d] = from_float<T>(v / denom);
  }
}

at::Tensor momentum_update_cuda(const at::Tensor& c_in, const at::Tensor& sums_in, const at::Tensor& counts_in,
                                double beta) {
  TORCH_CHECK(c_in.dim() == 2 && sums_in.sizes() == c_in.sizes() && sums_in.scalar_type() == at::kFloat,
              "smog::momentum_update: groups [K, D] and float32 sums [K, D] expected");
  TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == c_in.size(0) && counts_in.scalar_type() == at::kLong,
              "smog::momentum_update: counts must be int64 [K]");
  const c10::cuda::CUDAGuard guard(c_in.device());
  const at::Tensor c = c_in.contiguous(), sums = sums_in.contiguous(), counts = counts_in.contiguous();
  const int64_t K = c.size(0), D = c.size(1);
  auto out = at::empty_like(c, at::MemoryFormat::Contiguous);
  if (K == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_feature_type(c.scalar_type(), "smog::momentum_update", [&](auto tag) {
    using T = decltype(tag);
    momentum_update_kernel<T><<<static_cast<unsigned>(ceil_div(K, kRowsPerBlock)), 32 * kRowsPerBlock, 0, stream>>>(
        reinterpret_cast<const T*>(c.data_ptr()), sums.data_ptr<float>(), counts.data_ptr<int64_t>(), K, D,
        static_cast<float>(beta), static_cast<float>(1.0 - beta), reinterpret_cast<T*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace smog_cuda

TORCH_LIBRARY_IMPL(smog, CUDA, m) {
  m.impl("group_stats", &smog_cuda::group_stats_cuda);
  m.impl("momentum_update", &smog_cuda::momentum_update_cuda);
}
