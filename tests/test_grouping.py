"""smog_kernels.Grouping (SMoG's grouping as a module) and GroupingCycle (the grouping step over the
sub-batches of an accumulation cycle), against grouping_step, the reference and one process.

1. The module is grouping_step head by head (1 and 3 heads, reference and cpu backends): the loss, G',
   targets, assignments, counts and the gradient into the predictions, bit for bit.
2. A cycle of one sub-batch is grouping_step bit for bit; a cycle of A sub-batches moves the groups as one
   step on the whole batch (G' to float32 rounding, counts exactly), scores the sub-batches before the last
   against G and the last against G'; its statistics cross processes once, or as rows to a gathering
   reducer; grad_groups refuses to accumulate.
3. A state_dict saved mid-run and loaded into a fresh module continues bit for bit; in eval mode the groups
   stay; re-clustering is spherical k-means per head with seed + h.
4. Bad shapes and rows that are not L2-normalised get named errors; torch.compile traces a step with the
   module without a graph break (fake kernels).
5. Under DDP on 2 gloo processes the module equals one process holding the whole batch.
"""
from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import smog_kernels as sk
from smog_kernels import reference as ref
from tests.conftest import unit_rows
from tests.test_distributed import launch, seed_for

K, D, N, M, BETA, TAU = 9, 8, 12, 12, 0.6, 0.2
T, U, V = 2, 2, 3  # target sets, update-row sets, prediction views


def rows(generator, *shape: int) -> torch.Tensor:
    return unit_rows(int(torch.tensor(shape[:-1]).prod()), shape[-1], torch.float32, "cpu", generator).view(*shape)


def step_inputs(generator, n: int = N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target_rows [T, n, D], update_rows [U, n, D], predictions [V, n, D])."""
    return rows(generator, T, n, D), rows(generator, U, n, D), rows(generator, V, n, D)


def module(heads: int, generator, **kwargs) -> sk.Grouping:
    grouping = sk.Grouping(heads, K, D, TAU, **kwargs)
    grouping.groups.copy_(rows(generator, heads, K, D))
    return grouping


# ---- 1. the module is grouping_step head by head ---------------------------------------------------


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_module_is_grouping_step_head_by_head(heads, backend, generator):
    grouping = module(heads, generator, backend=backend)
    target_rows, update_rows, predictions = step_inputs(generator)
    groups = grouping.groups.clone()
    p = predictions.clone().requires_grad_()
    loss = grouping(target_rows, update_rows, p, BETA)
    loss.backward()

    p_each = predictions.clone().requires_grad_()
    steps = [sk.grouping_step(groups[h], target_rows, update_rows[h % U], p_each, BETA, TAU, backend=backend)
             for h in range(heads)]
    torch.stack([s.loss for s in steps]).mean().backward()
    assert torch.equal(loss, torch.stack([s.loss for s in steps]).mean())
    assert torch.equal(grouping.groups, torch.stack([s.groups for s in steps]))
    for field in ("targets", "index", "counts"):
        assert torch.equal(getattr(grouping.result, field), torch.stack([getattr(s, field) for s in steps])), field
    assert torch.equal(p.grad, p_each.grad)
    assert not torch.equal(grouping.groups, groups)  # the step moved them


def test_in_eval_mode_the_groups_stay(generator):
    grouping = module(2, generator).eval()
    groups = grouping.groups.clone()
    loss = grouping(*step_inputs(generator), BETA)
    assert torch.equal(grouping.groups, groups) and torch.isfinite(loss)
    assert not torch.equal(grouping.result.groups, groups)  # G' was computed (and scored), not kept


# ---- 2. cycles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_cycle_of_one_sub_batch_is_grouping_step(backend, generator):
    g = rows(generator, K, D)
    target_rows, update_rows, predictions = step_inputs(generator)
    cycle = sk.GroupingCycle(g, TAU, backend=backend).step(target_rows, update_rows[0], predictions, BETA)
    step = sk.grouping_step(g, target_rows, update_rows[0], predictions, BETA, TAU, backend=backend)
    for got, want in zip(cycle, step):
        assert torch.equal(got, want)


def hand_cycle(g, parts, other=None):
    """(losses of the sub-batches, G', counts) of a cycle by the spec: targets and assignments under G,
    statistics of every sub-batch's update rows (and `other`: another process's rows) move G once, the last
    sub-batch scored against G', the earlier ones against G."""
    index = [ref.assign(u, g)[0] for _, u, _ in parts]
    members, member_index = torch.cat([u for _, u, _ in parts]), torch.cat(index)
    if other is not None:
        members, member_index = torch.cat([members, other]), torch.cat([member_index, ref.assign(other, g)[0]])
    sums, counts = ref.group_stats(members, member_index, K)
    updated = ref.momentum_update(g, sums, counts, BETA)
    losses = []
    for i, (t, _, p) in enumerate(parts):
        scored = updated if i == len(parts) - 1 else g
        targets = torch.stack([ref.assign(x, g)[0] for x in t])
        losses.append(ref.group_contrastive_loss(p.reshape(-1, D), scored, targets.repeat(1, V), TAU))
    return losses, updated, counts


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_cycle_scores_earlier_sub_batches_against_g_and_the_last_against_g_prime(backend, generator):
    g = rows(generator, K, D)
    parts = [(t, u[0], p) for t, u, p in (step_inputs(generator, n) for n in (5, 7, 4))]
    cycle = sk.GroupingCycle(g, TAU, backend=backend)
    outs = [cycle.step(t, u, p, BETA, last=i == len(parts) - 1) for i, (t, u, p) in enumerate(parts)]
    losses, updated, counts = hand_cycle(g, parts)
    for out, loss in zip(outs, losses):
        torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(out.groups, g) for out in outs[:-1])
    torch.testing.assert_close(outs[-1].groups, updated, rtol=0, atol=1e-6)
    assert torch.equal(outs[-1].counts, counts) and int(counts.sum()) == 16
    whole = sk.grouping_step(g, parts[-1][0], torch.cat([u for _, u, _ in parts]), parts[-1][2], BETA, TAU,
                             backend=backend)
    torch.testing.assert_close(outs[-1].groups, whole.groups, rtol=0, atol=1e-6)  # the same G' as one batch
    with pytest.raises(RuntimeError, match="has completed"):
        cycle.step(*parts[0], BETA)


