"""Spherical k-means against its definition, written out here: one Lloyd iteration from a given init
is the normalised mean of each group's rows under the argmax assignment, an empty group keeps its
init, and the returned members are the assignment under the returned groups."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import smog_kernels as sk
from smog_kernels.kmeans import initial_groups
from tests.conftest import fused_backends, require

BACKENDS = [pytest.param("reference", "cpu", "full", id="reference")] + fused_backends()


def clustered(n: int, k: int, d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, d], init [k, d]) unit rows in the positive orthant; init's last row points the other
    way (-1, ..., -1) / sqrt(d), so it scores below every other row's group for every x."""
    x = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64).abs(), dim=1)
    init = F.normalize(torch.randn(k, d, generator=generator, dtype=torch.float64).abs(), dim=1)
    init[-1] = -1.0 / d ** 0.5
    return x.float(), init.float()


def lloyd_by_definition(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, list[int]]:
    """float64 Lloyd on the sphere, a loop over groups: (groups, sizes of the last E-step's groups).
    Each E-step scores x against the groups rounded to x's dtype."""
    c = init.double()
    xd = x.double()
    for _ in range(iters):
        index = (xd @ c.to(x.dtype).double().T).argmax(1)
        sizes = []
        new = c.clone()
        for g in range(c.shape[0]):
            members = xd[index == g]
            sizes.append(members.shape[0])
            if members.shape[0]:
                mean = members.sum(0) / members.shape[0]
                new[g] = mean / mean.norm()
        c = new
    return c, sizes


@pytest.mark.parametrize("backend,device,size", BACKENDS)
@pytest.mark.parametrize("iters, dtype", [(1, torch.float32), (2, torch.float32), (2, torch.float16)])
def test_iterations_are_normalised_segment_means(backend, device, size, iters, dtype, generator):
    """float16 rows: float32 groups rounded to float16 for each E-step, returned in float16."""
    if backend != "reference":
        require(backend)
    n, k, d = (300, 9, 16) if size == "full" else (48, 5, 8)
    x, init = clustered(n, k, d, generator)
    x = x.to(dtype)
    want, sizes = lloyd_by_definition(x, init, iters)
    assert sizes[-1] == 0 and sum(s > 0 for s in sizes) >= 2  # one empty group, several filled ones
    got, index = sk.spherical_kmeans(x.to(device), k, iters=iters, init=init.to(device), backend=backend)
    assert got.dtype == dtype and index.dtype == torch.int64
    atol = 2e-6 if dtype == torch.float32 else 2.0 ** -11  # float16: the final rounding, half an ulp below 1
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=atol)
    assert torch.equal(got[-1].cpu(), init[-1].to(dtype)), "an empty group must keep its init exactly"


def test_seeded_init_is_the_documented_draw():
    """K distinct rows of x: the first K of a permutation of its N rows drawn by a CPU generator seeded
    with `seed` (N != D, so a permutation of the wrong length is seen)."""
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    for seed in (0, 11):
        rows = torch.randperm(50, generator=torch.Generator().manual_seed(seed))[:7]
        assert torch.equal(initial_groups(x, 7, seed), x[rows])
        groups, _ = sk.spherical_kmeans(x, 7, iters=1, init=x[rows], backend="reference")
        assert torch.equal(sk.spherical_kmeans(x, 7, iters=1, seed=seed, backend="reference")[0], groups)


@pytest.mark.parametrize("backend,device,size", BACKENDS)
def test_members_are_the_assignment_under_the_returned_groups(backend, device, size, generator):
    """As scikit-learn's labels_: the index comes from a final E-step after the last update, so it
    differs from the assignment under the previous groups wherever a row changed group."""
    if backend != "reference":
        require(backend)
    n, k, d = (300, 9, 16) if size == "full" else (48, 5, 8)
    x, init = clustered(n, k, d, generator)
    x, init = x.to(device), init.to(device)
    groups, index = sk.spherical_kmeans(x, k, iters=1, init=init, backend=backend)
    scores = x.double() @ groups.double().T
    chosen = scores.gather(1, index[:, None])[:, 0]
    assert float((scores.max(1).values - chosen).max()) <= 1e-6
    before = (x.double() @ init.double().T).argmax(1)
    moved = before != scores.argmax(1)
    assert bool(moved.any()), "no row changed group: the test would not tell the two assignments apart"
    assert torch.equal(index[moved], scores.argmax(1)[moved])



@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_e_step_scores_the_groups_rounded_to_the_rows_dtype(backend):
    """float16 rows: 0.9996 < 0.9997 in float32, but both round to 1 - 2^-11 in float16, a tie that
    group 0 wins. Only group 0 gets the row; group 1 keeps its init."""
    if backend != "reference":
        require(backend)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float16)
    init = torch.tensor([[0.9996, 0.0], [0.9997, 0.0]])
    groups, index = sk.spherical_kmeans(x, 2, iters=1, init=init, backend=backend)
    assert torch.equal(groups, torch.tensor([[1.0, 0.0], [0.9997, 0.0]]).to(torch.float16))
    assert index.tolist() == [0]
