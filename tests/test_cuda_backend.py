"""Checks specific to the CUDA C++ backend (csrc/cuda); the shared parity grid is tests/test_parity.py.

- the deterministic statistics path (SMOG_DETERMINISTIC=1 or torch.use_deterministic_algorithms)
  is bitwise reproducible and agrees with the atomic path;
- the raw ops' intermediate outputs (lse, target logits, attention, group gradient) against a
  float64 computation, including D > 128 (several D slices) and ragged tiles;
- split-K assignment (few rows, many groups) with ties across split boundaries; large K;
- torch.compile and CUDA-graph capture of the ops (no host synchronisation inside them).

Every test needs a GPU and the extension's CUDA kernels: skipped (reason shown) without a GPU, failed
when a GPU is present but the kernels are missing.
"""
from __future__ import annotations

import pytest
import torch

import smog_kernels as sk
from smog_kernels import reference as ref
from tests.conftest import require, unit_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCORE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


@pytest.fixture(autouse=True)
def _cuda_backend():
    require("cuda")


@pytest.fixture
def deterministic(monkeypatch):
    """Runs the body with SMOG_DETERMINISTIC set to the value asked for."""

    def set_mode(on: bool) -> None:
        monkeypatch.setenv("SMOG_DETERMINISTIC", "1" if on else "0")

    return set_mode


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ---- statistics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_stats_are_bitwise_reproducible(dtype, generator, deterministic):
    deterministic(True)
    n, k, d = 20000, 300, 128
    x = unit_rows(n, d, dtype, "cuda", generator)
    # skewed groups: many rows per group, so that a different summation order would show
    index = (torch.rand(n, generator=generator) ** 3 * k).long().clamp(max=k - 1).cuda()
    first = torch.ops.smog.group_stats(x, index, k)
    for _ in range(3):
        again = torch.ops.smog.group_stats(x, index, k)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_torch_deterministic_mode_selects_the_deterministic_path(generator, deterministic):
    deterministic(False)
    n, k, d = 20000, 50, 64
    x = unit_rows(n, d, torch.float32, "cuda", generator)
    index = torch.randint(0, k, (n,), generator=generator).cuda()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.ops.smog.group_stats(x, index, k)
        again = torch.ops.smog.group_stats(x, index, k)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(first[0], again[0])
    deterministic(True)
    assert torch.equal(first[0], torch.ops.smog.group_stats(x, index, k)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (1001, 3001, 256), (4096, 3000, 128), (777, 5, 300)])
def test_atomic_and_deterministic_paths_agree(dtype, n, k, d, generator, deterministic):
    x = unit_rows(n, d, dtype, "cuda", generator, contiguous=False)
    index = torch.randint(0, k, (n,), generator=generator).cuda()
    deterministic(False)
    sums_a, counts_a = torch.ops.smog.group_stats(x, index, k)
    deterministic(True)
    sums_d, counts_d = torch.ops.smog.group_stats(x, index, k)
    ref_sums, ref_counts = ref.group_stats(x, index, k)
    assert torch.equal(counts_a, counts_d) and torch.equal(counts_d, ref_counts)
    assert rel(sums_a, sums_d) <= 1e-5 and rel(sums_d, ref_sums) <= 1e-5
    empty = ref_counts == 0
    assert bool((sums_a[empty] == 0).all()) and bool((sums_d[empty] == 0).all())


def test_group_stats_with_no_rows(deterministic):
    for on in (False, True):
        deterministic(on)
        sums, counts = torch.ops.smog.group_stats(
            torch.empty(0, 8, device="cuda"), torch.empty(0, dtype=torch.long, device="cuda"), 4)
        assert torch.equal(sums, torch.zeros(4, 8, device="cuda")) and int(counts.sum()) == 0


# ---- assignment --------------------------------------------------------------------------------------


def _check_assign(x, c, index, score, dtype):
    exact = x.double().cpu() @ c.double().cpu().T
    chosen = exact.gather(1, index.cpu().unsqueeze(1)).squeeze(1)
    assert bool(((index >= 0) & (index < c.shape[0])).all())
    assert float((exact.max(1).values - chosen).max()) <= SCORE_TOL[dtype]
    assert float((score.double().cpu() - chosen).abs().max()) <= SCORE_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,d", [(3, 65536, 128), (64, 20000, 64), (65, 4097, 33), (4096, 3000, 128)])
