"""Group statistics and spherical k-means across processes (torch.distributed: gloo, NCCL).

SMoG's groups must be identical on every rank and equal to what one process holding the whole
global batch computes (docs/method.md, "One training iteration", step 3). Two strategies give the global statistics
(sums float32 [K, D], counts int64 [K]); W = world size, N = rows per rank (the largest rank's),
e = bytes per feature element:

- "allreduce": local statistics, then ONE all-reduce of a flat buffer holding the sums and the
  counts split as count = hi * 4096 + lo (both halves stay exact integers in the sums' float type:
  global counts up to 2**36 per group, at most 4096 ranks). Bytes sent per rank (ring):
  2 (W - 1) / W * 4 K (D + 2).
- "allgather": ONE all-gather of every rank's rows and groups packed as bytes (N x (e D + 8)), then
  the statistics of all W * N gathered rows on every rank, in rank order, i.e. the single-process
  row order, with torch.use_deterministic_algorithms switched on for that call so that every
  backend takes its deterministic (sort + segmented sum) path on GPUs: the ranks must get the same
  bits, and atomic float adds would not give them. Bytes sent per rank (ring):
  (W - 1) * N * (e D + 8), and every rank then sums W * N rows instead of N. Uneven shares are padded to N; padding rows carry group K and fall into an extra
  group that is dropped. N is `max_rows` when the caller gives it (same value on every rank);
  otherwise the row counts are all-gathered first: one more (tiny) collective and a host read.

`choose_strategy` ("auto") weighs the all-gather's bytes twice, since every rank also packs,
unpacks and sums all W * N gathered rows, and takes it when 2 * (its bytes) < (the all-reduce's
bytes): W * N * (e D + 8) < 4 K (D + 2), about W * N < K for float32 rows (the bytes alone would
say W * N < 2 K). bench/distributed times both strategies against this rule (docs/benchmarks.md).
Pass strategy= to override.

Gradients (the grad-into-groups variant): the all-reduce's backward all-reduces (sums) the
gradient of the global sums, and the all-gather's backward all-reduces the gradient of the
gathered rows and keeps this rank's slice. Each rank's rows thus receive the gradient of the SUM
of all ranks' losses, which is the convention of DistributedDataParallel: every rank back-propagates
its own loss and DDP averages the parameter gradients, so the parameters get the gradient of the
mean of the per-rank losses along every path. No division happens here.

Failures: every collective error (a peer that died, hung past the process group's timeout, set by
`init_process_group(timeout=...)`) is re-raised as a RuntimeError naming the operation and the rank.
With torch.distributed not initialised, or a group of one process, everything is local.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from smog_kernels import _validate as check
from smog_kernels import reference
from smog_kernels.backend import Backend
from smog_kernels.registry import resolve
from smog_kernels.kmeans import lloyd

STRATEGIES = ("auto", "allreduce", "allgather")
_COUNT_SPLIT = 4096  # counts travel as (count // 4096, count % 4096): exact in float32 below 2**24
_MAX_RANKS = 4096  # W * 4095 low parts must stay below 2**24
# all_gather_single is the newer name of all_gather_into_tensor (deprecated since torch 2.14)
_GATHER_INTO = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


# ---- process group helpers ---------------------------------------------------------------------


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in `group` (the default group when None); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


def _collective(what: str, group: dist.ProcessGroup | None, run: Callable[[], object]) -> object:
    """Runs one collective; a failure becomes a RuntimeError that says which and where."""
    try:
        return run()
    except RuntimeError as error:  # includes torch.distributed.DistError and its subclasses
        raise RuntimeError(
            f"smog_kernels.distributed: {what} failed on rank {_rank(group)} of {world_size(group)}; "
            f"a peer process died, hung or timed out (the limit is init_process_group(timeout=...)): {error}"
        ) from error


def _all_reduce(t: torch.Tensor, what: str, group: dist.ProcessGroup | None) -> torch.Tensor:
    _collective(what, group, lambda: dist.all_reduce(t, group=group))
    return t


def _all_gather(t: torch.Tensor, what: str, group: dist.ProcessGroup | None) -> torch.Tensor:
    """t [n, ...] on every rank -> [W * n, ...] in rank order."""
    out = t.new_empty((world_size(group) * t.shape[0], *t.shape[1:]))
    _collective(what, group, lambda: _GATHER_INTO(out, t.contiguous(), group=group))
    return out


def _row_counts(n: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's row count (one small all-gather and a host read)."""
    sizes = _all_gather(torch.tensor([n], dtype=torch.int64, device=device), "all-gather of row counts", group)
    return sizes.tolist()


