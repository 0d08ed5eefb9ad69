"""grouping_step's wiring against a step written out with smog_kernels.reference: a statistics reducer
(plain and gathering), one group, and the gradient into the update rows with grad_groups."""
from __future__ import annotations

import pytest
import torch

import smog_kernels as sk
from smog_kernels import reference as ref
from smog_kernels.distributed import GroupStatsSync
from tests.conftest import unit_rows

K, N, D, BETA, TAU = 7, 10, 8, 0.8, 0.2


def inputs(generator, k=K):
    g = unit_rows(k, D, torch.float32, "cpu", generator)
    target_rows = unit_rows(2 * N, D, torch.float32, "cpu", generator).view(2, N, D)
    update_rows = unit_rows(N, D, torch.float32, "cpu", generator)
    predictions = unit_rows(3 * N, D, torch.float32, "cpu", generator).view(3, N, D)
    return g, target_rows, update_rows, predictions


def reference_step(g, target_rows, update_rows, predictions, other_rows=None, grad_groups=False):
    """(loss, G', targets, index, counts) by the spec; other_rows [M', D]: another process's update rows,
    whose statistics add to this process's; grad_groups: the loss differentiates through G'."""
    targets = torch.stack([ref.assign(t, g)[0] for t in target_rows])
    index = ref.assign(update_rows, g)[0]
    members, member_index = update_rows, index
    if other_rows is not None:
        members = torch.cat([update_rows, other_rows])
        member_index = torch.cat([index, ref.assign(other_rows, g)[0]])
    sums, counts = ref.group_stats(members, member_index, g.shape[0])
    updated = ref.momentum_update(g, sums, counts, BETA)
    loss = torch.stack([ref.group_contrastive_loss(p, updated, t, TAU, "mean", grad_groups) for t in targets for p in predictions]).mean()
    return loss, updated, targets, index, counts


def assert_step(step, want) -> None:
    loss, updated, targets, index, counts = want
    assert torch.equal(step.targets, targets) and torch.equal(step.index, index)
    assert torch.equal(step.counts, counts)
    torch.testing.assert_close(step.groups, updated, rtol=0, atol=1e-6)
    torch.testing.assert_close(step.loss, loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_reducer_adds_the_other_processes_statistics(backend, generator):
    """reduce_stats(sums, counts) -> the global statistics: G' moves by the mean over both processes' rows,
    the counts are global, and targets, index and loss stay this process's."""
    g, target_rows, update_rows, predictions = inputs(generator)
    other_rows = unit_rows(2 * N, D, torch.float32, "cpu", generator)
    other = ref.group_stats(other_rows, ref.assign(other_rows, g)[0], K)

    def reducer(sums, counts):
        return sums + other[0], counts + other[1]

    step = sk.grouping_step(g, target_rows, update_rows, predictions, BETA, TAU, reduce_stats=reducer, backend=backend)
    assert_step(step, reference_step(g, target_rows, update_rows, predictions, other_rows))


@pytest.mark.parametrize("grad_groups", [False, True])
def test_a_gathering_reducer_is_given_the_rows(grad_groups, generator):
    """A GroupStatsSync (one process: the local statistics) gets the update rows themselves; with
    grad_groups the gradient reaches them through its statistics (on the step's statistics backend)."""
    g, target_rows, update_rows, predictions = inputs(generator)
    z = update_rows.clone().requires_grad_()
    step = sk.grouping_step(g, target_rows, z, predictions, BETA, TAU, grad_groups, reduce_stats=GroupStatsSync())
    assert_step(step, reference_step(g, target_rows, update_rows, predictions))
    if grad_groups:
        step.loss.backward()
        want_z = update_rows.clone().requires_grad_()
        reference_step(g, target_rows, want_z, predictions, grad_groups=True)[0].backward()
        torch.testing.assert_close(z.grad, want_z.grad, rtol=1e-5, atol=1e-7)


def test_one_group_takes_every_row(generator):
    g, target_rows, update_rows, predictions = inputs(generator, k=1)
    step = sk.grouping_step(g, target_rows, update_rows, predictions, BETA, TAU)
    assert int(step.counts[0]) == N and not step.targets.any()
    assert_step(step, reference_step(g, target_rows, update_rows, predictions))


def test_grad_groups_lets_the_gradient_reach_the_update_rows(generator):
    """With grad_groups the gradient reaches the update rows through G' (which it does not by default), as
    the reference step differentiated through G' gives it."""
    g, target_rows, update_rows, predictions = inputs(generator)
    grads = []
    for grad_groups in (False, True):
        z = update_rows.clone().requires_grad_()
        p = predictions.clone().requires_grad_()
        step = sk.grouping_step(g, target_rows, z, p, BETA, TAU, grad_groups=grad_groups)
        step.loss.backward()
        grads.append(z.grad)
        assert step.groups.requires_grad == grad_groups  # G' carries the graph to the update rows iff grad_groups
    assert grads[0] is None  # by default G' is detached: no gradient reaches the update rows
    z = update_rows.clone().requires_grad_()
    reference_step(g, target_rows, z, predictions, grad_groups=True)[0].backward()
    torch.testing.assert_close(grads[1], z.grad, rtol=1e-5, atol=1e-7)


def test_a_tensor_beta_is_read_as_its_value(generator):
    """beta as a 0-dim float32 tensor (what a captured CUDA graph passes) moves the groups as the float."""
    g, target_rows, update_rows, predictions = inputs(generator)
    step = sk.grouping_step(g, target_rows, update_rows, predictions, torch.tensor(BETA), TAU)
    assert_step(step, reference_step(g, target_rows, update_rows, predictions))


def test_the_backend_is_chosen_for_the_step_at_its_k(monkeypatch, generator):
    """backend="auto" asks for the "step" figures (a tuned table's op) at the rows [T, N, D] and K groups."""
    from smog_kernels import registry, step as step_module

    asked = []

    def resolve(backend, rows, num_groups=None, op=None):
        asked.append((backend, tuple(rows.shape), num_groups, op))
        return registry.resolve(backend, rows, num_groups, op)

    monkeypatch.setattr(step_module, "resolve", resolve)
    g, target_rows, update_rows, predictions = inputs(generator)
    sk.grouping_step(g, target_rows, update_rows, predictions, BETA, TAU)
    assert asked == [("auto", (2, N, D), K, "step")]


def test_a_gathering_reducer_uses_the_steps_backend(monkeypatch, generator):
    """An explicit backend reaches the reducer's statistics too."""
    from smog_kernels import distributed, registry

    asked = []

    def resolve(backend, rows, *args):
        asked.append(backend)
        return registry.resolve(backend, rows, *args)

    monkeypatch.setattr(distributed, "resolve", resolve)
    g, target_rows, update_rows, predictions = inputs(generator)
    sk.grouping_step(g, target_rows, update_rows, predictions, BETA, TAU, reduce_stats=GroupStatsSync(),
                     backend="reference")
    assert asked == ["reference"]
