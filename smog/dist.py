"""Process-group helpers: torchrun (env://) init, rank/world, and the group-statistics reducer."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def elastic_store(timeout: timedelta) -> torch_dist.Store | None:
    """Under torchrun's shared agent store: this worker generation's own key space in it, else None.

    torchrun (rdzv c10d, the default) keeps one TCPStore for the whole job and hands every restarted worker
    group the same MASTER_ADDR:MASTER_PORT; the keys a dead generation published there (gloo's listening
    addresses, barrier counters) are still present, so a restarted rank can read a dead peer's address
    and fail its connection ("Gloo connectFullMesh failed ... Connect timeout"). Prefixing the keys with
    TORCHELASTIC_RESTART_COUNT gives each generation a clean namespace in that store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return torch_dist.PrefixStore(f"smog/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def init_from_env(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1) with env:// rendezvous; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not torch_dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        store = elastic_store(timeout)
        if store is None:
            torch_dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            torch_dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                          timeout=timeout)
    return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def stats_reducer(info: DistInfo):
    """None on one process; smog_kernels.distributed's reducer across the default group otherwise."""
    if info.world <= 1:
        return None
    from smog_kernels.distributed import make_stats_reducer

    return make_stats_reducer()


def kmeans(x: torch.Tensor, num_groups: int, iters: int, seed: int, backend: str, info: DistInfo):
    """Spherical k-means of the bank rows, synchronised across processes when there are several."""
    if info.world <= 1:
        import smog_kernels

        return smog_kernels.spherical_kmeans(x, num_groups, iters=iters, seed=seed, backend=backend)[0]
    from smog_kernels.distributed import spherical_kmeans

    return spherical_kmeans(x, num_groups, iters=iters, seed=seed, backend=backend)[0]

