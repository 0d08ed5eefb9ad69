// Fused CPU implementations of the smog:: operators (schemas in csrc/ops.cpp).
//
// Inputs are read as float32 rows of width dp = D rounded up to 16 (used in place when already
// so, else one converting copy from any float dtype and strides, zero-padded) and packed for the
// micro-kernels (microkernels.h). Every op streams over group tiles with per-row running
// reductions, so no N x K buffer ever exists: the extra memory is O((N + K) * D) plus per-thread
// tiles. Work is split over blocks of rows (or of groups) with OpenMP, each block owned by one
// thread: no atomics, and results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/microkernels.h"

namespace smog::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kLossRows = 4 * kMR;    // rows per task of the loss forward pass
constexpr int64_t kAssignRows = 4 * kMR;  // rows per task of the assignment
constexpr int64_t kColBlock = 7 * kNR;    // groups per streamed tile (224, a multiple of kMR too)
// Below this many multiply-adds an op runs on one thread: waking the OpenMP team would cost more
// than the work. Memory-bound passes (packing, sums, updates) gain less from threads: they go
// parallel only above kParallelCopy elements.
constexpr int64_t kParallelWork = int64_t{1} << 18;
constexpr int64_t kParallelCopy = int64_t{1} << 22;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
int64_t ceil_div(int64_t v, int64_t m) { return (v + m - 1) / m; }

// float32 rows of t [R, D] with row width dp (columns D..dp zero): t itself when it already is
// contiguous float32 with D == dp, else one converting copy (any dtype and strides in).
at::Tensor float_rows(const at::Tensor& t, int64_t dp) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous() && t.size(1) == dp) return t;
  at::Tensor out = at::empty({t.size(0), dp}, t.options().dtype(at::kFloat));
  out.narrow(1, 0, t.size(1)).copy_(t);
  out.narrow(1, t.size(1), dp - t.size(1)).zero_();
  return out;
}

// float32 rows f [R, dp] -> [rows / b][dp][b]: blocks of b rows, transposed, rows R..rows zero
// (rows a multiple of b, >= R). One pass.
at::Tensor pack_rows(const at::Tensor& f, int64_t b, int64_t rows) {
  const int64_t r_in = f.size(0), dp = f.size(1), blocks = rows / b;
  at::Tensor out = at::empty({blocks, dp, b}, f.options());
  const float* src = f.data_ptr<float>();
  float* dst = out.data_ptr<float>();
#pragma omp parallel for num_threads(at::get_num_threads()) if (rows * dp >= kParallelCopy)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    float* o = dst + blk * dp * b;
    for (int64_t r = 0; r < b; ++r) {
      const int64_t row = blk * b + r;
      if (row < r_in) {
        const float* in = src + row * dp;
        for (int64_t j = 0; j < dp; ++j) o[j * b + r] = in[j];
      } else {
        for (int64_t j = 0; j < dp; ++j) o[j * b + r] = 0.f;
      }
    }
  }
  return out;
}

void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a float tensor, got ", t.scalar_type());
}

void check_pair(const at::Tensor& x, const at::Tensor& c) {
  check_features(x, "x");
  check_features(c, "groups");
  TORCH_CHECK(c.size(0) >= 1, "groups must have at least one row");
  TORCH_CHECK(x.size(1) == c.size(1), "x ", x.sizes(), " and groups ", c.sizes(), " differ in D");
}

