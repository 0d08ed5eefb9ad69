"""Per-process memory bank: the online z of the update crops of this process's shard of one epoch, by position.

As the authors keep it (docs/method.md, "Re-clustering"): row i holds the sample at position i of the
process's epoch order. The trainer writes each batch at the next position, so after an epoch the bank
holds that epoch's shard, every sample once; across processes (disjoint shards) the banks together hold
every trained sample exactly once, at most one epoch old.
"""
from __future__ import annotations

import torch


class MemoryBank:
    """bank [V, size, D] (view v: update crop v), index int64 [size] (dataset index of each row, -1 = empty)
    and `position`, the row the next write starts at. Writes run round the bank: size is one epoch's rows,
    so the position is back at 0 at every epoch start. Head h clusters view h mod V."""

    def __init__(self, size: int, dim: int, views: int = 2, device: torch.device | str = "cpu"):
        self.bank = torch.zeros(views, size, dim, device=device)
        self.index = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.position = 0

    @property
    def views(self) -> int:
        return self.bank.shape[0]

    @property
    def size(self) -> int:
        return self.bank.shape[1]

    @torch.no_grad()
    def write(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        """index int64 [N] (dataset indices), rows [V, N, D] -> rows position .. position + N; position += N."""
        n, end = index.shape[0], self.position + index.shape[0]
        if rows.shape[:2] != (self.views, n) or rows.shape[2] != self.bank.shape[2]:
            raise ValueError(f"rows {tuple(rows.shape)} must be [V={self.views}, N={n}, D={self.bank.shape[2]}] "
                             f"for index of shape {tuple(index.shape)}")
        if end > self.size:
            raise ValueError(f"writing {n} rows at position {self.position} overruns the memory bank's {self.size} "
                             f"rows (one epoch's shard)")
        self.bank[:, self.position:end] = rows.to(self.bank.dtype)
        self.index[self.position:end] = index.to(self.index.device)
        self.position = end % self.size

    def rows(self, view: int) -> torch.Tensor:
        """The filled rows of `view`: [n_filled, D]."""
        return self.bank[view][self.index >= 0]

    @property
    def count(self) -> int:
        return int((self.index >= 0).sum())

    def state_dict(self) -> dict:
        return {"bank": self.bank, "index": self.index, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        missing = {"bank", "index", "position"} - set(state)
        if missing:
            raise ValueError(f"memory bank state lacks {sorted(missing)} (has {sorted(state)}): it is not a "
                             f"per-shard bank of rows, dataset indices and write position")
        if state["bank"].shape != self.bank.shape:
            raise ValueError(f"memory bank shape {tuple(state['bank'].shape)} in the checkpoint does not match "
                             f"this run's {tuple(self.bank.shape)} [views, rows per process = steps per epoch x "
                             f"per-process batch, model.dim] (data, train.batch_size, process count or model.dim "
                             f"changed)")
        self.bank.copy_(state["bank"])
        self.index.copy_(state["index"])
        self.position = int(state["position"])
