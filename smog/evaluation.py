"""Frozen-feature evaluation of a backbone: weighted kNN at the configured (k, T) pairs, linear probe."""
from __future__ import annotations

import torch
from torch import nn

from smog.config import Config
from smog.data import clean_set, make_loader
from smog.knn import extract, knn_accuracy
from smog.linear import linear_probe


def features(net: nn.Module | None, cfg: Config, device: torch.device | str) -> tuple:
    """(train features, train labels, test features, test labels) on clean images; net None = raw pixels."""
    train = clean_set(cfg.data, "train", cfg.eval.knn_train_subset)
    test = clean_set(cfg.data, "test", cfg.eval.knn_test_subset)
    loaders = [make_loader(s, cfg.eval.batch_size, cfg.data) for s in (train, test)]
    return (*extract(net, loaders[0], device), *extract(net, loaders[1], device))


def knn_scores(net: nn.Module | None, cfg: Config, device: torch.device | str) -> dict[str, float]:
    """{"k200_t0.1": top-1 %, ...} for every configured (k, T)."""
    train_f, train_y, test_f, test_y = features(net, cfg, device)
    return {f"k{k}_t{t:g}": knn_accuracy(train_f, train_y, test_f, test_y, k, t)
            for k, t in zip(cfg.eval.knn_k, cfg.eval.knn_t)}


def linear_score(net: nn.Module, cfg: Config, device: torch.device | str) -> float:
    """Linear-probe top-1 (%) on frozen features of clean images."""
    train_f, train_y, test_f, test_y = features(net, cfg, device)
    return linear_probe(train_f, train_y, test_f, test_y, cfg.eval.linear_epochs, cfg.eval.linear_lr,
                        cfg.eval.linear_weight_decay, seed=cfg.train.seed)
