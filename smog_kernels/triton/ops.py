"""Launchers of the Triton kernels: block configurations, split-K decisions, output allocation.

No launcher synchronises with the host: grid sizes depend on shapes only, and every data-dependent
quantity (group boundaries, weight scale) stays on the device. The launch sequence of a step is
therefore CUDA-graph capturable.

Settings (module smog_kernels.triton.ops, read at call time):
  DETERMINISTIC  None (default): the environment variable SMOG_TRITON_DETERMINISTIC=1, or
                 torch.are_deterministic_algorithms_enabled(), selects the deterministic statistics
                 path (sort by group + segmented sum, bitwise reproducible); otherwise float32 atomics
                 (faster, summation order varies between runs). True/False force one path.
  SPLIT_OVERRIDE None, or an int forcing the number of K splits (assign, loss) / row splits (group
                 gradient); used by the tests to exercise the split-K merges.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from smog_kernels.triton import kernels as k

DETERMINISTIC: bool | None = None
SPLIT_OVERRIDE: int | None = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def deterministic() -> bool:
    if DETERMINISTIC is not None:
        return bool(DETERMINISTIC)
    if os.environ.get("SMOG_TRITON_DETERMINISTIC", "") not in ("", "0"):
        return True
    return torch.are_deterministic_algorithms_enabled()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a pretend small GPU so that the split paths run in tests
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for float32 only when PyTorch allows it for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast(t: torch.Tensor) -> bool:
    """Widen bfloat16 dot operands under the interpreter (its numpy tl.dot is wrong for bfloat16)."""
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _config(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> dict:
    """Tile sizes and launch parameters. Under the interpreter (CPU tensors) small tiles keep the
    tests fast and make K and N span several tiles. On the GPU: tuned for Hopper (H100/H200:
    228 KB shared memory, 64K registers per SM), sane on Ampere (smaller stage counts fit)."""
    bd = block_d(d)
    if device.type != "cuda":
        return dict(BM=16, BN=16, num_warps=1, num_stages=1)
    wide = dtype == torch.float32
    big_d = bd >= 256
    major = torch.cuda.get_device_capability(device)[0]
    stages = 3 if major >= 9 else 2
    # (Checked by compiling for sm_90 with ptxas -v: no register spills with unit feature strides.)
    # float32 (IEEE, no tensor cores): small tiles, because the unrolled FMA products of big ones
    # make ptxas slow to compile each kernel; float32 speed is not what this backend is for.
    if kind == "assign":
        if wide:
            return dict(BM=32, BN=32 if big_d else 64, num_warps=8, num_stages=2)
        if big_d:
            return dict(BM=128, BN=64, num_warps=8, num_stages=2)
        return dict(BM=128, BN=128, num_warps=8, num_stages=stages)
    if kind == "loss":
        if wide:
            return dict(BM=32, BN=16, num_warps=8, num_stages=2) if big_d else \
                dict(BM=32, BN=32, num_warps=8, num_stages=1)
        if big_d:
            return dict(BM=128, BN=64, num_warps=8, num_stages=2) if major >= 9 else \
                dict(BM=64, BN=64, num_warps=4, num_stages=2)
        return dict(BM=128, BN=64, num_warps=8, num_stages=stages)
    if kind == "group_grad":  # BN = group block (kept), BM = row tile (streamed)
        if wide:
            return dict(BM=16 if big_d else 32, BN=32, num_warps=8, num_stages=2)
        if big_d:
            return dict(BM=32, BN=64, num_warps=8, num_stages=2)
        return dict(BM=64, BN=128, num_warps=8, num_stages=stages)
    raise ValueError(kind)


def _splits(work_blocks: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split) for the streamed dimension (K for assign/loss, N for the group
    gradient), every split but the last holding the same number of tiles and none empty."""
    split = _split_count(work_blocks, tiles, device)
    per = triton.cdiv(tiles, split)
    return triton.cdiv(tiles, per), per


