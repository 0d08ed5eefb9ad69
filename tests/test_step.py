"""grouping_step's wiring against a step written out with smog_kernels.reference: a statistics reducer
(plain and gathering), one group, and the gradient into the update rows with grad_groups."""
from __future__ import annotations

import pytest
import torch

import smog_kernels as sk
from smog_kernels import reference as ref
from smog_kernels.backend import ASSIGN_AND_STATS
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
        flag = {"grad_groups": True} if grad_groups else {}  # off by default
        step = sk.grouping_step(g, target_rows, z, p, BETA, TAU, **flag)
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


class Recording:
    """A backend that runs `inner`'s ops and records their names. fused: it declares ASSIGN_AND_STATS, its
    assign_and_stats being inner's assign of every row and group_stats of the rows x[stats_from:]."""

    def __init__(self, inner, fused: bool):
        self.inner, self.name, self.calls = inner, inner.name, []
        self.capabilities = inner.capabilities | {ASSIGN_AND_STATS} if fused else inner.capabilities

    def __getattr__(self, op):
        def recorded(*args, **kwargs):
            self.calls.append(op)
            return getattr(self.inner, op)(*args, **kwargs)
        return recorded

    def assign_and_stats(self, x, groups, stats_from):
        self.calls.append("assign_and_stats")
        index, score = self.inner.assign(x, groups)
        return (index, score, *self.inner.group_stats(x[stats_from:], index[stats_from:], groups.shape[0]))


@pytest.mark.parametrize("name, fused, grad_groups, first", [
    ("cpu", False, False, ["assign", "group_stats", "momentum_update"]),  # every op on the step's backend
    ("reference", True, False, ["assign_and_stats", "momentum_update"]),  # the statistics from the first pass
    ("cpu", True, True, ["assign"]),  # grad_groups: statistics and update on the reference (autograd)
])
def test_each_phase_runs_on_the_steps_backend(monkeypatch, generator, name, fused, grad_groups, first):
    from smog_kernels import registry
    from smog_kernels import step as step_module

    backend = Recording(registry.get(name), fused)
    monkeypatch.setattr(step_module, "resolve", lambda *args: backend)
    g, target_rows, update_rows, predictions = inputs(generator)
    z = update_rows.clone().requires_grad_(grad_groups)
    step = sk.grouping_step(g, target_rows, z, predictions, BETA, TAU, grad_groups=grad_groups)
    assert_step(step, reference_step(g, target_rows, update_rows, predictions))
    loss_ops = backend.calls[len(first):]
    assert backend.calls[:len(first)] == first and loss_ops and set(loss_ops) <= LOSS_OPS, backend.calls


LOSS_OPS = {"loss_forward", "group_contrastive_loss"}


def test_a_completed_cycle_and_an_accumulating_grad_groups_cycle_say_what_to_do(generator):
    g, target_rows, update_rows, predictions = inputs(generator)
    cycle = sk.GroupingCycle(g, TAU)
    cycle.step(target_rows, update_rows, predictions, BETA)
    with pytest.raises(RuntimeError, match=r"^this GroupingCycle has completed \(its last sub-batch ran\): "
                                           r"start a new cycle$"):
        cycle.step(target_rows, update_rows, predictions, BETA)
    with pytest.raises(ValueError, match=r"^grad_groups=True cannot accumulate sub-batches: the gradient through "
                                         r"G' would have to reach the earlier sub-batches' rows \(run each step "
                                         r"as one sub-batch\)$"):
        sk.GroupingCycle(g, TAU, grad_groups=True).step(target_rows, update_rows, predictions, BETA, last=False)


def test_the_counts_of_rows_kept_for_a_gathering_reducer_live_on_the_index_device():
    from smog_kernels.step import _counts

    index = torch.tensor([2, 0, 2], device="meta")
    counts = _counts([(None, index), (None, index[:1])], 4)
    assert counts.device.type == "meta" and counts.shape == (4,) and counts.dtype == torch.int64
