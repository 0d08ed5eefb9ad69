// C++ test of the smog:: operators: calls them through the dispatcher on random inputs and
// compares with naive double-precision loops written here. Exits non-zero on any mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

std::string shape(int64_t n, int64_t k, int64_t d) {
  return "(N=" + std::to_string(n) + ", K=" + std::to_string(k) + ", D=" + std::to_string(d) + ")";
}

at::Tensor unit_rows(int64_t rows, int64_t d) {
  at::Tensor t = at::randn({rows, d});
  return t / t.norm(2, {1}, true);
}

double dot(const at::Tensor& a, int64_t i, const at::Tensor& b, int64_t j) {
  auto pa = a.accessor<float, 2>();
  auto pb = b.accessor<float, 2>();
  double s = 0;
  for (int64_t q = 0; q < a.size(1); ++q) s += double(pa[i][q]) * double(pb[j][q]);
  return s;
}

// max |a - b| / (max |b| + 1e-30) over all elements, in double
double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  return (ad - bd).abs().max().item<double>() / (bd.abs().max().item<double>() + 1e-30);
}

auto op_assign() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("smog::assign", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
}
auto op_group_stats() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("smog::group_stats", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
}
auto op_momentum_update() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("smog::momentum_update", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
}
auto op_loss_forward() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("smog::loss_forward", "")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, double)>();
}
auto op_loss_group_grad() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("smog::loss_group_grad", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
}

// x: float32 [N, D] features (what the op sees may be a non-contiguous or 16-bit version of it)
void test_assign(const at::Tensor& x_in, const at::Tensor& c_in, double tol, const std::string& name) {
  auto [index, score] = op_assign().call(x_in, c_in);
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), c = c_in.to(at::kFloat).contiguous();
  const int64_t n = x.size(0), k = c.size(0);
  auto idx = index.accessor<int64_t, 1>();
  auto sc = score.accessor<float, 1>();
  for (int64_t i = 0; i < n; ++i) {
    double best = -1e300;
    int64_t arg = 0;
    for (int64_t j = 0; j < k; ++j) {
      const double s = dot(x, i, c, j);
      if (s > best) best = s, arg = j;
    }
    const bool in_range = idx[i] >= 0 && idx[i] < k;
    expect(in_range, name + " assign index in range");
    if (!in_range) return;
    // a different argmax passes only when its score is within tolerance of the best
    const double chosen = dot(x, i, c, idx[i]);
    expect(idx[i] == arg || chosen >= best - tol, name + " assign row " + std::to_string(i));
    expect(std::abs(sc[i] - chosen) <= tol, name + " assign score row " + std::to_string(i));
  }
}

void test_assign_ties() {
  // every group duplicated: the first copy (smaller k) must win
  const int64_t n = 97, k = 37, d = 19;
  const at::Tensor half = unit_rows(k, d);
  const at::Tensor c = at::cat({half, half}, 0);
  const at::Tensor x = unit_rows(n, d);
  auto [index, score] = op_assign().call(x, c);
  expect(index.lt(k).all().item<bool>(), "assign ties go to the smallest k");
}

void test_stats_and_update(int64_t n, int64_t k, int64_t d, double beta) {
  const std::string name = shape(n, k, d) + " beta=" + std::to_string(beta);
  const at::Tensor x = unit_rows(n, d);
  // only the even groups get members: odd groups stay empty
  const at::Tensor index = at::randint(0, (k + 1) / 2, {n}, at::kLong) * 2;
  auto [sums, counts] = op_group_stats().call(x, index, k);
  auto xa = x.accessor<float, 2>();
  auto ia = index.accessor<int64_t, 1>();
  std::vector<double> ref(k * d, 0.0);
  std::vector<int64_t> cnt(k, 0);
  for (int64_t i = 0; i < n; ++i) {
    ++cnt[ia[i]];
    for (int64_t q = 0; q < d; ++q) ref[ia[i] * d + q] += xa[i][q];
  }
  auto sa = sums.accessor<float, 2>();
  auto ca = counts.accessor<int64_t, 1>();
  double err = 0;
  for (int64_t g = 0; g < k; ++g) {
    expect(ca[g] == cnt[g], name + " group_stats count of group " + std::to_string(g));
    for (int64_t q = 0; q < d; ++q) err = std::max(err, std::abs(sa[g][q] - ref[g * d + q]));
  }
  expect(err <= 1e-5 * std::max<int64_t>(1, n / std::max<int64_t>(1, k)) + 1e-5,
         name + " group_stats sums (max error " + std::to_string(err) + ")");

  const at::Tensor c = unit_rows(k, d);
  const at::Tensor moved = op_momentum_update().call(c, sums, counts, beta);
  auto cc = c.accessor<float, 2>();
  auto ma = moved.accessor<float, 2>();
  for (int64_t g = 0; g < k; ++g) {
    std::vector<double> v(d);
    double norm = 0;
    for (int64_t q = 0; q < d; ++q) {
      v[q] = cnt[g] > 0 ? beta * cc[g][q] + (1 - beta) * ref[g * d + q] / cnt[g] : cc[g][q];
      norm += v[q] * v[q];
    }
    norm = cnt[g] > 0 ? std::max(std::sqrt(norm), 1e-12) : 1.0;
    for (int64_t q = 0; q < d; ++q) {
      const double want = v[q] / norm;
      if (cnt[g] == 0) {
        expect(ma[g][q] == cc[g][q], name + " momentum_update keeps empty group " + std::to_string(g));
      } else if (std::abs(ma[g][q] - want) > 1e-5) {
        expect(false, name + " momentum_update row " + std::to_string(g));
        break;
      }
    }
  }
}

