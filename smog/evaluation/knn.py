"""Weighted kNN classification on frozen features (InstDisc / lightly / DINO style)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract(net: nn.Module | None, loader: DataLoader, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised features [N, F], labels [N]); net None = raw pixels. The net is put in eval mode."""
    was_training = net.training if net is not None else False
    if net is not None:
        net.eval()
    feats, labels = [], []
    for images, y in loader:
        images = images.to(device)
        out = images.flatten(1) if net is None else net(images)
        feats.append(F.normalize(out.float().flatten(1), dim=1).cpu())
        labels.append(y)
    if net is not None:
        net.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracies(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                   ks: Sequence[int], temperatures: Sequence[float], chunk: int = 1024) -> list[float]:
    """Top-1 (%) of weighted kNN at each (k, T): each of the k nearest training rows (cosine) votes
    exp(sim / T) for its class. One similarity pass serves every pair (the largest k's neighbours).

    train_f [N, F], test_f [M, F] unit rows; labels int64.
    """
    classes = int(max(train_y.max(), test_y.max())) + 1
    ks = [min(k, train_f.shape[0]) for k in ks]
    correct = [0] * len(ks)
    for start in range(0, test_f.shape[0], chunk):
        top, idx = (test_f[start:start + chunk] @ train_f.T).topk(max(ks), dim=1)  # sorted, nearest first
        for i, (k, temperature) in enumerate(zip(ks, temperatures)):
            votes = torch.zeros(top.shape[0], classes)
            votes.scatter_add_(1, train_y[idx[:, :k]], (top[:, :k] / temperature).exp())
            correct[i] += int((votes.argmax(1) == test_y[start:start + chunk]).sum())
    return [100.0 * c / test_f.shape[0] for c in correct]


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int, temperature: float, chunk: int = 1024) -> float:
    """knn_accuracies at one (k, T)."""
    return knn_accuracies(train_f, train_y, test_f, test_y, [k], [temperature], chunk)[0]
