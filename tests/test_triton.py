"""Triton-specific tests: split-K merges, atomic vs deterministic statistics, the fused
assignment + statistics launch, torch.compile, CUDA-graph capture and the no-N x K-buffer promise.

Without a GPU the kernels run on small CPU tensors through Triton's interpreter (switched on in
conftest.py); with one they run on CUDA tensors at larger shapes and carry the `gpu` marker. Every
test compares against smog_kernels.reference or a float64 computation on fresh random inputs.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from smog_kernels import reference as ref
from smog_kernels.parity import FLOAT32_TOL, REL_TOL, SCORE_TOL, rel_err
from tests.conftest import HAS_GPU, INTERPRETED, unit_rows

pytest.importorskip("triton", reason="triton is not installed")  # an optional package; smog's own module must import
import smog_kernels.triton as T  # noqa: E402
from smog_kernels.triton import ops  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

if HAS_GPU:
    DEVICES = [pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu])]
else:
    DEVICES = [pytest.param("cpu", id="interpreter",
                            marks=[pytest.mark.skipif(not INTERPRETED, reason="needs a GPU or TRITON_INTERPRET=1")])]


def tile_n(device: str) -> int:
    """The group tile of the assignment/loss kernels on this device (float32 is the smallest)."""
    return 16 if device == "cpu" else 64


def sizes(device: str, even_k: bool = False) -> tuple[int, int, int]:
    """(N, K, D): K spans ~5 group tiles and ends mid-tile (or, even_k, is a multiple of every
    group tile: the unmasked path); D is not a power of two."""
    bn = tile_n(device)
    k = 8 * bn if even_k else 5 * bn + 3
    return (37, k, 24) if device == "cpu" else (1000, k, 120)


@pytest.fixture
def split(monkeypatch):
    def set_split(value):
        monkeypatch.setattr(ops, "SPLIT_OVERRIDE", value)
    yield set_split


def f64_loss_parts(p, c, targets, inv_t):
    logits = p.double().cpu() @ c.double().cpu().T * inv_t
    lse = torch.logsumexp(logits, 1)
    soft = torch.softmax(logits, 1)
    return lse, logits.gather(1, targets.cpu().T).T, soft @ c.double().cpu(), soft


# ---- split-K merges --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 2, 3, 6], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("even_k", [False, True], ids=["K-ragged", "K-even"])
def test_assign_split_k_merge_keeps_smallest_tied_index(device, dtype, splits, even_k, split, generator):
    """Each group appears twice, the copies far apart (different splits): the merge must keep
    the first copy, and the scores must match the reference."""
    split(splits)
    n, k, d = sizes(device, even_k)
    half = unit_rows(k // 2, d, dtype, device, generator)
    extra = unit_rows(k - 2 * (k // 2), d, dtype, device, generator)
    c = torch.cat([half, extra, half])  # copy j and j + K/2 (+1) in different tiles
    x = unit_rows(n, d, dtype, device, generator, contiguous=False)
    m = min(n // 2, half.shape[0])
    x[:m] = half[:m]  # rows equal to a group: exact ties at the top score
    index, score = T.assign(x, c)
    ref_index, ref_score = ref.assign(x, c)
    assert index.dtype == torch.int64 and score.dtype == torch.float32
    assert int(index.max()) < half.shape[0] + extra.shape[0], "a tie went to the later copy"
    exact = x.double().cpu() @ c.double().cpu().T
    gap = exact.max(1).values - exact.gather(1, index.cpu().unsqueeze(1)).squeeze(1)
    assert float(gap.max()) <= SCORE_TOL[dtype]
    assert float((score.cpu().double() - ref_score.cpu().double()).abs().max()) <= SCORE_TOL[dtype]
    assert (index == ref_index).float().mean() >= 0.95


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 2, 4], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("even_k", [False, True], ids=["K-ragged", "K-even"])
def test_loss_forward_split_k_merge(device, dtype, splits, even_k, split, generator):
    split(splits)
    n, k, d = sizes(device, even_k)
    p = unit_rows(n, d, dtype, device, generator, contiguous=False)
    c = unit_rows(k, d, dtype, device, generator)
    targets = torch.randint(0, k, (2, n), generator=generator).to(device)
    lse, tlog, att = T.loss_forward(p, c, targets, 10.0)
    want_lse, want_tlog, want_att, _ = f64_loss_parts(p, c, targets, 10.0)
    assert lse.dtype == tlog.dtype == att.dtype == torch.float32
    assert tlog.shape == (2, n) and att.shape == (n, d)
    assert rel_err(lse, want_lse) <= FLOAT32_TOL  # exact products of the inputs, float32 sums
    assert rel_err(lse.unsqueeze(0) - tlog, want_lse.unsqueeze(0) - want_tlog) <= FLOAT32_TOL
    assert rel_err(att, want_att) <= REL_TOL[dtype]  # probabilities rounded to the inputs' dtype (tensor cores)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"split{s}")
def test_group_grad_row_splits(device, dtype, splits, split, generator):
    split(splits)
    n, k, d = sizes(device)
    p = unit_rows(n, d, dtype, device, generator)
    c = unit_rows(k, d, dtype, device, generator, contiguous=False)
    targets = torch.randint(0, k, (1, n), generator=generator).to(device)
    lse, _, _ = T.loss_forward(p, c, targets, 10.0)
    weight = torch.rand(n, generator=generator).to(device) - 0.3  # signed weights
    got = T.loss_group_grad(p, c, lse, weight, 10.0)
    _, _, _, soft = f64_loss_parts(p, c, targets, 10.0)
    want = 10.0 * (weight.double().cpu().unsqueeze(1) * soft).T @ p.double().cpu()
    assert got.dtype == torch.float32 and got.shape == (k, d)
    assert rel_err(got, want) <= REL_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_group_grad_float16_tiny_weights_do_not_underflow(device, generator):
    """Mean-reduced weights of a large batch are ~1e-9: float16 products would flush to zero."""
    n, k, d = sizes(device)
    p = unit_rows(n, d, torch.float16, device, generator)
    c = unit_rows(k, d, torch.float16, device, generator)
    targets = torch.randint(0, k, (1, n), generator=generator).to(device)
    lse, _, _ = T.loss_forward(p, c, targets, 10.0)
    weight = torch.full((n,), 1e-9, device=device)
    got = T.loss_group_grad(p, c, lse, weight, 10.0)
    _, _, _, soft = f64_loss_parts(p, c, targets, 10.0)
    want = 10.0 * 1e-9 * soft.T @ p.double().cpu()
    assert rel_err(got, want) <= REL_TOL[torch.float16]


# ---- group statistics: atomic and deterministic paths ----------------------------------------------


class LaunchCounter:
    """Wraps a Triton kernel and counts launches (kernel[grid](...) calls)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_group_stats_paths(device, dtype, deterministic, monkeypatch, generator):
    monkeypatch.setattr(ops, "DETERMINISTIC", deterministic)
    segmented = LaunchCounter(ops.k.stats_segmented_kernel)
    atomic = LaunchCounter(ops.k.stats_atomic_kernel)
    monkeypatch.setattr(ops.k, "stats_segmented_kernel", segmented)
    monkeypatch.setattr(ops.k, "stats_atomic_kernel", atomic)
    n, k, d = sizes(device)
    x = unit_rows(n, d, dtype, device, generator, contiguous=False)
    for index in (torch.randint(0, k, (n,), generator=generator),  # most groups empty
                  torch.randint(0, 3, (n,), generator=generator),  # few, crowded groups
                  torch.full((n,), k - 1, dtype=torch.int64)):
        index = index.to(device)
        sums, counts = T.group_stats(x, index, k)
        want_sums, want_counts = ref.group_stats(x, index, k)
        assert sums.dtype == torch.float32 and counts.dtype == torch.int64
        assert torch.equal(counts.cpu(), want_counts.cpu())
        assert rel_err(sums, want_sums) <= 1e-5
        assert bool((sums[want_counts == 0] == 0).all())
        if deterministic:
            again, _ = T.group_stats(x, index, k)
            assert torch.equal(again, sums), "deterministic statistics differ between two runs"
    assert (segmented.launches > 0) == deterministic and (atomic.launches > 0) != deterministic