void test_loss(const at::Tensor& p_in, const at::Tensor& c_in, int64_t t, double tol, const std::string& name) {
  const double inv_t = 10.0;
  const at::Tensor p = p_in.to(at::kFloat).contiguous(), c = c_in.to(at::kFloat).contiguous();
  const int64_t n = p.size(0), k = c.size(0), d = p.size(1);
  const at::Tensor targets = at::randint(0, k, {t, n}, at::kLong);
  auto [lse, target_logits, attention] = op_loss_forward().call(p_in, c_in, targets, inv_t);
  at::Tensor ref_lse = at::empty({n}, at::kDouble), ref_tl = at::empty({t, n}, at::kDouble);
  at::Tensor ref_att = at::zeros({n, d}, at::kDouble), soft = at::empty({n, k}, at::kDouble);
  auto ca = c.accessor<float, 2>();
  auto ta = targets.accessor<int64_t, 2>();
  auto lse_a = ref_lse.accessor<double, 1>();
  auto tl_a = ref_tl.accessor<double, 2>();
  auto att_a = ref_att.accessor<double, 2>();
  auto soft_a = soft.accessor<double, 2>();
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> l(k);
    double m = -1e300, s = 0;
    for (int64_t j = 0; j < k; ++j) m = std::max(m, l[j] = inv_t * dot(p, i, c, j));
    for (int64_t j = 0; j < k; ++j) s += std::exp(l[j] - m);
    lse_a[i] = m + std::log(s);
    for (int64_t j = 0; j < k; ++j) {
      soft_a[i][j] = std::exp(l[j] - m) / s;
      for (int64_t q = 0; q < d; ++q) att_a[i][q] += soft_a[i][j] * ca[j][q];
    }
    for (int64_t u = 0; u < t; ++u) tl_a[u][i] = l[ta[u][i]];
  }
  expect(rel_err(lse, ref_lse) <= tol, name + " loss_forward lse");
  expect(rel_err(target_logits, ref_tl) <= tol, name + " loss_forward target logits");
  expect(rel_err(attention, ref_att) <= tol, name + " loss_forward attention");

  const at::Tensor weight = at::rand({n});
  const at::Tensor grad = op_loss_group_grad().call(p_in, c_in, lse, weight, inv_t);
  const at::Tensor ref_grad = inv_t * at::mm((soft * weight.to(at::kDouble).unsqueeze(1)).t(), p.to(at::kDouble));
  expect(rel_err(grad, ref_grad) <= tol, name + " loss_group_grad");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {1, 1, 3}, {7, 3, 64}, {256, 300, 128}, {1001, 301, 33}, {45, 3001, 16}};
  for (auto [n, k, d] : shapes) {
    const std::string name = shape(n, k, d);
    const at::Tensor x = unit_rows(n, d), c = unit_rows(k, d);
    test_assign(x, c, 1e-5, name);
    test_loss(x, c, 2, 1e-4, name);
    // non-contiguous views and 16-bit inputs
    const at::Tensor xt = unit_rows(d, n).t(), ct = at::cat({c, c}, 1).narrow(1, 0, d);
    test_assign(xt, ct, 1e-5, name + " strided");
    test_loss(xt, ct, 1, 1e-4, name + " strided");
    test_assign(x.to(at::kBFloat16), c.to(at::kBFloat16), 1e-5, name + " bfloat16");
    test_loss(x.to(at::kHalf), c.to(at::kHalf), 1, 1e-4, name + " float16");
    for (double beta : {0.0, 0.99, 1.0}) test_stats_and_update(n, k, d, beta);
  }
  test_assign_ties();
  if (failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all smog:: operator checks passed\n");
  return 0;
}