# ---- strategy rule -----------------------------------------------------------------------------


def bytes_moved(strategy: str, rows_per_rank: int, num_groups: int, dim: int, world: int,
                element_size: int = 4) -> int:
    """Bytes one rank sends for one reduction under the ring model of the collective.

    "allreduce": 2 (W-1)/W of the [K*(D+2)] float32 buffer; "allgather": (W-1) packed row blocks of
    rows_per_rank x (element_size * D + 8) bytes. 0 for a single process.
    """
    if strategy == "allreduce":
        return (2 * (world - 1) * 4 * num_groups * (dim + 2)) // world
    if strategy == "allgather":
        return (world - 1) * rows_per_rank * (element_size * dim + 8)
    raise ValueError(f"strategy must be 'allreduce' or 'allgather', got {strategy!r}")


def choose_strategy(rows_per_rank: int, num_groups: int, dim: int, world: int, element_size: int = 4) -> str:
    """"allgather" when twice its bytes (sent, then summed again on every rank) are fewer than
    "allreduce"'s bytes, about W * N < K; else "allreduce".

    rows_per_rank must be the same on every rank (the largest share), or ranks would disagree.
    """
    gather = bytes_moved("allgather", rows_per_rank, num_groups, dim, world, element_size)
    reduce = bytes_moved("allreduce", rows_per_rank, num_groups, dim, world, element_size)
    return "allgather" if 2 * gather < reduce else "allreduce"


# ---- autograd-aware collectives ----------------------------------------------------------------


class _AllReduceStats(torch.autograd.Function):
    """(sums [K, D], counts int64 [K]) -> their sums over the group, in one collective.

    Backward: the gradient of the global sums is summed over ranks (every rank's loss depends on
    every rank's rows).
    """

    @staticmethod
    def forward(ctx, sums: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup | None):
        k, d = sums.shape
        buf = torch.empty(k * (d + 2), dtype=sums.dtype, device=sums.device)
        buf[: k * d].view(k, d).copy_(sums)
        buf[k * d : k * (d + 1)].copy_(counts % _COUNT_SPLIT)
        buf[k * (d + 1) :].copy_(counts // _COUNT_SPLIT)
        _all_reduce(buf, "all-reduce of group statistics", group)
        low, high = buf[k * d : k * (d + 1)], buf[k * (d + 1) :]
        total = high.to(torch.int64) * _COUNT_SPLIT + low.to(torch.int64)
        ctx.group = group
        ctx.mark_non_differentiable(total)
        return buf[: k * d].view(k, d), total

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor, _grad_counts: torch.Tensor | None):
        grad = _all_reduce(grad_sums.contiguous().clone(), "all-reduce of group-statistics gradients", ctx.group)
        return grad, None, None


class _GatherRows(torch.autograd.Function):
    """x [n, D], index int64 [n] -> (x [W * n_max, D], index [W * n_max]) of all ranks, rank order.

    One all-gather of the rows' bytes with their group appended; ranks with n < n_max send padding
    rows (zeros, group `pad_group`). Backward: the gathered rows' gradient is summed over ranks and
    this rank's slice is returned.
    """

    @staticmethod
    def forward(ctx, x, index, n_max: int, pad_group: int, group: dist.ProcessGroup | None):
        n, d = x.shape
        width = d * x.element_size()
        packed = torch.zeros(n_max, width + 8, dtype=torch.uint8, device=x.device)
        packed[:n, :width] = x.contiguous().view(torch.uint8).view(n, width)
        groups = torch.full((n_max,), pad_group, dtype=torch.int64, device=x.device)
        groups[:n] = index
        packed[:, width:] = groups.view(torch.uint8).view(n_max, 8)
        gathered = _all_gather(packed, "all-gather of rows and groups", group)
        rows = gathered[:, :width].contiguous().view(x.dtype).view(-1, d)
        groups_all = gathered[:, width:].contiguous().view(torch.int64).view(-1)
        ctx.group, ctx.n, ctx.n_max, ctx.dtype = group, n, n_max, x.dtype
        ctx.mark_non_differentiable(groups_all)
        return rows, groups_all

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, _grad_groups: torch.Tensor | None):
        wide = torch.promote_types(grad_rows.dtype, torch.float32)
        grad = _all_reduce(grad_rows.to(wide).contiguous(), "all-reduce of gathered-row gradients", ctx.group)
        start = _rank(ctx.group) * ctx.n_max
        return grad[start : start + ctx.n].to(ctx.dtype), None, None, None, None


