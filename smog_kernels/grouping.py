"""SMoG's grouping as one nn.Module: H heads of K group features, the grouping step of every head, and
re-clustering, for use in any training loop (smog's own trainer uses it too).

Example:

    >>> import torch, torch.nn.functional as F
    >>> from smog_kernels import Grouping
    >>> grouping = Grouping(heads=3, num_groups=300, dim=128, temperature=0.1)
    >>> unit = lambda *shape: F.normalize(torch.randn(*shape), dim=-1)
    >>> z_k, z_q, p = unit(2, 64, 128), unit(2, 64, 128), unit(4, 64, 128).requires_grad_()
    >>> loss = grouping(z_k, z_q, p, beta=0.99)   # targets, assignment, group update, loss
    >>> loss.backward()                           # dL/dp; grouping.groups now holds G'
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import smog_kernels.distributed as distributed
from smog_kernels import _validate as check
from smog_kernels.api import spherical_kmeans
from smog_kernels.graphed_step import GraphedGroupingStep
from smog_kernels.kmeans import StatsReducer
from smog_kernels.step import GroupingCycle, GroupingStep


class Grouping(nn.Module):
    """Group features `groups` [H, K, D] (a float32 buffer of unit rows, saved in the state_dict) and
    SMoG's grouping step for each head.

    forward(target_rows [T, N, D], update_rows [U, M, D], predictions [V, N, D], beta) -> loss: for every
    head h, the targets are the groups of target_rows under G_h, the rows update_rows[h % U] are assigned
    under G_h and their statistics move G_h to G'_h (momentum beta), and every prediction is scored against
    G'_h for every target set; the loss is the mean over heads. In training mode the buffer then holds G'.
    Rows are L2-normalised, float32, bfloat16 or float16 (the products use the groups rounded to the
    rows' dtype; the update stays float32). `result` keeps the last call's details, stacked over heads.

    Across processes (torch.distributed initialised, more than one process in `process_group`, None = the
    default group) the statistics are reduced so that every process moves the groups as one process
    holding the whole global batch would; sync=False keeps them local.

    Gradient accumulation: call forward with last=False for every sub-batch of a cycle but the last. Those
    sub-batches are scored against G and their statistics held; the last one completes them, moves G to G'
    and is scored against G' (the authors' multi_forward). A cycle of one sub-batch is
    smog_kernels.grouping_step, head by head.
    """

    groups: torch.Tensor

    def __init__(self, heads: int, num_groups: int, dim: int, temperature: float = 0.1, grad_groups: bool = False,
                 backend: str = "auto", sync: bool = True, process_group: dist.ProcessGroup | None = None,
                 cuda_graphs: bool = False) -> None:
        super().__init__()
        for name, value in (("heads", heads), ("num_groups", num_groups), ("dim", dim)):
            check.num_groups_at_least_one(name, value)
        check.positive("temperature", temperature)
        if cuda_graphs and grad_groups:
            raise ValueError("cuda_graphs=True replays the step without a gradient into the groups: "
                             "set grad_groups=False")
        self.temperature, self.grad_groups, self.backend = float(temperature), bool(grad_groups), backend
        self.sync, self.process_group = sync, process_group
        self.register_buffer("groups", F.normalize(torch.randn(heads, num_groups, dim), dim=2))
        self._graphs = [GraphedGroupingStep(temperature, backend=backend) for _ in range(heads)] if cuda_graphs else None
        self._cycles: list[GroupingCycle] | None = None  # the open accumulation cycle, one per head
        self._reducer: StatsReducer | None = None
        self.result: GroupingStep | None = None

    @property
    def heads(self) -> int:
        return self.groups.shape[0]

    @property
    def num_groups(self) -> int:
        return self.groups.shape[1]

    def reducer(self) -> StatsReducer | None:
        """The cross-process reducer of the statistics, None on one process or with sync=False."""
        if not self.sync or distributed.world_size(self.process_group) == 1:
            return None
        if self._reducer is None:
            self._reducer = distributed.GroupStatsSync(self.process_group)
        return self._reducer

    def forward(self, target_rows: torch.Tensor, update_rows: torch.Tensor, predictions: torch.Tensor,
                beta: float, last: bool = True) -> torch.Tensor:
        """The loss (scalar float32) of one step, or of one sub-batch of an accumulation cycle (last=False)."""
        check.features("update_rows", update_rows, rank=3)
        if update_rows.shape[0] < 1:
            raise ValueError(f"update_rows must hold at least one set of rows [U >= 1, M, D], "
                             f"got shape {tuple(update_rows.shape)}")
        if self._graphs is not None:
            steps = self._graphed(target_rows, update_rows, predictions, beta, last)
        else:
            if self._cycles is None:
                reducer = self.reducer()
                # each cycle keeps a copy of G: the buffer takes G' while earlier sub-batches' losses may
                # still hold G for their backward
                self._cycles = [GroupingCycle(self.groups[h].clone(), self.temperature, self.grad_groups, reducer,
                                              self.backend) for h in range(self.heads)]
            cycles = self._cycles
            if last:
                self._cycles = None
            steps = [cycles[h].step(target_rows, update_rows[h % update_rows.shape[0]], predictions, beta, last)
                     for h in range(self.heads)]
        self.result = GroupingStep(*(torch.stack(parts) for parts in zip(*steps)))
        if last and self.training:
            with torch.no_grad():
                self.groups.copy_(self.result.groups)
        return self.result.loss.mean()

    def _graphed(self, target_rows: torch.Tensor, update_rows: torch.Tensor, predictions: torch.Tensor,
                 beta: float, last: bool) -> list[GroupingStep]:
        """Each head's step replayed from its CUDA graphs (one process, no accumulation)."""
        if not last or self.reducer() is not None:
            raise ValueError("cuda_graphs=True runs whole steps on one process: no accumulation (last=False) "
                             "and no cross-process reduction (sync=False or one process)")
        steps = []
        for h in range(self.heads):
            out = self._graphs[h](self.groups[h], target_rows, update_rows[h % update_rows.shape[0]], predictions, beta)
            # the outputs live in the graph's buffers until that head's next replay: copy what is kept
            steps.append(GroupingStep(out.loss, out.groups.clone(), out.targets.clone(), out.index.clone(),
                                      out.counts.clone()))
        return steps

    @torch.no_grad()
    def recluster(self, rows: list[torch.Tensor], iters: int = 10, seed: int = 0) -> torch.Tensor:
        """Spherical k-means of every head: head h clusters rows[h % len(rows)] ([n, D] each, e.g. the views of
        a memory bank) with seed `seed + h`, over every process's rows when synchronised, and takes the result
        as its groups. Returns the bank rows' groups under the new groups, int64 [H, n]."""
        if not rows:
            raise ValueError("rows must hold at least one [n, D] tensor of rows to cluster")
        index = []
        for h in range(self.heads):
            x = rows[h % len(rows)]
            if self.sync:
                groups, members = distributed.spherical_kmeans(x, self.num_groups, iters, seed + h,
                                                               group=self.process_group, backend=self.backend)
            else:
                groups, members = spherical_kmeans(x, self.num_groups, iters, seed + h, backend=self.backend)
            self.groups[h] = groups
            index.append(members)
        return torch.stack(index)
