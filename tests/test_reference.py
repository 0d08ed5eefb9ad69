"""The reference ops against the spec written out the slow, literal way, and gradcheck in float64."""
from __future__ import annotations

import math

import pytest
import torch

import smog_kernels as sk
from smog_kernels import reference as ref
from tests.conftest import unit_rows


def test_assign_is_the_first_maximal_inner_product(generator):
    x = unit_rows(40, 5, torch.float64, "cpu", generator)
    c = unit_rows(9, 5, torch.float64, "cpu", generator)
    c[6] = c[2]  # exact tie between groups 2 and 6
    x[0] = c[2]
    index, score = ref.assign(x, c)
    for i in range(40):
        scores = [float(x[i] @ c[k]) for k in range(9)]
        assert int(index[i]) == scores.index(max(scores))
        assert float(score[i]) == pytest.approx(max(scores))
    assert int(index[0]) == 2


def test_stats_and_update_follow_the_spec_row_by_row(generator):
    k, d = 6, 4
    x = unit_rows(25, d, torch.float64, "cpu", generator)
    index = torch.randint(0, 4, (25,), generator=generator)  # groups 4 and 5 stay empty
    c = unit_rows(k, d, torch.float64, "cpu", generator)
    beta = 0.9
    sums, counts = ref.group_stats(x, index, k)
    updated = ref.momentum_update(c, sums, counts, beta)
    for g in range(k):
        members = x[index == g]
        assert int(counts[g]) == len(members)
        if len(members) == 0:
            assert torch.equal(updated[g], c[g])
            continue
        moved = beta * c[g] + (1 - beta) * members.mean(0)
        assert torch.allclose(updated[g], moved / moved.norm())


def test_loss_is_the_mean_cross_entropy_over_targets(generator):
    p = unit_rows(7, 5, torch.float64, "cpu", generator)
    c = unit_rows(4, 5, torch.float64, "cpu", generator)
    targets = torch.randint(0, 4, (2, 7), generator=generator)
    tau = 0.2
    expected = []
    for t in range(2):
        for b in range(7):
            logits = (p[b] @ c.T) / tau
            expected.append(float(torch.logsumexp(logits, 0) - logits[targets[t, b]]))
    got = ref.group_contrastive_loss(p, c, targets, tau, reduction="none")
    assert got.shape == (2, 7)
    assert torch.allclose(got.flatten(), torch.tensor(expected, dtype=torch.float64))
    assert float(ref.group_contrastive_loss(p, c, targets, tau)) == pytest.approx(sum(expected) / 14)
    assert float(ref.group_contrastive_loss(p, c, targets, tau, "sum")) == pytest.approx(sum(expected))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_targets", [1, 2])
def test_reference_loss_gradcheck(reduction, num_targets, generator):
    p = unit_rows(6, 5, torch.float64, "cpu", generator).requires_grad_()
    c = unit_rows(4, 5, torch.float64, "cpu", generator).requires_grad_()
    targets = torch.randint(0, 4, (num_targets, 6), generator=generator).squeeze(0)

    def loss(p, c):
        return ref.group_contrastive_loss(p, c, targets, 0.3, reduction, grad_groups=True)

    assert torch.autograd.gradcheck(loss, (p, c))


def test_reference_momentum_update_gradcheck(generator):
    """The grad-into-groups variant differentiates the update with respect to the member rows."""
    x = unit_rows(9, 4, torch.float64, "cpu", generator).requires_grad_()
    c = unit_rows(3, 4, torch.float64, "cpu", generator)
    index = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0, 0])  # group 2 empty

    def update(x):
        sums, counts = ref.group_stats(x, index, 3)
        return ref.momentum_update(c, sums, counts, 0.7)

    assert torch.autograd.gradcheck(update, (x,))


def test_grouping_step_follows_the_spec_order(generator):
    """Targets and assignment against G before the update, loss against G' after it."""
    k, n, d = 11, 13, 8
    g = unit_rows(k, d, torch.float32, "cpu", generator)
    target_rows = unit_rows(2 * n, d, torch.float32, "cpu", generator).view(2, n, d)
    update_rows = unit_rows(n, d, torch.float32, "cpu", generator)
    predictions = unit_rows(3 * n, d, torch.float32, "cpu", generator).view(3, n, d)
    step = sk.grouping_step(g, target_rows, update_rows, predictions, 0.95, 0.1, backend="reference")

    targets = torch.stack([ref.assign(target_rows[t], g)[0] for t in range(2)])
    index, _ = ref.assign(update_rows, g)
    sums, counts = ref.group_stats(update_rows, index, k)
    updated = ref.momentum_update(g, sums, counts, 0.95)
    losses = [ref.group_contrastive_loss(predictions[v], updated, targets[t], 0.1)
              for t in range(2) for v in range(3)]
    assert torch.equal(step.targets, targets) and torch.equal(step.index, index)
    assert torch.equal(step.counts, counts)
    assert torch.allclose(step.groups, updated)
    assert torch.allclose(step.loss, torch.stack(losses).mean())