# ---- statistics ---------------------------------------------------------------------------------


def _local_stats(ops: Backend, x: torch.Tensor, index: torch.Tensor, num_groups: int):
    """group_stats, through the differentiable reference when x needs a gradient."""
    if x.requires_grad and torch.is_grad_enabled():
        return reference.group_stats(x, index, num_groups)
    return ops.group_stats(x, index, num_groups)


@contextlib.contextmanager
def _deterministic_algorithms() -> Iterator[None]:
    """torch.use_deterministic_algorithms(True) inside, the caller's setting restored after."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _check_rows(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> None:
    """Shapes and dtypes; index values are range-checked only on the CPU (elsewhere that would sync)."""
    check.features("x", x)
    check.num_groups_at_least_one("num_groups", num_groups)
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or tuple(index.shape) != (x.shape[0],):
        shown = f"{tuple(index.shape)} {index.dtype}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"index must be an int64 tensor of shape ({x.shape[0]},) (one group per row of x), got {shown}")
    check.same_device(x=x, index=index)
    if index.device.type == "cpu":
        check.group_index("index", index, (x.shape[0],), num_groups)


class GroupStatsSync:
    """Sums group statistics over a process group (identity for a single process).

    Called as `sync(sums, counts)` it is the `reduce_stats` hook of `grouping_step` and k-means: an
    all-reduce, autograd-aware (sums [K, D] float32/float64, counts int64 [K]). `sync.from_rows(x,
    index, num_groups)` applies `strategy` ("auto", "allreduce" or "allgather") to the rows.
    `max_rows`: an upper bound on any rank's row count, the same on every rank; it spares
    "auto" and "allgather" a preliminary all-gather of the row counts.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, strategy: str = "auto",
                 max_rows: int | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
            raise ValueError(f"max_rows must be None or an int >= 0, got {max_rows!r}")
        self.group, self.strategy, self.max_rows = group, strategy, max_rows

    @property
    def world_size(self) -> int:
        return world_size(self.group)

    def __call__(self, sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local (sums [K, D], counts int64 [K]) -> global ones (all-reduce of one packed buffer)."""
        world = self.world_size
        if world == 1:
            return sums, counts
        if world > _MAX_RANKS:
            raise ValueError(f"exact packed counts support at most {_MAX_RANKS} processes, got {world}")
        if sums.dtype not in (torch.float32, torch.float64) or sums.dim() != 2:
            raise TypeError(f"sums must be float32 or float64 [K, D], got shape {tuple(sums.shape)}, {sums.dtype}")
        if counts.dtype != torch.int64 or tuple(counts.shape) != (sums.shape[0],):
            raise TypeError(f"counts must be int64 of shape ({sums.shape[0]},), got {tuple(counts.shape)}, {counts.dtype}")
        return _AllReduceStats.apply(sums, counts, self.group)

    def from_rows(self, x: torch.Tensor, index: torch.Tensor, num_groups: int,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows x [n, D] and groups index int64 [n] -> global (sums float32 [K, D], counts int64 [K]).

        Gradients flow into x when it requires them (see the module notes for the convention).
        """
        _check_rows(x, index, num_groups)
        ops = resolve(backend, x)
        if self.world_size == 1:
            return _local_stats(ops, x, index, num_groups)
        strategy, n_max = self.strategy, self.max_rows
        if strategy != "allreduce" and n_max is None:
            n_max = max(_row_counts(x.shape[0], x.device, self.group))
        if n_max is not None and x.shape[0] > n_max:
            raise ValueError(f"x has {x.shape[0]} rows on rank {_rank(self.group)}, more than max_rows={n_max}")
        if strategy == "auto":
            strategy = choose_strategy(n_max, num_groups, x.shape[1], self.world_size, x.element_size())
        if strategy == "allreduce":
            return self(*_local_stats(ops, x, index, num_groups))
        rows, groups = _GatherRows.apply(x, index, n_max, num_groups, self.group)
        with _deterministic_algorithms():  # every rank must sum the same rows to the same bits
            sums, counts = _local_stats(ops, rows, groups, num_groups + 1)  # group K = padding
        return sums[:num_groups], counts[:num_groups]


def make_stats_reducer(group: dist.ProcessGroup | None = None, strategy: str = "auto",
                       max_rows: int | None = None) -> GroupStatsSync:
    """The cross-process `reduce_stats(sums, counts) -> (sums, counts)` hook (see GroupStatsSync)."""
    return GroupStatsSync(group, strategy, max_rows)


def sync_group_stats(x: torch.Tensor, index: torch.Tensor, num_groups: int,
                     group: dist.ProcessGroup | None = None, strategy: str = "auto",
                     max_rows: int | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Global (sums float32 [K, D], counts int64 [K]) of every rank's rows x [n, D] with groups index [n].

    Equal to group_stats on the concatenation of all ranks' rows in rank order (sums to float32
    rounding, counts exactly); the same on every rank.
    """
    return GroupStatsSync(group, strategy, max_rows).from_rows(x, index, num_groups, backend)


# ---- spherical k-means -------------------------------------------------------------------------


def _global_initial_rows(x: torch.Tensor, num_groups: int, seed: int,
                         group: dist.ProcessGroup | None) -> torch.Tensor:
    """initial_groups(concatenation of all ranks' x, K, rank 0's seed) [K, D] float32, on every rank.

    Rank 0's seed and every rank's row count travel in one small all-gather; each rank then draws
    the same K global row numbers, fills in the rows it holds, and one all-reduce of the (otherwise
    zero) [K, D] matrix assembles them.
    """
    meta = _all_gather(torch.tensor([[x.shape[0], seed]], dtype=torch.int64, device=x.device),
                       "all-gather of row counts", group).tolist()
    sizes, seed0 = [n for n, _ in meta], meta[0][1]
    total = sum(sizes)
    if total < num_groups:
        raise ValueError(
            f"the ranks hold {total} rows in all ({sizes}), fewer than num_groups={num_groups} initial groups"
        )
    generator = torch.Generator().manual_seed(seed0)
    rows = torch.randperm(total, generator=generator)[:num_groups]  # as initial_groups on the union
    start = sum(sizes[: _rank(group)])
    mine = (rows >= start) & (rows < start + x.shape[0])
    init = torch.zeros(num_groups, x.shape[1], dtype=torch.float32, device=x.device)
    init[mine.to(x.device)] = x[(rows[mine] - start).to(x.device)].float()
    return _all_reduce(init, "all-reduce of initial groups", group)


def spherical_kmeans(
    x_local: torch.Tensor,
    num_groups: int,
    iters: int = 10,
    seed: int = 0,
    init: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means over the union of every rank's rows (e.g. per-rank memory banks).

    x_local [n, D] (n may differ between ranks, or be 0). init [K, D]: rank 0's is broadcast; None
    draws K distinct rows of the union in rank order with rank 0's `seed`, exactly as the
    single-process `smog_kernels.spherical_kmeans` on the concatenation would. Every iteration
    all-reduces the statistics. Returns (groups [K, D] in x's dtype, identical on all ranks;
    index int64 [n] of this rank's rows under the returned groups).
    """
    if world_size(group) == 1:
        check.check_kmeans(x_local, num_groups, iters, init)
        ops = resolve(backend, x_local, num_groups, "assign")  # as smog_kernels.spherical_kmeans
        return lloyd(ops, x_local, num_groups, iters, seed, init)
    check.features("x_local", x_local)
    check.num_groups_at_least_one("num_groups", num_groups)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    ops = resolve(backend, x_local)  # not by this rank's row count: the same backend on every rank
    if init is None:
        start = _global_initial_rows(x_local, num_groups, seed, group)
    else:
        check.features("init", init)
        if tuple(init.shape) != (num_groups, x_local.shape[1]):
            raise ValueError(f"init must have shape ({num_groups}, {x_local.shape[1]}), got {tuple(init.shape)}")
        check.same_device(x_local=x_local, init=init)
        start = init.float().contiguous().clone()
        _collective("broadcast of initial groups", group,
                    lambda: dist.broadcast(start, src=0 if group is None else dist.get_global_rank(group, 0), group=group))
    return lloyd(ops, x_local, num_groups, iters, init=start, reduce_stats=GroupStatsSync(group, "allreduce"))


__all__ = [
    "GroupStatsSync",
    "STRATEGIES",
    "bytes_moved",
    "choose_strategy",
    "make_stats_reducer",
    "spherical_kmeans",
    "sync_group_stats",
    "world_size",
]