def test_a_cycle_reduces_its_statistics_once(generator):
    """The last sub-batch hands every sub-batch's local statistics to the reducer in one call and moves G by
    what it returns: a reducer standing for a second process that saw the same rows doubles the counts and
    leaves G' (the members' mean) as it is."""
    g = rows(generator, K, D)
    parts = [(t, u[0], p) for t, u, p in (step_inputs(generator, 6) for _ in range(3))]
    calls = []

    def second_process(sums, counts):
        calls.append((sums.clone(), counts.clone()))
        return 2 * sums, 2 * counts

    outs = {}
    for name, reducer in (("local", None), ("both", second_process)):
        cycle = sk.GroupingCycle(g, TAU, reduce_stats=reducer)
        outs[name] = [cycle.step(t, u, p, BETA, last=i == 2) for i, (t, u, p) in enumerate(parts)][-1]
    assert len(calls) == 1
    _, _, counts = hand_cycle(g, parts)
    assert torch.equal(calls[0][1], counts) and torch.equal(outs["both"].counts, 2 * counts)
    torch.testing.assert_close(outs["both"].groups, outs["local"].groups, rtol=0, atol=1e-6)


def test_a_gathering_reducer_is_given_the_cycles_rows(generator):
    g = rows(generator, K, D)
    parts = [(t, u[0], p) for t, u, p in (step_inputs(generator, n) for n in (3, 5))]
    given = []

    class Gathering:
        def __call__(self, sums, counts):
            raise AssertionError("a gathering reducer is given the rows")

        def from_rows(self, x, index, num_groups, backend):
            given.append((x, index, num_groups, backend))
            return ref.group_stats(x, index, num_groups)

    cycle = sk.GroupingCycle(g, TAU, reduce_stats=Gathering(), backend="reference")
    for i, (t, u, p) in enumerate(parts):
        cycle.step(t, u, p, BETA, last=i == 1)
    (x, index, num_groups, backend), = given
    members = torch.cat([u for _, u, _ in parts])
    assert torch.equal(x, members) and torch.equal(index, ref.assign(members, g)[0])
    assert (num_groups, backend) == (K, "reference")