def test_deterministic_switches(monkeypatch):
    monkeypatch.setattr(ops, "DETERMINISTIC", None)
    monkeypatch.delenv("SMOG_TRITON_DETERMINISTIC", raising=False)
    assert ops.deterministic() == torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("SMOG_TRITON_DETERMINISTIC", "1")
    assert ops.deterministic()
    monkeypatch.setenv("SMOG_TRITON_DETERMINISTIC", "0")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert ops.deterministic()
    monkeypatch.setattr(ops, "DETERMINISTIC", False)
    assert not ops.deterministic()


def test_tf32_only_when_torch_allows_it():
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert ops.precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert ops.precision(torch.float32) == "tf32"
        assert ops.precision(torch.bfloat16) == "tf32"  # (ignored by tl.dot for 16-bit inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ---- fused assignment + statistics -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"split{s}")
def test_assign_and_stats(device, dtype, deterministic, splits, split, monkeypatch, generator):
    """Targets first, update rows last: index/score of all rows, statistics of the update rows."""
    monkeypatch.setattr(ops, "DETERMINISTIC", deterministic)
    split(splits)
    n, k, d = sizes(device)
    x = unit_rows(n, d, dtype, device, generator)
    c = unit_rows(k, d, dtype, device, generator, contiguous=False)
    for stats_from in (0, n // 3, n):
        index, score, sums, counts = T.assign_and_stats(x, c, stats_from)
        ref_index, ref_score = ref.assign(x, c)
        assert float((score.cpu().double() - ref_score.cpu().double()).abs().max()) <= SCORE_TOL[dtype]
        want_sums, want_counts = ref.group_stats(x[stats_from:], index[stats_from:], k)
        assert sums.shape == (k, d) and counts.shape == (k,)
        assert torch.equal(counts.cpu(), want_counts.cpu())
        assert int(counts.sum()) == n - stats_from
        assert rel_err(sums, want_sums) <= 1e-5 if stats_from < n else bool((sums == 0).all())


# ---- torch.compile and CUDA graphs -----------------------------------------------------------------


def grouping_step(x, c, targets, stats_from: int):
    index, _, sums, counts = T.assign_and_stats(x, c, stats_from)
    updated = T.momentum_update(c, sums, counts, 0.99)
    lse, tlog, att = T.loss_forward(x, updated, targets, 10.0)
    return index, updated, lse, tlog, att


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_the_registered_ops(device, generator):
    torch._dynamo.reset()
    n, k, d = sizes(device)
    x = unit_rows(n, d, torch.float32, device, generator)
    c = unit_rows(k, d, torch.float32, device, generator)
    targets = torch.randint(0, k, (2, n), generator=generator).to(device)
    compiled = torch.compile(grouping_step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    got = compiled(x, c, targets, n // 2)
    want = grouping_step(x, c, targets, n // 2)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_of_a_step(dtype, generator):
    """A whole step (assign + statistics, update, loss forward, group gradient) is captured and
    replayed on new inputs: nothing in it synchronises with the host."""
    n, k, d = 4096, 3000, 128
    x = unit_rows(n, d, dtype, "cuda", generator)
    c = unit_rows(k, d, dtype, "cuda", generator)
    targets = torch.randint(0, k, (2, n), generator=generator).cuda()
    weight = torch.full((n,), 1.0 / n, device="cuda")

    def step():
        index, updated, lse, tlog, att = grouping_step(x, c, targets, n // 2)
        return index, updated, lse, tlog, att, T.loss_group_grad(x, updated, lse, weight, 10.0)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(unit_rows(n, d, dtype, "cuda", generator))
    c.copy_(unit_rows(k, d, dtype, "cuda", generator))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    assert (captured[0] == eager[0]).float().mean() >= 0.999
    for a, b in zip(captured[1:], eager[1:]):
        assert rel_err(a, b) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k,d", [(4096, 65536, 128), (8192, 65536, 256)])
def test_loss_holds_no_n_by_k_buffer(n, k, d, generator):
    """Peak extra memory of loss forward + group gradient stays below 2 (N + K) D float32 + 64 MB,
    far below the N x K float32 score matrix (1-2 GB here)."""
    p = unit_rows(n, d, torch.bfloat16, "cuda", generator)
    c = unit_rows(k, d, torch.bfloat16, "cuda", generator)
    targets = torch.randint(0, k, (2, n), generator=generator).cuda()
    weight = torch.full((n,), 1.0 / n, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lse, _, _ = T.loss_forward(p, c, targets, 10.0)
    T.loss_group_grad(p, c, lse, weight, 10.0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 2 * (n + k) * d * 4 + 64 * 2**20, f"{extra / 2**20:.1f} MiB extra"
    assert extra < n * k * 4 / 4


@pytest.mark.skipif(not INTERPRETED or os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")
def test_interpreter_tiles_are_small():
    """Under the interpreter the tests rely on 16-wide tiles, so that K spans several tiles."""
    cfg = ops._config("loss", torch.device("cpu"), torch.float32, 24)
    assert cfg["BN"] == tile_n("cpu") and cfg["BM"] == 16


def test_kernels_compile_for_hopper_without_spills():
    """Compiles the bfloat16 kernels with the configurations ops picks for sm_90 (no GPU needed) and
    fails on a compile error or a register spill (ptxas -v)."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no bundled ptxas")
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "tools/triton_aot_check.py", "--cap", "90", "--dtypes", "bf16",
                          "--dims", "128,256", "--strict"], capture_output=True, text=True, timeout=900, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") >= 16, out.stdout