// ---------------------------------------------------------------------------------------------
// assign: per row block, running (max, argmax) over 32 lanes per row across all group panels,
// then a lane reduction that keeps the smallest index among equal maxima.
std::tuple<at::Tensor, at::Tensor> assign_cpu(const at::Tensor& x, const at::Tensor& groups) {
  check_pair(x, groups);
  const int64_t n = x.size(0), d = x.size(1), k = groups.size(0);
  TORCH_CHECK(k <= std::numeric_limits<int32_t>::max(), "too many groups: ", k);
  at::Tensor index = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor score = at::empty({n}, x.options().dtype(at::kFloat));
  if (n == 0) return {index, score};
  const int64_t dp = round_up(d, 16), np = round_up(n, kMR), kp = round_up(k, kNR);
  const at::Tensor xb = pack_rows(float_rows(x, dp), kMR, np);
  const at::Tensor cb = pack_rows(float_rows(groups, dp), kNR, kp);
  const float* xbp = xb.data_ptr<float>();
  const float* cbp = cb.data_ptr<float>();
  int64_t* index_p = index.data_ptr<int64_t>();
  float* score_p = score.data_ptr<float>();
  const MicroKernels& mk = micro_kernels();
  const int64_t tasks = ceil_div(np, kAssignRows), panels = kp / kNR;

#pragma omp parallel num_threads(at::get_num_threads()) if (n * k * d >= kParallelWork)
  {
    std::vector<float> best(kAssignRows * kNR);
    std::vector<int32_t> arg(kAssignRows * kNR);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t r0 = t * kAssignRows, r1 = std::min(np, r0 + kAssignRows);
      std::fill(best.begin(), best.end(), kNegInf);
      std::fill(arg.begin(), arg.end(), 0);
      for (int64_t pnl = 0; pnl < panels; ++pnl) {
        const float* panel = cbp + pnl * dp * kNR;
        for (int64_t r = r0; r < r1; r += kMR)
          mk.tile_argmax(xbp + r * dp, panel, dp, pnl * kNR, k - pnl * kNR,
                         best.data() + (r - r0) * kNR, arg.data() + (r - r0) * kNR);
      }
      for (int64_t r = r0; r < std::min(r1, n); ++r) {
        const float* b = best.data() + (r - r0) * kNR;
        const int32_t* a = arg.data() + (r - r0) * kNR;
        float top = b[0];
        int32_t top_index = a[0];
        for (int64_t j = 1; j < kNR; ++j)
          if (b[j] > top || (b[j] == top && a[j] < top_index)) {
            top = b[j];
            top_index = a[j];
          }
        index_p[r] = top_index;
        // no finite or +inf score beat -inf: the row's scores are all NaN (non-finite input)
        score_p[r] = top == kNegInf ? std::numeric_limits<float>::quiet_NaN() : top;
      }
    }
  }
  return {index, score};
}

// ---------------------------------------------------------------------------------------------
// group_stats: a stable counting sort of the rows by group, then each group's rows are summed in
// row order by one thread (deterministic and race-free).

// sums[g] += x[order[pos]] for pos in [start[g], start[g + 1]).
template <typename scalar_t>
void sum_groups(const scalar_t* x, int64_t d, int64_t k, const int64_t* start, const int64_t* order,
                float* sums) {
  const int64_t n = start[k];
#pragma omp parallel for schedule(guided) num_threads(at::get_num_threads()) if ((n + k) * d >= kParallelCopy)
  for (int64_t g = 0; g < k; ++g) {
    float* row = sums + g * d;
    for (int64_t pos = start[g]; pos < start[g + 1]; ++pos) {
      const scalar_t* src = x + order[pos] * d;
      for (int64_t j = 0; j < d; ++j) row[j] += static_cast<float>(src[j]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> group_stats_cpu(const at::Tensor& x, const at::Tensor& index,
                                                    int64_t num_groups) {
  check_features(x, "x");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == x.size(0), "index must be [N] with N = ", x.size(0),
              ", got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  const int64_t n = x.size(0), d = x.size(1), k = num_groups;
  const at::Tensor xc = x.contiguous(), ic = index.contiguous();
  at::Tensor sums = at::zeros({k, d}, x.options().dtype(at::kFloat));
  at::Tensor counts = at::zeros({k}, x.options().dtype(at::kLong));
  const int64_t* idx = ic.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < k, "index[", i, "] = ", idx[i], " is outside [0, ", k, ")");
    ++cnt[idx[i]];
  }
  std::vector<int64_t> start(k + 1, 0), order(n);
  for (int64_t g = 0; g < k; ++g) start[g + 1] = start[g] + cnt[g];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[next[idx[i]]++] = i;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "smog_group_stats", [&] {
    sum_groups(xc.data_ptr<scalar_t>(), d, k, start.data(), order.data(), sums.data_ptr<float>());
  });
  return {sums, counts};
}

// ---------------------------------------------------------------------------------------------
// momentum_update: rows with count > 0 become normalize(beta * c + (1 - beta) * sum / count)
// (float32 arithmetic, norm clamped at 1e-12 like F.normalize); other rows are copied unchanged.
template <typename scalar_t>
void update_rows(const scalar_t* c, const float* sums, const int64_t* counts, int64_t k, int64_t d,
                 float beta, float one_minus_beta, scalar_t* out) {
#pragma omp parallel num_threads(at::get_num_threads()) if (k * d >= kParallelCopy)
  {
    std::vector<float> v(d);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < k; ++g) {
      const scalar_t* cg = c + g * d;
      scalar_t* og = out + g * d;
      if (counts[g] <= 0) {
        std::copy(cg, cg + d, og);
        continue;
      }
      const float count = static_cast<float>(counts[g]);
      float sq = 0.f;
      for (int64_t j = 0; j < d; ++j) {
        v[j] = beta * static_cast<float>(cg[j]) + one_minus_beta * (sums[g * d + j] / count);
        sq += v[j] * v[j];
      }
      const float norm = std::max(std::sqrt(sq), 1e-12f);
      for (int64_t j = 0; j < d; ++j) og[j] = static_cast<scalar_t>(v[j] / norm);
    }
  }
}