def test_grad_groups_cannot_accumulate(generator):
    cycle = sk.GroupingCycle(rows(generator, K, D), TAU, grad_groups=True)
    t, u, p = step_inputs(generator)
    with pytest.raises(ValueError, match="grad_groups=True cannot accumulate"):
        cycle.step(t, u[0], p, BETA, last=False)


def test_the_module_accumulates_over_sub_batches(generator):
    """forward(..., last=False) holds the sub-batch's statistics; the groups move once, at the last."""
    grouping = module(3, generator)
    groups = grouping.groups.clone()
    parts = [step_inputs(generator, n) for n in (4, 6)]
    first = grouping(*parts[0], BETA, last=False)
    assert torch.equal(grouping.groups, groups)
    grouping(*parts[1], BETA)
    for h in range(3):
        cycle = sk.GroupingCycle(groups[h], TAU)
        losses = [cycle.step(t, u[h % U], p, BETA, last=i == 1) for i, (t, u, p) in enumerate(parts)]
        assert torch.equal(grouping.groups[h], losses[-1].groups)
    assert torch.isfinite(first)


# ---- 3. state, eval mode, re-clustering ------------------------------------------------------------


def test_a_state_dict_saved_mid_run_continues_bit_exact(generator):
    grouping = module(3, generator)
    batches = [step_inputs(generator) for _ in range(4)]
    for batch in batches[:2]:
        grouping(*batch, BETA)
    fresh = sk.Grouping(3, K, D, TAU)
    fresh.load_state_dict(copy.deepcopy(grouping.state_dict()))
    assert list(fresh.state_dict()) == ["groups"]
    for batch in batches[2:]:
        assert torch.equal(grouping(*batch, BETA), fresh(*batch, BETA))
    assert torch.equal(grouping.groups, fresh.groups)


def test_recluster_is_spherical_kmeans_per_head_with_seed_plus_head(generator):
    grouping = module(3, generator)
    views = [rows(generator, 40, D), rows(generator, 40, D)]
    index = grouping.recluster(views, iters=3, seed=11)
    for h in range(3):
        groups, members = sk.spherical_kmeans(views[h % 2], K, iters=3, seed=11 + h)
        assert torch.equal(grouping.groups[h], groups) and torch.equal(index[h], members)


def test_recluster_without_sync_is_the_local_spherical_kmeans(generator):
    grouping = module(2, generator, sync=False, backend="reference")
    views = [rows(generator, 30, D)]
    index = grouping.recluster(views, iters=2, seed=4)
    for h in range(2):
        groups, members = sk.spherical_kmeans(views[0], K, iters=2, seed=4 + h, backend="reference")
        assert torch.equal(grouping.groups[h], groups) and torch.equal(index[h], members)
    with pytest.raises(ValueError, match="rows must hold at least one"):
        grouping.recluster([])


def test_a_new_module_holds_unit_random_groups_and_no_result():
    grouping = sk.Grouping(3, K, D)
    assert grouping.groups.shape == (3, K, D) and grouping.groups.dtype == torch.float32
    torch.testing.assert_close(grouping.groups.norm(dim=2), torch.ones(3, K))
    assert (grouping.heads, grouping.num_groups) == (3, K) and grouping.result is None
    assert (grouping.temperature, grouping.grad_groups, grouping.backend, grouping.sync) == (0.1, False, "auto", True)
    assert list(grouping.state_dict()) == ["groups"]


def test_one_set_of_update_rows_moves_every_head(generator):
    grouping = module(2, generator, backend="reference")
    groups = grouping.groups.clone()
    t, u, p = step_inputs(generator)
    grouping(t, u[:1], p, BETA)
    for h in range(2):
        step = sk.grouping_step(groups[h], t, u[0], p, BETA, TAU, backend="reference")
        assert torch.equal(grouping.groups[h], step.groups)


