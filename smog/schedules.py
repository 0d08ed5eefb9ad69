"""Per-step schedules: learning rate (linear warm-up + cosine), group momentum beta (linear), EMA rate (cosine)."""
from __future__ import annotations

import math

from smog.config import MethodConfig, OptimConfig


def learning_rate(cfg: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """warmup_start_lr -> lr linearly over warmup_epochs, then cosine to final_lr at total_steps."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def group_momentum(cfg: MethodConfig, step: int, total_steps: int) -> float:
    """beta_start at the first step, falling linearly to beta_end at the last."""
    progress = step / max(1, total_steps - 1)
    return cfg.beta_start + (cfg.beta_end - cfg.beta_start) * min(1.0, progress)


def ema_rate(cfg: MethodConfig, step: int, total_steps: int) -> float:
    """BYOL's cosine: ema_end - (ema_end - ema_start) * (cos(pi * t / T) + 1) / 2."""
    progress = min(1.0, step / max(1, total_steps))
    return cfg.ema_end - (cfg.ema_end - cfg.ema_start) * (math.cos(math.pi * progress) + 1.0) / 2.0
