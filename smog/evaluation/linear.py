"""Linear probe on frozen (pre-extracted) features: SGD, cosine schedule, cross-entropy."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 epochs: int, lr: float, weight_decay: float, batch_size: int = 256, seed: int = 0) -> float:
    """Train a linear classifier on features [N, F] (standardised by the training mean/std); test top-1 (%)."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0).clamp(min=1e-6)
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    layer = torch.nn.Linear(train_f.shape[1], classes)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(train_f.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(train_f.shape[0], generator=generator)
        for start in range(0, train_f.shape[0], batch_size):
            batch = order[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(layer(train_f[batch]), train_y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        return 100.0 * float((layer(test_f).argmax(1) == test_y).float().mean())
