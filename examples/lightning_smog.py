"""SMoG pretraining as a Lightning module, with smog's grouping step (smog_kernels.Grouping).

The module holds the online and momentum networks and the Grouping module (its groups are a buffer, so
Lightning's checkpoints carry them). Lightning's gradient accumulation maps onto Grouping's: every
sub-batch but the last of a cycle is called with last=False, and the groups move once per optimiser
step from all of the cycle's rows. Under Lightning's DDP (devices > 1) Grouping reduces the group
statistics over the default process group by itself. It requires Lightning (pip install lightning, or
pip install -e ".[examples]"); the standalone pytorch_lightning package, as lightly installs it, works too.

    python examples/lightning_smog.py --steps 3
    python examples/lightning_smog.py --data fashion_mnist --accumulate 2 --devices 2
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same API
    import pytorch_lightning as pl

from smog.config import DataConfig
from smog.data import load_split
from smog_kernels import Grouping, MemoryBank


class TwoViews(Dataset):
    """uint8 images [N, C, H, W] -> (two augmented views [C, H, W], dataset index)."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.augment = v2.Compose([v2.RandomResizedCrop(images.shape[-1], scale=(0.2, 1.0)), v2.RandomHorizontalFlip(),
                                   v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.augment(self.images[i]), self.augment(self.images[i]), i


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class SMoG(pl.LightningModule):
    def __init__(self, channels: int, batch_size: int, width: int = 32, dim: int = 128, heads: int = 3,
                 groups: int = 300, beta: float = 0.99, ema: float = 0.99, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        conv = [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()]
        self.encoder = nn.Sequential(*conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), mlp(2 * width, 512, dim))
        self.predictor = mlp(dim, 512, dim)
        self.encoder_momentum = copy.deepcopy(self.encoder).requires_grad_(False)
        self.grouping = Grouping(heads=heads, num_groups=groups, dim=dim, temperature=0.1)
        self.bank: MemoryBank | None = None  # this process's online z of the epoch, made once the loader is known

    def on_train_start(self) -> None:
        rows = self.trainer.num_training_batches * self.hparams.batch_size
        self.bank = MemoryBank(size=rows, dim=self.hparams.dim, views=1, device=self.device)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch > 0:  # re-cluster on the last epoch's rows (of every process under DDP)
            self.grouping.recluster([self.bank.rows(0)], seed=self.current_epoch)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x_q, x_k, index = batch
        if self.global_step % 2:  # the views swap roles every second optimiser step
            x_q, x_k = x_k, x_q
        with torch.no_grad():
            z_k = F.normalize(self.encoder_momentum(x_k), dim=1)
        z_q = self.encoder(x_q)
        p_q = F.normalize(self.predictor(z_q), dim=1)
        z_q = F.normalize(z_q, dim=1)
        last = self.cycle_ends(batch_idx)
        # targets: groups of z_k; update rows: z_q; predictions: p_q. [1, N, D] each. last=False holds this
        # sub-batch's statistics; the cycle's last sub-batch moves the groups by all of them
        loss = self.grouping(z_k[None], z_q[None], p_q[None], beta=self.hparams.beta, last=last)
        self.bank.write(index, z_q.detach()[None])
        self.log("loss", loss, prog_bar=True)
        if last:
            self.print(f"epoch {self.current_epoch} step {self.global_step + 1}: loss {loss.item():.5f}")
        return loss

    def cycle_ends(self, batch_idx: int) -> bool:
        """Whether this batch ends an accumulation cycle: Lightning steps the optimiser after it."""
        accumulate = self.trainer.accumulate_grad_batches
        return (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == self.trainer.num_training_batches

    def on_train_batch_end(self, outputs: object, batch: tuple, batch_idx: int) -> None:
        if self.cycle_ends(batch_idx):  # after the optimiser step: momentum <- ema * momentum + (1 - ema) * online
            with torch.no_grad():
                for ema, new in zip(self.encoder_momentum.parameters(), self.encoder.parameters()):
                    ema.lerp_(new, 1 - self.hparams.ema)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.encoder.parameters()) + list(self.predictor.parameters())
        return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, weight_decay=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=-1, help="stop after this many optimiser steps (-1: epochs)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", default="digits", choices=["digits", "fashion_mnist"])
    parser.add_argument("--images", type=int, default=0, help="train on the first N images (0: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="per device and sub-batch")
    parser.add_argument("--accumulate", type=int, default=1, help="sub-batches per optimiser step")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()

    pl.seed_everything(0)
    images = load_split(DataConfig(name=args.data), "train").subset(args.images).images
    loader = DataLoader(TwoViews(images), batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = SMoG(channels=images.shape[1], batch_size=args.batch_size)
    trainer = pl.Trainer(max_epochs=args.epochs, max_steps=args.steps, accumulate_grad_batches=args.accumulate,
                         accelerator="auto", devices=args.devices, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=loader)


if __name__ == "__main__":
    main()
