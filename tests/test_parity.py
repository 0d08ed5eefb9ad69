"""Every fused backend against smog_kernels.reference on fresh random inputs.

Grid: N in {1, 7, 256, 1001}, K in {1, 3, 300, 3001}, D in {3, 64, 128, 256} (each N x K pair with
one D, every D used), float32 / bfloat16 / float16, contiguous and non-contiguous inputs; plus exact
ties, empty groups, one group for everything, beta in {0, 0.99, 1}, T in {1, 2}. The Triton
interpreter gets a smaller grid of the same kinds of cases.

Tolerances are relative errors ||fused - ref|| / ||ref||; both sides compute from the same
low-precision inputs, so only float32 summation order and the output rounding differ.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import smog_kernels as sk
from smog_kernels import reference as ref
from smog_kernels.kmeans import initial_groups
from smog_kernels.parity import FLOAT32_TOL, REL_TOL, SCORE_TOL, rel_err, tolerance
from tests.conftest import fused_backends, require, unit_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

_NS, _KS, _DS = (1, 7, 256, 1001), (1, 3, 300, 3001), (3, 64, 128, 256)
FULL_SHAPES = [(n, k, _DS[(i + j) % 4]) for (i, n), (j, k) in itertools.product(enumerate(_NS), enumerate(_KS))]
SMALL_SHAPES = [(1, 1, 3), (7, 3, 16), (33, 37, 8), (5, 70, 33)]


def shapes(size: str) -> list[tuple[int, int, int]]:
    return FULL_SHAPES if size == "full" else SMALL_SHAPES


def check_assignment(x, c, index, score, dtype) -> None:
    """index is an argmax of <x, c> (ties within SCORE_TOL allowed); score is its score."""
    exact = x.double().cpu() @ c.double().cpu().T
    best = exact.max(dim=1).values
    chosen = exact.gather(1, index.cpu().unsqueeze(1)).squeeze(1)
    assert index.dtype == torch.int64 and score.dtype == torch.float32
    assert bool(((index >= 0) & (index < c.shape[0])).all())
    gap = float((best - chosen).max()) if len(best) else 0.0
    assert gap <= SCORE_TOL[dtype], f"assigned groups score up to {gap} below the best"
    assert float((score.double().cpu() - chosen).abs().amax()) <= SCORE_TOL[dtype]


@pytest.mark.parametrize("backend,device,size", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_assign_matches_reference(backend, device, size, dtype, contiguous, generator):
    require(backend)
    for n, k, d in shapes(size):
        x = unit_rows(n, d, dtype, device, generator, contiguous)
        c = unit_rows(k, d, dtype, device, generator, contiguous)
        index, score = sk.assign(x, c, backend=backend)
        check_assignment(x, c, index, score, dtype)
        ref_index, _ = ref.assign(x, c)
        assert (index == ref_index).float().mean() >= 0.99 or n < 100, f"{n, k, d}: many argmax disagreements"


@pytest.mark.parametrize("backend,device,size", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_assign_ties_go_to_smallest_index(backend, device, size, dtype, generator):
    """Every group appears twice (rows j and j + K/2): a later copy must never win."""
    require(backend)
    for n, k, d in shapes(size):
        half = unit_rows(max(k // 2, 1), d, dtype, device, generator)
        c = torch.cat([half, half])
        x = unit_rows(n, d, dtype, device, generator)
        x[: min(n, half.shape[0])] = half[: min(n, half.shape[0])]  # rows equal to a group too
        index, _ = sk.assign(x, c, backend=backend)
        assert int(index.max()) < half.shape[0], "a tie went to a larger index"


@pytest.mark.parametrize("backend,device,size", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_stats_matches_reference(backend, device, size, dtype, generator):
    require(backend)
    for n, k, d in shapes(size):
        x = unit_rows(n, d, dtype, device, generator, contiguous=False)
        for index in (
            torch.randint(0, k, (n,), generator=generator),  # random, with empty groups when K > N
            torch.full((n,), k - 1, dtype=torch.int64),  # everything in one group
            torch.randint(0, max(k // 3, 1), (n,), generator=generator),  # the upper groups empty
        ):
            index = index.to(device)
            sums, counts = sk.group_stats(x, index, k, backend=backend)
            ref_sums, ref_counts = ref.group_stats(x, index, k)
            assert sums.dtype == torch.float32 and counts.dtype == torch.int64
            assert torch.equal(counts.cpu(), ref_counts.cpu())
            assert rel_err(sums, ref_sums) <= 1e-5
            assert bool((sums[ref_counts == 0] == 0).all()), "an empty group got a non-zero sum"


@pytest.mark.parametrize("backend,device,size", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.99, 1.0])
def test_momentum_update_matches_reference(backend, device, size, dtype, beta, generator):
    require(backend)
    for n, k, d in shapes(size):
        c = unit_rows(k, d, dtype, device, generator, contiguous=False)
        x = unit_rows(n, d, dtype, device, generator)
        index = torch.randint(0, k, (n,), generator=generator).to(device)
        sums, counts = ref.group_stats(x, index, k)
        out = sk.momentum_update(c, sums, counts, beta, backend=backend)
        expected = ref.momentum_update(c, sums, counts, beta)
        assert out.dtype == c.dtype and out.shape == c.shape
        assert rel_err(out, expected) <= max(REL_TOL[dtype], 1e-5)
        empty = counts == 0
        assert torch.equal(out[empty], c[empty]), "a group with no member changed"
        norms = out[~empty].float().norm(dim=1)
        assert bool(((norms - 1).abs() <= 10 * REL_TOL[dtype]).all()), "updated groups are not unit-norm"


def _loss_and_grads(fn, p, c, targets, temperature, reduction, grad_groups):
    p = p.detach().clone().requires_grad_(True)
    c = c.detach().clone().requires_grad_(grad_groups)
    loss = fn(p, c, targets, temperature, reduction, grad_groups)
    # random upstream weights so that "none" is checked row by row
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(7)).to(loss.device)
    (loss * upstream).sum().backward()
    return loss.detach(), p.grad, (c.grad if grad_groups else None), upstream


def grad_err(got: torch.Tensor, want: torch.Tensor, bound: float) -> float:
    """Relative error, with the denominator floored at 1e-2 of the largest norm the gradient can
    have: where the softmax is one-hot (K = 1) the exact gradient is 0 and the fused one is a
    difference of equal float32 sums taken in another order (atomics on a GPU), about 1e-7 of the
    terms; the floor keeps that within float32 rounding (1e-6 of the bound at 1e-4)."""
    return float((got.detach().double().cpu() - want.detach().double().cpu()).norm()
                 / max(float(want.detach().double().norm()), 1e-2 * bound))


@pytest.mark.parametrize("backend,device,size", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_targets", [1, 2], ids=["T1", "T2"])
@pytest.mark.parametrize("grad_groups", [False, True], ids=["detached", "grad-groups"])
def test_loss_and_gradients_match_reference(backend, device, size, dtype, num_targets, grad_groups, generator):
    require(backend)

    def fused(*args):
        return sk.group_contrastive_loss(*args, backend=backend)

    for (n, k, d), reduction in zip(shapes(size), itertools.cycle(["mean", "sum", "none"])):
        p = unit_rows(n, d, dtype, device, generator, contiguous=False)
        c = unit_rows(k, d, dtype, device, generator)
        targets = torch.randint(0, k, (num_targets, n), generator=generator).to(device)
        if num_targets == 1:
            targets = targets[0]
        temperature = 0.1
        got = _loss_and_grads(fused, p, c, targets, temperature, reduction, grad_groups)
        want = _loss_and_grads(ref.group_contrastive_loss, p, c, targets, temperature, reduction, grad_groups)
        tol = REL_TOL[dtype]  # the gradients, in the inputs' dtype
        assert got[0].shape == want[0].shape and got[0].dtype == torch.float32
        assert rel_err(got[0], want[0]) <= tolerance("loss", dtype), f"loss at {(n, k, d)}"
        assert got[1].dtype == dtype
        assert rel_err(got[1], want[1]) <= tol, f"dL/dp at {(n, k, d)}"
        if grad_groups:
            # ||dL/dC|| <= 2 / temperature * sum over (t, b) of the upstream weight of that loss
            terms = num_targets * n if reduction == "sum" else 1  # upstream is one scalar unless "none"
            bound = 2.0 / temperature * float(got[3].sum()) * terms
            assert grad_err(got[2], want[2], bound) <= tol, f"dL/dgroups at {(n, k, d)}"


@pytest.mark.parametrize("backend,device,size", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kmeans_matches_reference_from_same_init(backend, device, size, dtype, generator):
    require(backend)
    n, k, d = (1001, 30, 64) if size == "full" else (67, 5, 8)
    x = unit_rows(n, d, dtype, device, generator)
    init = unit_rows(k, d, dtype, device, generator)
    got_c, got_i = sk.spherical_kmeans(x, k, iters=5, init=init, backend=backend)
    want_c, want_i = ref.spherical_kmeans(x, k, iters=5, init=init)
    assert got_c.dtype == dtype and got_i.shape == (n,)
    # assignments may differ on near-ties, which moves a group slightly: compare as a whole
    assert (got_i == want_i).float().mean() >= 0.98
    assert rel_err(got_c, want_c) <= tolerance("spherical_kmeans", dtype)


@pytest.mark.parametrize("backend,device,size", [pytest.param("reference", "cpu", "full", id="reference")]
                         + fused_backends())
def test_kmeans_objective_never_decreases(backend, device, size, generator):
    if backend != "reference":
        require(backend)
    n, k, d = (2000, 40, 32) if size == "full" else (90, 6, 8)
    x = unit_rows(n, d, torch.float32, device, generator)
    groups, _ = sk.spherical_kmeans(x, k, iters=1, seed=3, backend=backend)
    objectives = []
    for _ in range(6):
        _, score = ref.assign(x, groups)
        objectives.append(float(score.double().sum()))
        groups, _ = sk.spherical_kmeans(x, k, iters=1, init=groups, backend=backend)
    assert all(b >= a - 1e-4 * abs(a) for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[-1] > objectives[0], "k-means made no progress"


def test_kmeans_seeded_init_is_k_distinct_rows(generator):
    x = unit_rows(50, 8, torch.float32, "cpu", generator)
    init = initial_groups(x, 7, seed=11)
    assert torch.equal(init, initial_groups(x, 7, seed=11))
    assert torch.unique(init, dim=0).shape[0] == 7
    assert all(bool((x == row).all(dim=1).any()) for row in init), "an initial group is not a row of x"


# (rows, groups): one dtype, and 16-bit rows with a float32 master copy of the groups (mixed precision)
STEP_DTYPES = [pytest.param(d, d, id=str(d)) for d in DTYPES] + [
    pytest.param(d, torch.float32, id=f"{d}-f32master") for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize("backend,device,size", fused_backends())
@pytest.mark.parametrize("dtype,groups_dtype", STEP_DTYPES)
@pytest.mark.parametrize("grad_groups", [False, True], ids=["detached", "grad-groups"])
def test_grouping_step_matches_reference(backend, device, size, dtype, groups_dtype, grad_groups, generator):
    """The whole step of one head (fused first pass where the backend has one): its assignments are
    argmaxes, and statistics, update, loss and gradients equal the reference built on them. With
    float32 groups and 16-bit rows, assignments and loss use the groups rounded to the rows' dtype and
    the update stays float32."""
    require(backend)
    k, n, d = (300, 129, 64) if size == "full" else (37, 9, 16)
    g = unit_rows(k, d, groups_dtype, device, generator)
    target_rows = unit_rows(2 * n, d, dtype, device, generator).view(2, n, d)
    update_rows = unit_rows(n, d, dtype, device, generator).requires_grad_()
    predictions = unit_rows(3 * n, d, dtype, device, generator).view(3, n, d).requires_grad_()
    step = sk.grouping_step(g, target_rows, update_rows, predictions, 0.9, 0.1, grad_groups, backend=backend)
    step.loss.backward()
    got_dp, got_dz = predictions.grad, update_rows.grad
    predictions.grad = update_rows.grad = None

    rounded = g.to(dtype)
    for t in range(2):
        check_assignment(target_rows[t], rounded, step.targets[t], ref.assign(target_rows[t], rounded)[1], dtype)
    check_assignment(update_rows.detach(), rounded, step.index, ref.assign(update_rows.detach(), rounded)[1], dtype)
    sums, counts = ref.group_stats(update_rows if grad_groups else update_rows.detach(), step.index, k)
    updated = ref.momentum_update(g, sums, counts, 0.9)
    loss = torch.stack([ref.group_contrastive_loss(predictions[v], updated.to(dtype), step.targets, 0.1, "mean",
                                                   grad_groups) for v in range(3)]).mean()
    loss.backward()
    assert step.groups.dtype == groups_dtype and torch.equal(step.counts, counts)
    assert rel_err(step.groups, updated) <= max(REL_TOL[groups_dtype], 1e-5)
    assert rel_err(step.loss, loss) <= FLOAT32_TOL  # float32 whatever the rows' dtype
    assert rel_err(got_dp, predictions.grad) <= REL_TOL[dtype]
    if grad_groups:
        assert rel_err(got_dz, update_rows.grad) <= REL_TOL[dtype]
    else:
        assert got_dz is None and update_rows.grad is None
