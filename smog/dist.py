"""Process-group helpers: torchrun (env://) init and the process's rank and world size."""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as torch_dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _generation(store: torch_dist.Store, rank: int, world: int, timeout: timedelta) -> str:
    """A token every worker of this generation agrees on and no earlier generation used.

    Rank 0 draws it; every other rank publishes a fresh nonce under its rank and waits for rank 0's answer
    under that nonce, then acknowledges under the token. Keys a dead generation left behind are never
    read as this generation's: rank 0 keeps answering whatever nonce a rank key holds until that rank
    acknowledges, and a rank reads only keys named after its own nonce.
    """
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"smog/hello/{rank}", nonce)
        token = store.get(f"smog/welcome/{nonce}").decode()
        store.set(f"smog/ack/{token}/{rank}", "1")
        return token
    token = uuid.uuid4().hex
    answered: dict[int, bytes] = {}
    pending = set(range(1, world))
    deadline = time.monotonic() + timeout.total_seconds()
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"ranks {sorted(pending)} of {world} did not join this generation within "
                               f"{timeout.total_seconds():.0f} s (train.dist_timeout_s)")
        for r in sorted(pending):
            if store.check([f"smog/ack/{token}/{r}"]):
                pending.discard(r)
            elif store.check([f"smog/hello/{r}"]):
                nonce = store.get(f"smog/hello/{r}")
                if answered.get(r) != nonce:
                    store.set(f"smog/welcome/{nonce.decode()}", token)
                    answered[r] = nonce
        time.sleep(0.02)
    return token


def elastic_store(timeout: timedelta) -> torch_dist.Store | None:
    """Under torchrun's shared agent store: this worker generation's own key space in it, else None.

    torchrun (rdzv c10d, the default) keeps one TCPStore for the whole job and hands every restarted worker
    group the same MASTER_ADDR:MASTER_PORT without a per-restart prefix; the keys a dead generation
    published there (gloo's listening addresses) are still present, so a restarted rank that reads them
    before its peer has published anew connects to a dead port ("Gloo connectFullMesh failed ... Connect
    timeout"). TORCHELASTIC_RESTART_COUNT cannot name the generation: an agent restarted by another node's
    failure (a membership change) does not count it. The ranks agree on a fresh token instead.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                is_master=False, timeout=timeout)
    return torch_dist.PrefixStore(f"smog/generation/{_generation(store, rank, world, timeout)}/", store)


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