def test_momentum_update_by_hand():
    """beta = 0.5, c = e0: one member e1 -> (e0 + e1) / sqrt 2; two members e1 -> the same (the mean);
    no member -> e0 unchanged. 16-bit groups come back in their dtype."""
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    sums = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    counts = torch.tensor([1, 2, 0])
    half = 2.0 ** -0.5
    want = torch.tensor([[half, half], [half, half], [1.0, 0.0]])
    torch.testing.assert_close(ref.momentum_update(c, sums, counts, 0.5), want, rtol=0, atol=1e-7)
    out = ref.momentum_update(c.bfloat16(), sums, counts, 0.5)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.bfloat16())


def test_loss_keeps_the_groups_out_of_the_graph_by_default(generator):
    p = unit_rows(5, 4, torch.float32, "cpu", generator).requires_grad_()
    c = unit_rows(3, 4, torch.float32, "cpu", generator).requires_grad_()
    ref.group_contrastive_loss(p, c, torch.tensor([0, 1, 2, 0, 1]), 0.5).backward()
    assert c.grad is None and p.grad is not None


def test_reference_kmeans_defaults_are_ten_rounds_from_seed_zero(generator):
    """spherical_kmeans(x, k): 10 Lloyd rounds from the K rows drawn with seed 0, written out here."""
    from smog_kernels.kmeans import initial_groups

    x = unit_rows(60, 5, torch.float32, "cpu", generator)
    c = initial_groups(x, 4, 0)
    for _ in range(10):
        index = (x.double() @ c.double().T).argmax(1)
        for g in range(4):
            if (index == g).any():
                c[g] = torch.nn.functional.normalize(x[index == g].double().mean(0), dim=0).float()
    groups, members = ref.spherical_kmeans(x, 4)
    torch.testing.assert_close(groups, c, rtol=0, atol=1e-6)
    assert torch.equal(members, (x.double() @ groups.double().T).argmax(1))


def test_reference_kmeans_starts_from_init(generator):
    """init [K, D] replaces the seeded draw: one round is the normalised member means under init."""
    x = unit_rows(40, 5, torch.float32, "cpu", generator)
    init = unit_rows(3, 5, torch.float32, "cpu", generator)
    index = (x.double() @ init.double().T).argmax(1)
    want = init.clone()
    for g in range(3):
        if (index == g).any():
            want[g] = torch.nn.functional.normalize(x[index == g].double().mean(0), dim=0).float()
    groups, _ = ref.spherical_kmeans(x, 3, iters=1, init=init)
    torch.testing.assert_close(groups, want, rtol=0, atol=1e-6)


def test_reference_backend_runs_anywhere():
    assert ref.REFERENCE.available() and ref.REFERENCE.supports(torch.device("meta"))


def test_reference_loss_kernels_by_hand(generator):
    """loss_forward -> (lse [N], target logits [T, N], sum_k softmax_nk g_k [N, D]); loss_group_grad ->
    inv_t * sum_n w_n softmax_nk p_n [K, D]; logits = <p, g> * inv_t."""
    p = unit_rows(6, 4, torch.float64, "cpu", generator)
    g = unit_rows(3, 4, torch.float64, "cpu", generator)
    targets = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    w = torch.arange(1.0, 7.0, dtype=torch.float64)
    inv_t = 5.0
    lse, target_logits, attention = ref.loss_forward(p, g, targets, inv_t)
    for n in range(6):
        logits = [float(p[n] @ g[k]) * inv_t for k in range(3)]
        total = sum(math.exp(v) for v in logits)  # in float64, as the inputs
        assert float(lse[n]) == pytest.approx(math.log(total))
        for t in range(2):
            assert float(target_logits[t, n]) == pytest.approx(logits[int(targets[t, n])])
        soft = [math.exp(v) / total for v in logits]
        torch.testing.assert_close(attention[n].double(), sum(soft[k] * g[k] for k in range(3)))
    grad = ref.loss_group_grad(p, g, lse, w, inv_t)
    for k in range(3):
        want = sum(float(w[n]) * float((p[n] @ g[k] * inv_t - lse[n]).exp()) * p[n] for n in range(6)) * inv_t
        torch.testing.assert_close(grad[k].double(), want)