def _split_count(work_blocks: int, tiles: int, device: torch.device) -> int:
    """How many ways to split: the split count whose program count best fills whole waves of the
    GPU's SMs (one resident program per SM for the big tiles): the fewest splits within 90% of the
    best fill; each split keeps at least 4 tiles on the GPU (fewer is all merge overhead)."""
    if SPLIT_OVERRIDE is not None:
        return max(1, min(int(SPLIT_OVERRIDE), tiles))
    sms = sm_count(device)
    if device.type != "cuda":
        return 1 if work_blocks >= sms else max(1, min(triton.cdiv(sms, work_blocks), tiles))
    most = max(1, min(tiles // 4, 4 * triton.cdiv(sms, work_blocks)))

    def fill(split: int) -> float:
        programs = work_blocks * split
        return programs / (triton.cdiv(programs, sms) * sms)

    best = max(fill(split) for split in range(1, most + 1))
    return next(split for split in range(1, most + 1) if fill(split) >= 0.9 * best)


def _launch_kw(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


# ---- assignment -----------------------------------------------------------------------------------


def assign(x: torch.Tensor, groups: torch.Tensor, stats_from: int | None = None,
           num_groups: int | None = None):
    """(index int64 [N], score float32 [N]); with stats_from not None also (sums, counts) of the rows
    x[stats_from:] by their assigned group, accumulated in the same launch (atomic path) or by the
    deterministic kernel right after."""
    n, d = x.shape
    kk = groups.shape[0]
    dev = x.device
    index = torch.empty(n, dtype=torch.int64, device=dev)
    score = torch.empty(n, dtype=torch.float32, device=dev)
    stats = stats_from is not None
    fused_stats = stats and not deterministic()
    if stats:
        sums = torch.zeros(kk if num_groups is None else num_groups, d, dtype=torch.float32, device=dev)
        counts = torch.zeros(sums.shape[0], dtype=torch.int64, device=dev)
    else:
        sums, counts = score, index  # unused pointers
    if n > 0:
        cfg = _config("assign", dev, x.dtype, d)
        bm, bn, bd = cfg["BM"], cfg["BN"], block_d(d)
        row_blocks = triton.cdiv(n, bm)
        tiles = triton.cdiv(kk, bn)
        split, per = _splits(row_blocks, tiles, dev)
        if split == 1:
            vals, idxs = score, index
        else:
            vals = torch.empty(split, n, dtype=torch.float32, device=dev)
            idxs = torch.empty(split, n, dtype=torch.int64, device=dev)
        k.assign_kernel[(row_blocks, split)](
            x, groups, vals, idxs, sums, counts,
            n, kk, d, per, 0 if stats_from is None else stats_from,
            x.stride(0), x.stride(1), groups.stride(0), groups.stride(1), sums.stride(0),
            BM=bm, BN=bn, BD=bd, PRECISION=precision(x.dtype), UPCAST=upcast(x), STATS=fused_stats and split == 1,
            EVEN_K=kk % bn == 0,
            **_launch_kw(cfg),
        )
        if split > 1:
            mbm = 64 if dev.type == "cuda" else 16
            k.assign_merge_kernel[(triton.cdiv(n, mbm),)](
                vals, idxs, score, index, x, sums, counts,
                n, d, split, 0 if stats_from is None else stats_from,
                x.stride(0), x.stride(1), sums.stride(0),
                BM=mbm, BD=bd, STATS=fused_stats, num_warps=4 if dev.type == "cuda" else 1,
            )
    if not stats:
        return index, score
    if not fused_stats and n > stats_from:
        _stats_segmented(x[stats_from:], index[stats_from:], sums, counts)
    return index, score, sums, counts


# ---- group statistics -----------------------------------------------------------------------------


def _stats_segmented(x, index, sums, counts):
    """Deterministic statistics into zero-initialised sums/counts (sort + segmented sum)."""
    kk, d = sums.shape
    sorted_index, order = torch.sort(index, stable=True)
    groups = torch.arange(kk + 1, dtype=sorted_index.dtype, device=x.device)
    bounds = torch.searchsorted(sorted_index, groups)  # bounds[k] = first member of group k
    bd = min(block_d(d), 128)
    bm = 32 if x.device.type == "cuda" else 16
    k.stats_segmented_kernel[(kk, triton.cdiv(d, bd))](
        x, order, bounds, sums, counts, d,
        x.stride(0), x.stride(1), sums.stride(0),
        BM=bm, BD=bd, num_warps=4 if x.device.type == "cuda" else 1,
    )


def group_stats(x: torch.Tensor, index: torch.Tensor, num_groups: int):
    n, d = x.shape
    sums = torch.zeros(num_groups, d, dtype=torch.float32, device=x.device)
    counts = torch.zeros(num_groups, dtype=torch.int64, device=x.device)
    if n == 0:
        return sums, counts
    if deterministic():
        _stats_segmented(x, index, sums, counts)
        return sums, counts
    gpu = x.device.type == "cuda"
    bm = 32 if gpu else 16
    bd = min(block_d(d), 128)
    k.stats_atomic_kernel[(triton.cdiv(n, bm), triton.cdiv(d, bd))](
        x, index, sums, counts, n, d,
        x.stride(0), x.stride(1), index.stride(0), sums.stride(0),
        BM=bm, BD=bd, num_warps=4 if gpu else 1,
    )
    return sums, counts


# ---- momentum update ------------------------------------------------------------------------------


def momentum_update(groups: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, beta: float):
    kk, d = groups.shape
    gpu = groups.device.type == "cuda"
    # the interpreter truncates float32 -> bfloat16; let torch round (to nearest even) there
    out_dtype = torch.float32 if upcast(groups) else groups.dtype
    out = torch.empty(kk, d, dtype=out_dtype, device=groups.device)
    bd = block_d(d)
    bk = max(1, min(16 if gpu else 8, 8192 // bd)) if gpu else 8
    k.momentum_kernel[(triton.cdiv(kk, bk),)](
        groups, sums, counts, out, kk, d, float(beta),
        groups.stride(0), groups.stride(1), sums.stride(0), sums.stride(1), counts.stride(0),
        out.stride(0),
        BK=bk, BD=bd, num_warps=4 if gpu else 1,
    )
    return out.to(groups.dtype)


# ---- loss -----------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634


def loss_forward(p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, inv_temperature: float):
    n, d = p.shape
    kk = groups.shape[0]
    t = targets.shape[0]
    dev = p.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    att = torch.empty(n, d, dtype=torch.float32, device=dev)
    tlog = torch.empty(t, n, dtype=torch.float32, device=dev)
    if n == 0:
        return lse, tlog, att
    cfg = _config("loss", dev, p.dtype, d)
    bm, bn, bd = cfg["BM"], cfg["BN"], block_d(d)
    row_blocks = triton.cdiv(n, bm)
    tiles = triton.cdiv(kk, bn)
    split, per = _splits(row_blocks, tiles, dev)
    if split == 1:
        m_part = l_part = acc_part = lse
    else:
        m_part = torch.empty(split, n, dtype=torch.float32, device=dev)
        l_part = torch.empty(split, n, dtype=torch.float32, device=dev)
        acc_part = torch.empty(split, n, d, dtype=torch.float32, device=dev)
    inv_t = float(inv_temperature)
    k.loss_fwd_kernel[(row_blocks, split)](
        p, groups, targets, m_part, l_part, acc_part, lse, att, tlog,
        n, kk, d, t, per, inv_t, inv_t * _LOG2E,
        p.stride(0), p.stride(1), groups.stride(0), groups.stride(1),
        targets.stride(0), targets.stride(1),
        BM=bm, BN=bn, BD=bd, PRECISION=precision(p.dtype), UPCAST=upcast(p), FINAL=split == 1,
        EVEN_K=kk % bn == 0,
        **_launch_kw(cfg),
    )
    if split > 1:
        mbm = 32 if dev.type == "cuda" else 16
        k.loss_merge_kernel[(triton.cdiv(n, mbm),)](
            m_part, l_part, acc_part, lse, att, n, d, split, inv_t, inv_t * _LOG2E,
            BM=mbm, BD=bd, num_warps=4 if dev.type == "cuda" else 1,
        )
    if kk == 1:
        # one group: the softmax is exactly one-hot and every target logit is exactly the lse (the
        # kernel gets there too when the tensor cores give the same product for the same row and
        # column wherever they sit in a tile; this does not depend on that)
        tlog = lse.unsqueeze(0).expand(t, n).clone()
    return lse, tlog, att


def loss_group_grad(p: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor,
                       row_weight: torch.Tensor, inv_temperature: float):
    n, d = p.shape
    kk = groups.shape[0]
    dev = p.device
    if n == 0:
        return torch.zeros(kk, d, dtype=torch.float32, device=dev)
    cfg = _config("group_grad", dev, p.dtype, d)
    bm, bn, bd = cfg["BM"], cfg["BN"], block_d(d)
    col_blocks = triton.cdiv(kk, bn)
    row_tiles = triton.cdiv(n, bm)
    split, per_tiles = _splits(col_blocks, row_tiles, dev)
    out = torch.empty(split, kk, d, dtype=torch.float32, device=dev)
    lse = lse.contiguous()
    row_weight = row_weight.float().contiguous()
    wmax = row_weight.abs().amax().reshape(1)
    inv_t = float(inv_temperature)
    k.group_grad_kernel[(col_blocks, split)](
        p, groups, lse, row_weight, wmax, out,
        n, kk, d, per_tiles * bm, inv_t,
        p.stride(0), p.stride(1), groups.stride(0), groups.stride(1),
        BM=bm, BN=bn, BD=bd, PRECISION=precision(p.dtype), UPCAST=upcast(p),
        NORMALIZE_W=p.dtype == torch.float16, SPLIT_PROB=p.dtype != torch.float32,
        **_launch_kw(cfg),
    )
    return out[0] if split == 1 else out.sum(0)
