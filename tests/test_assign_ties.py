"""Exact ties in the assignment go to the smallest index at every distance the kernels' blocking
makes different: two copies of a group in the same block, in adjacent blocks (same lane or
not, the later lane holding the smaller index), across a split-K boundary and far apart; and
all scores equal. The block sizes are read from the kernel sources: the CPU panel width kNR
(csrc/cpu/microkernels.h), the CUDA tile BN and its 16-column thread chunks
(csrc/cuda/common.cuh, assign.cu), the Triton group tile (its launch configuration).

Rows of x equal to a duplicated group score exactly the same against both copies (same
values, same arithmetic), well above every other random group.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import smog_kernels as sk
from tests.conftest import HAS_GPU, INTERPRETED, cpu_has, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def source_constant(path: str, name: str) -> int:
    """`constexpr int[64_t] name = value;` from a kernel source."""
    with open(os.path.join(ROOT, path)) as f:
        match = re.search(rf"constexpr int(?:64_t)? {name} = (\d+);", f.read())
    assert match, f"{name} not found in {path}"
    return int(match.group(1))


CPU_PANEL = source_constant("csrc/cpu/microkernels.h", "kNR")  # groups per running-argmax panel (lanes)
CUDA_TILE = source_constant("csrc/cuda/common.cuh", "BN")  # groups per streamed tile (4 chunks of 16)


def triton_tile(dtype: torch.dtype, device: str, d: int) -> int:
    from smog_kernels.triton import ops
    return ops._config("assign", torch.device(device), dtype, d)["BN"]


def tie_sets(block: int) -> list[tuple[int, ...]]:
    """Index sets holding one group each (the first must win) for blocks of `block` groups:
    same block, same 16-wide chunk, across the block boundary, same lane of adjacent blocks, a later
    lane with a smaller index, far blocks, and three copies in three blocks."""
    b = block
    sets = [(1, b - 2), (5, 12), (b - 1, b), (2, b + 2), (b // 2 + 3, b + 1), (4, 3 * b + 5), (6, b + 6, 2 * b + 6)]
    flat = [i for s in sets for i in s]
    assert len(flat) == len(set(flat)), "tie sets overlap"
    return sets


def tied_problem(block: int, dtype: torch.dtype, device: str, d: int = 24, seed: int = 0):
    """(x [R, d], groups [4 * block + 7, d], expected index [R]): row r equals the first group of
    tie set r, copied at the set's other indices."""
    gen = torch.Generator().manual_seed(seed)
    sets = tie_sets(block)
    k = 4 * block + 7
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    for first, *copies in sets:
        for j in copies:
            c[j] = c[first]
    x = torch.stack([c[s[0]] for s in sets])
    expected = torch.tensor([s[0] for s in sets])
    return x.to(device), c.to(device), expected


def all_equal(device: str, n: int = 5, k: int = 70, d: int = 16, dtype: torch.dtype = torch.float32):
    """Equal rows and equal groups, and zero rows: every score of a row is the same."""
    x = torch.cat([torch.ones(n, d), torch.zeros(2, d)]).to(device, dtype)
    return x, torch.ones(k, d, device=device, dtype=dtype)


def check_ties(backend: str, block: int, dtype: torch.dtype, device: str) -> None:
    x, c, expected = tied_problem(block, dtype, device)
    index, score = sk.assign(x, c, backend=backend)
    assert index.cpu().tolist() == expected.tolist(), f"{backend} {dtype} block {block}: a tie went to a copy"
    ex, ec = all_equal(device, dtype=dtype)
    index, _ = sk.assign(ex, ec, backend=backend)
    assert index.cpu().tolist() == [0] * ex.shape[0], f"{backend} {dtype}: equal scores must pick 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_ties(dtype):
    check_ties("reference", CPU_PANEL, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_ties(dtype):
    require("cpu")
    check_ties("cpu", CPU_PANEL, dtype, "cpu")


@pytest.mark.parametrize("kernels", ["portable", "avx2"])
def test_cpu_ties_other_micro_kernels(kernels):
    """The AVX2 and portable running argmax (forced by SMOG_CPU_KERNELS, read once per process)."""
    require("cpu")
    if kernels == "avx2" and not (cpu_has("avx2") and cpu_has("fma")):
        pytest.skip("this CPU has no AVX2 + FMA")
    code = textwrap.dedent("""
        import torch
        from tests.test_assign_ties import CPU_PANEL, DTYPES, check_ties
        for dtype in DTYPES:
            check_ties("cpu", CPU_PANEL, dtype, "cpu")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "SMOG_CPU_KERNELS": kernels}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


TRITON = [pytest.param("cpu", id="interpreter",
                       marks=[pytest.mark.skipif(not INTERPRETED, reason="needs a GPU or TRITON_INTERPRET=1")])]
if HAS_GPU:
    TRITON = [pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu])]


@pytest.fixture
def triton_split(monkeypatch):
    """Forces the number of K splits of the Triton kernels (None: their own choice)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from smog_kernels.triton import ops

    def set_split(value):
        monkeypatch.setattr(ops, "SPLIT_OVERRIDE", value)
    return set_split


@pytest.mark.parametrize("device", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [1, 2, 5])
def test_triton_ties(device, dtype, split, triton_split):
    """K = 4 tiles + 7 (5 tiles): one split (ties across tiles in the running best), 2 splits of 3
    tiles (a split boundary inside the tie sets' range) and 5 splits of 1 tile (every tile boundary
    is a split boundary: ties meet in the merge kernel)."""
    require("triton")
    triton_split(split)
    block = triton_tile(dtype, device, 24)
    check_ties("triton", block, dtype, device)
    if split > 1:
        boundary = -(-5 // split) * block  # first k of split 1
        _, c, _ = tied_problem(block, dtype, device, seed=1)
        c[boundary] = c[boundary - 1]  # a copy just across the split boundary
        index, _ = sk.assign(c[boundary - 1:boundary], c, backend="triton")
        assert index.tolist() == [boundary - 1]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ["split", "no split"])
def test_cuda_ties(dtype, rows):
    """Few rows: K is split, one tile per split (every tile boundary is a split boundary, ties meet in
    the merge kernel). Enough rows for 2 blocks per SM: one split, ties meet in the running best."""
    require("cuda")
    x, c, expected = tied_problem(CUDA_TILE, dtype, "cuda")
    if rows == "no split":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        reps = -(-2 * sms * 64 // x.shape[0])
        x, expected = x.repeat(reps, 1), expected.repeat(reps)
    index, _ = sk.assign(x, c, backend="cuda")
    assert index.cpu().tolist() == expected.tolist()
    ex, ec = all_equal("cuda", n=x.shape[0], k=300, dtype=dtype)
    assert sk.assign(ex, ec, backend="cuda")[0].cpu().tolist() == [0] * ex.shape[0]

