"""Frozen-feature evaluation of a backbone: weighted kNN at the configured (k, T) pairs, linear probe."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset

from smog.config import Config
from smog.data import clean_set, make_loader
from smog.evaluation.knn import extract, knn_accuracies
from smog.evaluation.linear import linear_probe


def _all_gather_rows(t: torch.Tensor, world: int, device: torch.device | str) -> torch.Tensor:
    """Every rank's rows of t [n_r, ...] (n_r may differ by one), concatenated in rank order."""
    t = t.to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=device))
    most = int(max(sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)]).cpu()


def features(net: nn.Module | None, cfg: Config, device: torch.device | str,
             shard: tuple[int, int] | None = None) -> tuple:
    """(train features, train labels, test features, test labels) on clean images; net None = raw pixels.

    shard=(rank, world): each process extracts every world-th image with rank 0's buffers (BatchNorm
    statistics) and the features are all-gathered (torch.distributed), so every rank returns all of
    them, equal to what rank 0 alone would compute; a collective call.
    """
    sets = [clean_set(cfg.data, "train", cfg.eval.knn_train_subset), clean_set(cfg.data, "test", cfg.eval.knn_test_subset)]
    if shard is not None:
        rank, world = shard
        sets = [Subset(s, range(rank, len(s), world)) for s in sets]
        for buffer in net.buffers() if net is not None else ():  # BatchNorm statistics: rank 0's, as DDP would
            dist.broadcast(buffer, src=0)
    out = []
    for subset in sets:
        rows, labels = extract(net, make_loader(subset, cfg.eval.batch_size, cfg.data), device)
        if shard is not None:
            rows, labels = _all_gather_rows(rows, shard[1], device), _all_gather_rows(labels, shard[1], device)
        out += [rows, labels]
    return tuple(out)


def knn_scores(net: nn.Module | None, cfg: Config, device: torch.device | str,
               shard: tuple[int, int] | None = None) -> dict[str, float]:
    """{"k200_t0.1": top-1 %, ...} for every configured (k, T); shard as in `features`."""
    train_f, train_y, test_f, test_y = features(net, cfg, device, shard)
    scores = knn_accuracies(train_f, train_y, test_f, test_y, cfg.eval.knn_k, cfg.eval.knn_t)
    return {f"k{k}_t{t:g}": score for k, t, score in zip(cfg.eval.knn_k, cfg.eval.knn_t, scores)}


def linear_score(net: nn.Module, cfg: Config, device: torch.device | str) -> float:
    """Linear-probe top-1 (%) on frozen features of clean images."""
    train_f, train_y, test_f, test_y = features(net, cfg, device)
    return linear_probe(train_f, train_y, test_f, test_y, cfg.eval.linear_epochs, cfg.eval.linear_lr,
                        cfg.eval.linear_weight_decay, seed=cfg.train.seed)