at::Tensor momentum_update_cpu(const at::Tensor& groups, const at::Tensor& sums,
                               const at::Tensor& counts, double beta) {
  check_features(groups, "groups");
  TORCH_CHECK(sums.sizes() == groups.sizes(), "sums ", sums.sizes(), " must match groups ",
              groups.sizes());
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == groups.size(0), "counts must be [K], got ",
              counts.sizes());
  const int64_t k = groups.size(0), d = groups.size(1);
  const at::Tensor cc = groups.contiguous();
  const at::Tensor sc = sums.to(at::kFloat).contiguous(), nc = counts.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(cc, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cc.scalar_type(), "smog_momentum_update", [&] {
    update_rows(cc.data_ptr<scalar_t>(), sc.data_ptr<float>(), nc.data_ptr<int64_t>(), k, d,
                static_cast<float>(beta), static_cast<float>(1.0 - beta), out.data_ptr<scalar_t>());
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// loss_forward: per block of rows, stream over tiles of kColBlock groups: scores (scaled by
// inv_t) -> online max / sum of exponentials per row -> acc += softmax-weights @ groups, with
// acc rescaled whenever a row's max grows. Target logits are read from the score tiles, so they
// are the very values the log-sum-exp saw (a one-group loss is exactly 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward_cpu(const at::Tensor& p,
                                                                 const at::Tensor& groups,
                                                                 const at::Tensor& targets,
                                                                 double inv_temperature) {
  check_pair(p, groups);
  TORCH_CHECK(targets.dim() == 2 && targets.size(1) == p.size(0), "targets must be [T, N] with N = ",
              p.size(0), ", got shape ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  const int64_t n = p.size(0), d = p.size(1), k = groups.size(0), nt = targets.size(0);
  const float inv_t = static_cast<float>(inv_temperature);
  at::Tensor lse = at::empty({n}, p.options().dtype(at::kFloat));
  at::Tensor target_logits = at::empty({nt, n}, p.options().dtype(at::kFloat));
  at::Tensor attention = at::empty({n, d}, p.options().dtype(at::kFloat));
  if (n == 0) return {lse, target_logits, attention};
  const at::Tensor tc = targets.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t i = 0; i < nt * n; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < k, "target ", tp[i], " is outside [0, ", k, ")");
  const int64_t dp = round_up(d, 16), np = round_up(n, kMR), kp = round_up(k, kNR);
  const at::Tensor cf = float_rows(groups, dp);
  const at::Tensor pb = pack_rows(float_rows(p, dp), kMR, np), cb = pack_rows(cf, kNR, kp);
  const float *pbp = pb.data_ptr<float>(), *cfp = cf.data_ptr<float>(), *cbp = cb.data_ptr<float>();
  float *lse_p = lse.data_ptr<float>(), *tl_p = target_logits.data_ptr<float>();
  float* att_p = attention.data_ptr<float>();
  const MicroKernels& mk = micro_kernels();
  const int64_t tasks = ceil_div(np, kLossRows);

#pragma omp parallel num_threads(at::get_num_threads()) if (n * k * d >= kParallelWork)
  {
    std::vector<float> s(kLossRows * kColBlock), acc(kLossRows * dp), mx(kLossRows), sum(kLossRows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t r0 = t * kLossRows, rows = std::min(np, r0 + kLossRows) - r0;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), kNegInf);
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t c0 = 0; c0 < kp; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, kp - c0);
        for (int64_t j = 0; j < cols; j += kNR) {
          const float* panel = cbp + (c0 + j) * dp;
          for (int64_t r = 0; r < rows; r += kMR)
            mk.tile_scores(pbp + (r0 + r) * dp, panel, dp, inv_t, k - c0 - j, s.data() + r * kColBlock + j,
                           kColBlock);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s.data() + r * kColBlock;
          for (int64_t tt = 0; r0 + r < n && tt < nt; ++tt) {  // target logits inside this tile
            const int64_t col = tp[tt * n + r0 + r] - c0;
            if (col >= 0 && col < cols) tl_p[tt * n + r0 + r] = sr[col];
          }
          const float top = std::max(mx[r], mk.max_of(sr, cols));
          if (top > mx[r] && sum[r] > 0.f) {
            const float rescale = std::exp(mx[r] - top);
            sum[r] *= rescale;
            float* ar = acc.data() + r * dp;
            for (int64_t j = 0; j < dp; ++j) ar[j] *= rescale;
          }
          mx[r] = top;
          sum[r] += mk.exp_shift_sum(sr, cols, top);
        }
        // softmax weights of padded columns are 0: stop at column k
        mk.gemm_acc(rows, std::min(cols, k - c0), s.data(), kColBlock, cfp + c0 * dp, dp, acc.data(), dp, dp);
      }
      for (int64_t r = 0; r < std::min(rows, n - r0); ++r) {
        const int64_t row = r0 + r;
        lse_p[row] = mx[r] + std::log(sum[r]);
        const float inv_sum = 1.f / sum[r];
        for (int64_t j = 0; j < d; ++j) att_p[row * d + j] = acc[r * dp + j] * inv_sum;
      }
    }
  }
  return {lse, target_logits, attention};
}