def test_the_reducer_is_built_once_for_several_processes_unless_sync_is_off(monkeypatch):
    from smog_kernels import distributed

    grouping = sk.Grouping(2, K, D)
    assert grouping.reducer() is None  # one process
    worlds = []

    def world_size(group=None):
        worlds.append(group)
        return 2

    monkeypatch.setattr(distributed, "world_size", world_size)
    group = object()  # stands for a process group: only passed on
    synced = sk.Grouping(2, K, D, process_group=group)
    reducer = synced.reducer()
    assert isinstance(reducer, distributed.GroupStatsSync) and reducer.group is group
    assert synced.reducer() is reducer and worlds == [group, group]
    assert sk.Grouping(2, K, D, sync=False, process_group=group).reducer() is None


def test_every_heads_cycle_reduces_by_the_modules_reducer(generator):
    """The reducer of several processes reaches each head's cycle: one standing for a second process
    that saw the same rows doubles the counts and leaves G' (the members' mean) as one process has it."""
    grouping = module(2, generator, backend="reference")
    groups = grouping.groups.clone()
    grouping.reducer = lambda: lambda sums, counts: (2 * sums, 2 * counts)
    t, u, p = step_inputs(generator)
    grouping(t, u, p, BETA)
    for h in range(2):
        alone = sk.grouping_step(groups[h], t, u[h], p, BETA, TAU, backend="reference")
        assert torch.equal(grouping.result.counts[h], 2 * alone.counts)
        torch.testing.assert_close(grouping.groups[h], alone.groups, rtol=0, atol=1e-6)


class Replayed:
    """Stands in for GraphedGroupingStep (CUDA graphs, GPU only): the eager step of one head."""

    made: ClassVar[list] = []

    def __init__(self, temperature, backend="auto"):
        self.temperature, self.backend = temperature, backend
        Replayed.made.append(self)

    def __call__(self, groups, target_rows, update_rows, predictions, beta):
        return sk.grouping_step(groups, target_rows, update_rows, predictions, beta, self.temperature,
                                backend=self.backend)


def test_the_graphed_path_replays_each_heads_step(monkeypatch, generator):
    from smog_kernels import distributed
    from smog_kernels import grouping as grouping_module

    Replayed.made = []
    monkeypatch.setattr(grouping_module, "GraphedGroupingStep", Replayed)
    graphed = module(3, generator, backend="reference", cuda_graphs=True)
    assert [(r.temperature, r.backend) for r in Replayed.made] == [(TAU, "reference")] * 3
    eager = module(3, generator, backend="reference")
    eager.groups.copy_(graphed.groups)
    for _ in range(2):
        t, u, p = step_inputs(generator)
        p_graphed, p_eager = p.clone().requires_grad_(), p.clone().requires_grad_()
        loss, want = graphed(t, u, p_graphed, BETA), eager(t, u, p_eager, BETA)
        assert torch.equal(loss, want)
        loss.backward()
        want.backward()
        assert torch.equal(p_graphed.grad, p_eager.grad)
        for got, expected in zip(graphed.result, eager.result):
            assert torch.equal(got, expected)
        assert torch.equal(graphed.groups, eager.groups)
    t, u, p = step_inputs(generator)
    with pytest.raises(ValueError, match=r"no accumulation \(last=False\) and no cross-process reduction"):
        graphed(t, u, p, BETA, last=False)
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match=r"^cuda_graphs=True runs whole steps on one process: no accumulation "
                                         r"\(last=False\) and no cross-process reduction \(sync=False or one "
                                         r"process\)$"):
        graphed(t, u, p, BETA)


# ---- 4. errors and torch.compile -------------------------------------------------------------------


