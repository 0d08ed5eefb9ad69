"""SMoG pretraining in a plain PyTorch loop, on one process or on many under torchrun.

smog_kernels.Grouping is SMoG's grouping step as an nn.Module: given the momentum network's z of the target
view, the online z that moves the groups and the online predictions p (L2-normalised rows), it returns the
loss and moves its groups. Under torchrun (DDP; gloo on the CPU, nccl on GPUs) it reduces the group
statistics over the default process group by itself, so every process holds the groups one process holding
the global batch would. smog_kernels.MemoryBank keeps this process's online z of the epoch for re-clustering.

    python examples/torchrun_smog.py --steps 3
    torchrun --standalone --nproc_per_node=2 examples/torchrun_smog.py --data fashion_mnist
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

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


class Online(nn.Module):
    """Backbone and projector (z, the part the momentum network copies) and predictor (p)."""

    def __init__(self, channels: int, width: int, dim: int):
        super().__init__()
        conv = [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()]
        self.encoder = nn.Sequential(*conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), mlp(2 * width, 512, dim))
        self.predictor = mlp(dim, 512, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.predictor(z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: --epochs epochs)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", default="digits", choices=["digits", "fashion_mnist"])
    parser.add_argument("--images", type=int, default=0, help="train on the first N images (0: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch, split over the processes")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--groups", type=int, default=300)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")

    images = load_split(DataConfig(name=args.data), "train").subset(args.images).images
    dataset = TwoViews(images)
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, args.batch_size // world, sampler=sampler, drop_last=True)

    torch.manual_seed(args.seed)  # the same weights and groups on every process
    online = Online(images.shape[1], 32, args.dim).to(device)
    momentum = copy.deepcopy(online.encoder).requires_grad_(False)
    model = DistributedDataParallel(online) if distributed else online
    grouping = Grouping(heads=args.heads, num_groups=args.groups, dim=args.dim, temperature=0.1).to(device)
    bank = MemoryBank(size=len(loader) * (args.batch_size // world), dim=args.dim, views=1, device=device)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5)

    step, loss = 0, torch.zeros(())
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        if epoch > 0:  # the last epoch's rows of every process, clustered the same way on each
            grouping.recluster([bank.rows(0)], seed=args.seed + epoch)
        for x_q, x_k, index in loader:
            if step % 2:  # the views swap roles every second step
                x_q, x_k = x_k, x_q
            x_q, x_k = x_q.to(device), x_k.to(device)
            with torch.no_grad():
                for ema, new in zip(momentum.parameters(), online.encoder.parameters()):
                    ema.lerp_(new, 0.01)  # momentum network: 0.99 * ema + 0.01 * online
                z_k = F.normalize(momentum(x_k), dim=1)
            z_q, p_q = model(x_q)
            z_q, p_q = F.normalize(z_q, dim=1), F.normalize(p_q, dim=1)
            # targets: groups of z_k; update rows: z_q (every head); predictions: p_q, scored against the
            # updated groups. [1, N, D] each: one target set, one set of update rows, one prediction view
            loss = grouping(z_k[None], z_q[None], p_q[None], beta=0.99)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bank.write(index, z_q.detach()[None])
            step += 1
            if rank == 0 and (step % 10 == 0 or step == args.steps):
                print(f"epoch {epoch} step {step}: loss {loss.item():.5f} (process 0's rows)", flush=True)
            if step == args.steps:
                break
        if step == args.steps:
            break

    # every process holds the same groups: each step reduced the group statistics over all of them
    digest = hashlib.sha256(grouping.groups.cpu().numpy().tobytes()).hexdigest()[:16]
    print(f"process {rank} of {world}: loss {loss.item():.5f}, groups sha256 {digest}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