// ---------------------------------------------------------------------------------------------
// loss_group_grad: G[k] = inv_t * sum_b w_b exp(inv_t <p_b, c_k> - lse_b) p_b. A task owns a
// tile of kColBlock groups and a fixed share of the rows (several shares only when there are
// few group tiles; their partial sums are added in a fixed order). It streams over its rows
// in tiles of kColBlock: transposed scores S^T [groups][rows] -> weighted softmax in place ->
// G_tile += S^T @ p_tile.
at::Tensor loss_group_grad_cpu(const at::Tensor& p, const at::Tensor& groups, const at::Tensor& lse,
                                  const at::Tensor& row_weight, double inv_temperature) {
  check_pair(p, groups);
  const int64_t n = p.size(0), d = p.size(1), k = groups.size(0);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "lse must be [N], got ", lse.sizes());
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == n, "row_weight must be [N], got ",
              row_weight.sizes());
  const float inv_t = static_cast<float>(inv_temperature);
  const int64_t dp = round_up(d, 16), np = round_up(std::max<int64_t>(n, 1), kColBlock);
  const int64_t kp = round_up(k, kColBlock);
  const at::Tensor pf = float_rows(p, dp);
  const at::Tensor pp = pack_rows(pf, kNR, np);
  const at::Tensor cb = pack_rows(float_rows(groups, dp), kMR, round_up(k, kMR));
  // per-row shift and weight, zero for the padding rows n..np (their softmax weight is 0)
  const at::Tensor shift = at::zeros({np}, p.options().dtype(at::kFloat));
  const at::Tensor weight = at::zeros({np}, p.options().dtype(at::kFloat));
  shift.narrow(0, 0, n).copy_(lse);
  weight.narrow(0, 0, n).copy_(row_weight);
  const float *pfp = pf.data_ptr<float>(), *ppp = pp.data_ptr<float>(), *cbp = cb.data_ptr<float>();
  const float *shp = shift.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const MicroKernels& mk = micro_kernels();

  // Row shares per group tile: a fixed number (not the thread count), so that results do not
  // depend on the number of threads.
  const int64_t ctiles = kp / kColBlock, rtiles = np / kColBlock;
  const int64_t splits = std::min(rtiles, std::max<int64_t>(1, ceil_div(16, ctiles)));
  const int64_t rtiles_per_split = ceil_div(rtiles, splits);
  at::Tensor partial = at::zeros({splits, kp, dp}, p.options().dtype(at::kFloat));
  float* part_p = partial.data_ptr<float>();

#pragma omp parallel num_threads(at::get_num_threads()) if (n * k * d >= kParallelWork)
  {
    std::vector<float> st(kColBlock * kColBlock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ctiles * splits; ++task) {
      const int64_t ct = task / splits, split = task % splits;
      const int64_t c0 = ct * kColBlock, crows = round_up(std::min(kColBlock, k - c0), kMR);
      float* g = part_p + (split * kp + c0) * dp;
      const int64_t rt_end = std::min(rtiles, (split + 1) * rtiles_per_split);
      for (int64_t rt = split * rtiles_per_split; rt < rt_end; ++rt) {
        const int64_t b0 = rt * kColBlock;
        for (int64_t j = 0; j < kColBlock; j += kNR)
          for (int64_t q = 0; q < crows; q += kMR)
            mk.tile_scores(cbp + (c0 + q) * dp, ppp + (b0 + j) * dp, dp, inv_t, kNR,
                           st.data() + q * kColBlock + j, kColBlock);
        for (int64_t q = 0; q < crows; ++q)
          mk.exp_columns(st.data() + q * kColBlock, kColBlock, shp + b0, wp + b0);
        // columns (rows of p) n..np have weight 0: stop at row n
        mk.gemm_acc(crows, std::min(kColBlock, n - b0), st.data(), kColBlock, pfp + b0 * dp, dp, g, dp, dp);
      }
    }
  }
  at::Tensor total = partial[0];
  for (int64_t sp = 1; sp < splits; ++sp) total.add_(partial[sp]);
  return total.narrow(0, 0, k).narrow(1, 0, d).mul(inv_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(smog, CPU, m) {
  m.impl("assign", &assign_cpu);
  m.impl("group_stats", &group_stats_cpu);
  m.impl("momentum_update", &momentum_update_cpu);
  m.impl("loss_forward", &loss_forward_cpu);
  m.impl("loss_group_grad", &loss_group_grad_cpu);
}

}  // namespace smog::cpu
