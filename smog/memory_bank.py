"""Per-process memory bank: online z of the update crops (method.update_crops), one row per (global) dataset index."""
from __future__ import annotations

import torch


class MemoryBank:
    """bank [views, size, D] with a `filled` mask [size]; head h clusters the filled rows of view h mod views."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", views: int = 2):
        self.bank = torch.zeros(views, size, dim, device=device)
        self.filled = torch.zeros(size, dtype=torch.bool, device=device)

    @torch.no_grad()
    def write(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        """index int64 [N] (dataset indices), rows [views, N, D] -> bank[:, index] = rows."""
        index = index.to(self.bank.device)
        self.bank[:, index] = rows.to(self.bank.dtype)
        self.filled[index] = True

    def rows(self, view: int) -> torch.Tensor:
        """The filled rows of one view: [n_filled, D]."""
        return self.bank[view][self.filled]

    @property
    def count(self) -> int:
        return int(self.filled.sum())

    def state_dict(self) -> dict:
        return {"bank": self.bank, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if state["bank"].shape != self.bank.shape:
            raise ValueError(f"memory bank shape {tuple(state['bank'].shape)} in the checkpoint does not match "
                             f"this run's {tuple(self.bank.shape)} (dataset size or model.dim changed)")
        self.bank.copy_(state["bank"])
        self.filled.copy_(state["filled"])
