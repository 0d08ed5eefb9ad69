"""`smog show groups RUN_OR_CHECKPOINT [--groups 16] [--members 8] [--out FILE]`: what a run's groups hold.

FILE (default group_members.png beside the checkpoint): one row per group of head --head drawn at random among
the groups with at least --members members (then the fullest others; rows left blank when too few groups hold
any), holding the members nearest to the group. The members of a group are the training images (a seeded sample
of --images of the run's training set) whose online z, the normalised projector output of the clean evaluation
view with BatchNorm's running statistics, is assigned to it under the checkpoint's groups. Each cell is an image
as the network saw it, enlarged --scale times.
FILE's _sizes.png: per head, a histogram of the group sizes over the checkpoint's memory bank (its rows assigned
to that head's groups, smog_kernels.assign), titled with the head's group health (smog.health).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset
from torchvision.utils import save_image

import smog_kernels as sk
from smog import checkpoint
from smog.commands import checkpoint_arg
from smog.config import ConfigError
from smog.data import DatasetNotFound, clean_set, data_info, make_loader
from smog.health import group_health
from smog.loop import pick_device

PADDING = 2  # pixels between and around the cells of the grid


class ShowError(ValueError):
    """An argument the run cannot satisfy (more groups than a head has, a head it lacks)."""


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


@torch.no_grad()
def online_z(online: nn.Module, loader: Iterable, device: torch.device) -> torch.Tensor:
    """The online network's z [N, D] (unit rows, float32) of a loader's (normalised images, labels) batches."""
    online.eval()
    return torch.cat([online([x.to(device)])[0][0].float() for x, _ in loader])


def pick_groups(index: torch.Tensor, num_groups: int, count: int, members: int,
                generator: torch.Generator) -> torch.Tensor:
    """Up to `count` group ids in random order among the groups holding at least `members` of the samples
    (index int64 [N]: each sample's group), then the fullest of the other non-empty groups."""
    sizes = torch.bincount(index, minlength=num_groups)
    order = torch.randperm(num_groups, generator=generator)
    full = order[sizes[order] >= members]
    rest = torch.argsort(sizes.masked_fill(sizes >= members, 0), descending=True, stable=True)
    rest = rest[(sizes[rest] > 0) & (sizes[rest] < members)]
    return torch.cat([full, rest])[:count]


def nearest(index: torch.Tensor, score: torch.Tensor, group: int, count: int) -> torch.Tensor:
    """Positions of at most `count` samples of `group` (index int64 [N]), highest score [N] first."""
    rows = (index == group).nonzero().squeeze(1)
    return rows[torch.argsort(score[rows], descending=True, stable=True)[:count]]


def cells(images, rows: list[torch.Tensor], members: int, mean: list[float], std: list[float],
          scale: int) -> torch.Tensor:
    """[len(rows) * members, C, scale * h, scale * w] in [0, 1]: row g holds images[rows[g]] (normalised items of
    a CleanSet) as seen before normalisation, enlarged `scale` times; cells without an image are white."""
    first = images[0][0]
    out = torch.ones(len(rows) * members, *first.shape)
    mean_, std_ = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    for g, picked in enumerate(rows):
        for m, i in enumerate(picked.tolist()):
            out[g * members + m] = images[i][0] * std_ + mean_
    return F.interpolate(out.clamp(0, 1), scale_factor=scale, mode="nearest")


@torch.no_grad()
def bank_sizes(bank: dict, groups: torch.Tensor) -> torch.Tensor:
    """Members per group int64 [H, K] of a memory bank's filled rows (bank: MemoryBank.state_dict(), view
    h mod V for head h) under groups [H, K, D]."""
    rows, filled = bank["bank"], bank["index"] >= 0
    heads, k = groups.shape[:2]
    counts = []
    for h in range(heads):
        index, _ = sk.assign(rows[h % rows.shape[0]][filled].float(), groups[h].to(rows.device))
        counts.append(torch.bincount(index, minlength=k).cpu())
    return torch.stack(counts)


def plot_sizes(counts: torch.Tensor, path: str) -> None:
    """A histogram of group sizes per head (counts int64 [H, K]), titled with its group health."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    health = group_health(counts)
    heads, k = counts.shape
    fig, axes = plt.subplots(1, heads, figsize=(4 * heads, 3.4), squeeze=False, sharey=True)
    for h, ax in enumerate(axes[0]):
        ax.hist(counts[h].numpy(), bins=min(50, int(counts[h].max()) + 1))
        ax.set(xlabel="members per group (memory bank rows)",
               title=f"head {h}: {health['in_use'][h]}/{k} groups in use\nlargest {health['largest_share'][h]:.1%}, "
                     f"entropy/log K {health['entropy'][h]:.3f}")
    axes[0][0].set_ylabel("groups")
    axes[0][0].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def groups(args: argparse.Namespace) -> None:
    file, _, state = checkpoint_arg.load(args.checkpoint)
    cfg, model = checkpoint_arg.build(file, state)
    heads, k = model.grouping.groups.shape[:2]
    if not 0 <= args.head < heads:
        raise ShowError(f"--head {args.head}: the run has heads 0..{heads - 1}")
    if args.groups > k:
        raise ShowError(f"--groups {args.groups} is more than the {k} groups of a head")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device("auto")  # the GPU when there is one, whatever device the run trained on
    info = data_info(cfg.data)
    images = clean_set(cfg.data, "train", cfg.data.train_subset)
    generator = torch.Generator().manual_seed(args.seed)
    sample = torch.randperm(len(images), generator=generator)[:args.images]
    z = online_z(model.online.to(device), make_loader(Subset(images, sample.tolist()), 256, cfg.data), device)
    index, score = (t.cpu() for t in sk.assign(z, model.grouping.groups[args.head].to(device)))
    chosen = pick_groups(index, k, args.groups, args.members, generator)
    rows = [sample[nearest(index, score, int(g), args.members)] for g in chosen]
    rows += [torch.zeros(0, dtype=torch.int64)] * (args.groups - len(rows))  # blank rows: too few non-empty groups
    scale = args.scale or max(1, 64 // info.size)
    out = args.out or os.path.join(os.path.dirname(file), "group_members.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_image(cells(images, rows, args.members, info.mean, info.std, scale), out, nrow=args.members,
               padding=PADDING, pad_value=1.0)
    sizes = torch.bincount(index, minlength=k)
    print(f"{out}: {len(chosen)} groups of head {args.head} (rows) drawn among the {k}, each with its "
          f"{args.members} members nearest to it among {len(sample)} training images (group: members in the "
          f"sample): " + ", ".join(f"{int(g)}: {int(sizes[g])}" for g in chosen))
    bank = (state.get("rank") or {}).get("method") or {}
    if "bank" not in bank:
        print(f"{file} holds no memory bank: no group sizes")
        return
    sizes_path = os.path.splitext(out)[0] + "_sizes.png"
    plot_sizes(bank_sizes(bank["bank"], model.grouping.groups), sizes_path)
    print(f"{sizes_path}: group sizes over the memory bank, per head")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smog show", description="pictures of a run")
    commands = parser.add_subparsers(dest="what", required=True)
    sub = commands.add_parser("groups", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="training images nearest to groups, and the group sizes")
    sub.add_argument("checkpoint", help="a checkpoint file or a run directory (its checkpoint.pt)")
    sub.add_argument("--groups", type=_positive, default=16, help="rows: groups shown")
    sub.add_argument("--members", type=_positive, default=8, help="columns: members shown per group")
    sub.add_argument("--head", type=int, default=0, help="the head whose groups are shown")
    sub.add_argument("--images", type=_positive, default=10000, help="training images sampled (all when fewer)")
    sub.add_argument("--scale", type=_positive, default=None, help="cell enlargement (default: cells of 64 pixels "
                                                                   "or more)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the image sample and the groups drawn")
    sub.add_argument("--out", default=None, help="the grid's PNG (default: group_members.png beside the checkpoint)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        groups(args)
    except (FileNotFoundError, checkpoint_arg.NotACheckpoint, checkpoint.CheckpointError, ConfigError, DatasetNotFound,
            ShowError) as error:
        print(f"smog show: error: {error}", file=sys.stderr)
        return 2
    return 0