def test_bad_arguments_are_named(generator):
    grouping = module(2, generator)
    t, u, p = step_inputs(generator)
    with pytest.raises(ValueError, match=r"predictions must hold L2-normalised rows .*norm 2"):
        grouping(t, u, 2 * p, BETA)
    with pytest.raises(ValueError, match=r"update_rows must have 3 dimensions, got shape \(12, 8\)"):
        grouping(t, u[0], p, BETA)
    with pytest.raises(ValueError, match="same feature dimension D"):
        grouping(t, u, rows(generator, V, N, D + 1), BETA)
    with pytest.raises(ValueError, match="beta must lie in"):
        grouping(t, u, p, 1.5)
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        sk.Grouping(2, 0, D)
    with pytest.raises(ValueError, match="heads must be >= 1"):
        sk.Grouping(0, K, D)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        sk.Grouping(2, K, 0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sk.Grouping(2, K, D, 0.0)
    with pytest.raises(ValueError, match=r"cuda_graphs=True replays the step without a gradient into the groups: "
                                         r"set grad_groups=False"):
        sk.Grouping(2, K, D, cuda_graphs=True, grad_groups=True)
    with pytest.raises(ValueError, match=r"update_rows must hold at least one set of rows \[U >= 1, M, D\], "
                                         r"got shape \(0, 12, 8\)"):
        grouping(t, u[:0], p, BETA)


def test_torch_compile_traces_a_step_with_the_module_without_a_graph_break(generator):
    torch._dynamo.reset()
    grouping = module(3, generator, backend="cpu")
    eager = copy.deepcopy(grouping)
    t, u, p = step_inputs(generator)

    def step(t, u, p):
        return grouping(t, u, p, BETA)

    explained = torch._dynamo.explain(step)(t, u, p)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    eager(t, u, p, BETA)  # the traced step moved the groups as the eager one does
    torch.testing.assert_close(grouping.groups, eager.groups, rtol=0, atol=1e-6)


# ---- 5. DDP on real processes ----------------------------------------------------------------------

DDP_STEPS, DDP_ROWS, DDP_IN = 3, 6, 5  # steps, rows per process, input width


def ddp_data(seed: int, world: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = world * DDP_ROWS
    return [{"targets": F.normalize(torch.randn(T, n, D, generator=g), dim=-1),
             "update": torch.randn(U, n, DDP_IN, generator=g), "views": torch.randn(V, n, DDP_IN, generator=g)}
            for _ in range(DDP_STEPS)]


def ddp_run(seed: int, world: int, rank: int) -> dict:
    """DDP_STEPS SGD steps of a linear network whose normalised outputs are the update rows and predictions,
    against the Grouping module; with world > 1 under DDP on this rank's share of every batch."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(DDP_IN, D)
    grouping = sk.Grouping(3, K, D, TAU, backend="cpu")
    wrapped = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    cut = slice(rank * DDP_ROWS, (rank + 1) * DDP_ROWS) if world > 1 else slice(None)
    groups, counts = [], []
    for batch in ddp_data(seed, 2):
        optimizer.zero_grad()
        update = F.normalize(wrapped(batch["update"][:, cut]), dim=-1).detach()
        predictions = F.normalize(wrapped(batch["views"][:, cut]), dim=-1)
        grouping(batch["targets"][:, cut], update, predictions, BETA).backward()
        optimizer.step()
        groups.append(grouping.groups.clone())
        counts.append(grouping.result.counts.clone())
    return {"groups": groups, "counts": counts, "weight": net.weight.detach().clone()}


def run_ddp(rank: int, world: int, seed: int) -> dict:
    return ddp_run(seed, world, rank)


def test_under_ddp_on_two_processes_the_module_equals_one_process_with_the_whole_batch(tmp_path):
    seed = seed_for("grouping-ddp")
    results, codes = launch(2, "tests.test_grouping:run_ddp", seed, tmp_path)
    assert codes == [0, 0]
    one = ddp_run(seed, 1, 0)
    for r, result in enumerate(results):
        for step in range(DDP_STEPS):
            assert torch.equal(result["counts"][step], one["counts"][step]), (r, step)
            torch.testing.assert_close(result["groups"][step], one["groups"][step], rtol=0, atol=2e-6)
            assert torch.equal(result["groups"][step], results[0]["groups"][step])  # every rank the same bits
        torch.testing.assert_close(result["weight"], one["weight"], rtol=0, atol=2e-6)
    assert int(one["counts"][0][0].sum()) == 2 * DDP_ROWS  # counts are global
