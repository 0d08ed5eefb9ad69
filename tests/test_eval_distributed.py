"""kNN evaluation over several processes: each rank extracts its share of the images, the features
are all-gathered, and the accuracy equals what one process computes alone (gloo, 2 real processes)."""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smog.config import load_config
from smog.evaluation import knn_scores
from smog.loop import build_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = load_config("digits", ["data.workers=0"])
        backbone = build_model(cfg).online.backbone
        if rank == 1:  # another rank's BatchNorm statistics must not leak into the features
            for module in backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.running_mean.add_(1.0)
        results[rank] = (knn_scores(backbone, cfg, "cpu", (rank, world)),
                         knn_scores(backbone, cfg, "cpu") if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def test_sharded_knn_equals_one_process():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(world, _free_port(), results), nprocs=world, join=True)
        (sharded0, alone), (sharded1, _) = results[0], results[1]
    assert sharded0 == sharded1 == alone, (sharded0, sharded1, alone)
    assert all(0.0 < v <= 100.0 for v in alone.values())