def test_assign_split_k_and_large_k(dtype, n, k, d, generator):
    x = unit_rows(n, d, dtype, "cuda", generator)
    c = unit_rows(k, d, dtype, "cuda", generator)
    index, score = sk.assign(x, c, backend="cuda")
    _check_assign(x, c, index, score, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_assign_ties_across_split_boundaries(dtype, generator):
    """Every group is repeated at k + K/4, k + K/2, k + 3K/4: several splits and tiles hold copies."""
    n, quarter, d = 5, 1000, 64
    base = unit_rows(quarter, d, dtype, "cuda", generator)
    c = torch.cat([base] * 4)
    x = torch.cat([base[[0, 999, 500]], unit_rows(n, d, dtype, "cuda", generator)])
    index, _ = torch.ops.smog.assign(x, c)
    assert int(index.max()) < quarter
    assert index[:3].tolist() == [0, 999, 500]


def test_assign_all_equal_scores_pick_zero(generator):
    c = torch.ones(300, 16, device="cuda")
    x = torch.ones(10, 16, device="cuda")
    index, score = torch.ops.smog.assign(x, c)
    assert index.tolist() == [0] * 10 and bool((score == 16).all())


# ---- loss --------------------------------------------------------------------------------------------


# P . V tolerance: the tensor-core path (16-bit inputs, default) rounds the probabilities to the input
# type as flash attention does; the CUDA-core path (SMOG_CUDA_LOSS=simt, and float32) keeps float32.
PV_TOL = {"tc": {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3},
          "simt": {torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}}


@pytest.mark.parametrize("path", ["tc", "simt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (70, 130, 200), (257, 3001, 128), (64, 64, 384), (5, 65536, 128)])
def test_loss_forward_and_group_grad_raw_outputs(path, dtype, n, k, d, generator, monkeypatch):
    monkeypatch.setenv("SMOG_CUDA_LOSS", path)
    p = unit_rows(n, d, dtype, "cuda", generator, contiguous=False)
    c = unit_rows(k, d, dtype, "cuda", generator)
    targets = torch.randint(0, k, (2, n), generator=generator).cuda()
    inv_t = 10.0
    lse, tlog, att = torch.ops.smog.loss_forward(p, c, targets, inv_t)
    pd, cd = p.double().cpu(), c.double().cpu()
    logits = pd @ cd.T * inv_t
    prob = torch.softmax(logits, 1)
    assert lse.dtype == tlog.dtype == att.dtype == torch.float32
    assert rel(lse, torch.logsumexp(logits, 1)) <= 1e-5
    assert rel(tlog, logits.gather(1, targets.cpu().T).T) <= 1e-5
    assert rel(att, prob @ cd) <= PV_TOL[path][dtype]
    # small weights, as for a mean over T N rows: they must not underflow in float16
    w = torch.rand(n, generator=generator, dtype=torch.float64) / (2 * 4096)
    g = torch.ops.smog.loss_group_grad(p, c, lse, w.float().cuda(), inv_t)
    assert g.dtype == torch.float32 and g.shape == (k, d)
    assert rel(g, inv_t * (prob * w[:, None]).T @ pd) <= PV_TOL[path][dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_loss_large_k_matches_reference(dtype, generator):
    """The loss value depends only on lse and the target logits (float32 in both paths)."""
    n, k, d = 512, 65536, 128
    p = unit_rows(n, d, dtype, "cuda", generator)
    c = unit_rows(k, d, dtype, "cuda", generator)
    targets = torch.randint(0, k, (2, n), generator=generator).cuda()
    got = sk.group_contrastive_loss(p, c, targets, 0.1, backend="cuda")
    want = ref.group_contrastive_loss(p, c, targets, 0.1)
    assert rel(got, want) <= 1e-4


# ---- compilation and graphs ------------------------------------------------------------------------------


def test_ops_under_torch_compile(generator, deterministic):
    deterministic(True)  # the same sums in both runs, so the results can be compared closely
    n, k, d = 300, 500, 64
    x = unit_rows(n, d, torch.bfloat16, "cuda", generator)
    c = unit_rows(k, d, torch.bfloat16, "cuda", generator)

    def step(x, c):
        index, score = torch.ops.smog.assign(x, c)
        sums, counts = torch.ops.smog.group_stats(x, index, k)
        c2 = torch.ops.smog.momentum_update(c, sums, counts, 0.99)
        lse, tlog, att = torch.ops.smog.loss_forward(x, c2, index.unsqueeze(0), 10.0)
        return index, c2, (lse - tlog).mean(), att

    eager = step(x, c)
    compiled = torch.compile(step, fullgraph=True)(x, c)
    assert torch.equal(eager[0], compiled[0])
    assert rel(compiled[1], eager[1]) <= 1e-2
    assert rel(compiled[2], eager[2]) <= 1e-5
    assert rel(compiled[3], eager[3]) <= 1e-5


def test_ops_capture_in_a_cuda_graph(generator, deterministic):
    """No host synchronisation inside the ops: they record into a CUDA graph and replay correctly."""
    deterministic(False)
    n, k, d = 1000, 300, 128
    x = unit_rows(n, d, torch.float32, "cuda", generator)
    c = unit_rows(k, d, torch.float32, "cuda", generator)

    def step():
        index, _ = torch.ops.smog.assign(x, c)
        sums, counts = torch.ops.smog.group_stats(x, index, k)
        c2 = torch.ops.smog.momentum_update(c, sums, counts, 0.99)
        lse, tlog, _ = torch.ops.smog.loss_forward(x, c2, index.unsqueeze(0), 10.0)
        return index, c2, lse - tlog[0]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        expected = step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0])
    assert rel(captured[1], expected[1]) <= 1e-5
    assert rel(captured[2], expected[2]) <= 1e-5

