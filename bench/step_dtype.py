"""`bench/step_dtype`: what bfloat16 rows in the grouping step change, measured on the CPU.

    bench/step_dtype [--config NAME] [--seeds S ...] [--flip-batches B] [--out DIR] [section.key=value ...]

Under `train.bf16=true` on a GPU the grouping step takes its rows in bfloat16 (`method.step_dtype=auto`) and
the groups rounded to bfloat16 for its products, so an argmax over K groups can go another way. bf16 autocast
is CUDA-only in the trainer; here only the step's dtype changes (`method.step_dtype=bfloat16` against
`float32`), the networks run in float32 either way:

1. kNN after equal runs: the recipe trained from each seed twice, method.step_dtype=float32 and bfloat16,
   and scored by kNN (eval.knn_k / eval.knn_t) at its end.
2. Flipped assignments on the same features: the float32 run's final model on B training batches of its
   own crops (train mode, no gradient); per head, smog_kernels.grouping_step on the same rows and groups
   with the rows in float32 and in bfloat16: the fraction of targets (momentum z of the large k crops,
   groups before the update) and of update-row assignments (online z) that differ, and the relative
   change of the loss. Against the model's own groups, and against K groups from k-means of its memory
   bank for each K of --flip-groups (the ImageNet recipe's 3000 by default).

Runs write under a temporary folder; the result goes to DIR/step_dtype_<config>.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time

import torch

import smog_kernels
from smog.benchmarks.kernels import machine
from smog.config import load_config, to_dict
from smog.loop import Trainer
from smog.method import swap_roles
from smog.schedules import group_momentum


def _train(config: str, overrides: list[str], out: str) -> tuple[Trainer, dict, float]:
    trainer = Trainer(load_config(config, [*overrides, f"train.out_dir={out}", "train.progress=false",
                                           "train.tensorboard=false"]))
    start = time.perf_counter()
    record = trainer.fit()
    return trainer, record, time.perf_counter() - start


@torch.no_grad()
def flips(trainer: Trainer, batches: int, groups: int) -> dict:
    """Per head: fractions of targets and update-row assignments that bfloat16 rows move to another group,
    and the loss's relative change, over `batches` training batches of the trainer's last epoch, against
    `groups` groups per head: the model's own when that is method.groups, else spherical k-means of its
    memory bank (as a re-clustering would start an epoch with that many groups)."""
    model, cfg, progress = trainer.method, trainer.cfg.method, trainer.progress
    bank = model.bank
    heads = [model.grouping.groups[h] if groups == cfg.groups else
             smog_kernels.spherical_kmeans(bank.rows(h % bank.views), groups, iters=cfg.kmeans_iters, seed=h,
                                           backend=cfg.backend)[0] for h in range(cfg.heads)]
    counts = {"targets": [0] * cfg.heads, "assignments": [0] * cfg.heads, "target_rows": 0, "update_rows": 0}
    loss_change: list[float] = []
    beta = group_momentum(cfg, progress.total_steps - 1, progress.total_steps)
    loader = trainer.data.batches(progress.epoch - 1, trainer.batch_size)
    for i, batch in enumerate(itertools.islice(loader, batches)):
        crops = trainer.data.crops(batch, i)
        q, k = swap_roles(crops["q"], crops["k"], i, cfg.swap)
        z_k, z_q, p_q = model.forward_crops(trainer.online, q, k)
        z_q = z_q[model.update_crops]
        counts["target_rows"] += z_k.shape[0] * z_k.shape[1]
        counts["update_rows"] += z_q.shape[1]
        for h in range(cfg.heads):
            update = z_q[h % z_q.shape[0]]
            out = {dtype: smog_kernels.grouping_step(heads[h], z_k.to(dtype), update.to(dtype), p_q.to(dtype), beta,
                                                     cfg.temperature, backend=cfg.backend)
                   for dtype in (torch.float32, torch.bfloat16)}
            full, low = out[torch.float32], out[torch.bfloat16]
            counts["targets"][h] += int((full.targets != low.targets).sum())
            counts["assignments"][h] += int((full.index != low.index).sum())
            loss_change.append(abs(float(low.loss) - float(full.loss)) / abs(float(full.loss)))
    return {"batches": batches, "heads": cfg.heads, "groups": groups,
            "target_rows_per_head": counts["target_rows"], "update_rows_per_head": counts["update_rows"],
            "targets_flipped": [n / counts["target_rows"] for n in counts["targets"]],
            "assignments_flipped": [n / counts["update_rows"] for n in counts["assignments"]],
            "loss_relative_change_median": statistics.median(loss_change),
            "loss_relative_change_max": max(loss_change)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart", help="packaged recipe name or YAML path")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each pair of runs")
    parser.add_argument("--flip-batches", type=int, default=40, help="training batches of the flip count")
    parser.add_argument("--flip-groups", type=int, nargs="+", default=[0, 3000],
                        help="groups per head of the flip counts (0: the recipe's method.groups)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")
    args = parser.parse_args(argv)
    result = {"benchmark": "step_dtype", "config": args.config, "overrides": args.overrides, "machine": machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "load_average_before": list(os.getloadavg()), "runs": [], "flips": None}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for dtype in ("float32", "bfloat16"):
                overrides = [*args.overrides, f"train.seed={seed}", f"method.step_dtype={dtype}",
                             f"train.run_name=seed{seed}_{dtype}"]
                trainer, record, seconds = _train(args.config, overrides, tmp)
                run = {"seed": seed, "step_dtype": dtype, "knn": record.get("knn"), "loss": record.get("loss"),
                       "nonempty": record.get("nonempty"), "seconds": seconds}
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
                if dtype == "float32" and result["flips"] is None:
                    result["resolved_config"] = to_dict(trainer.cfg)
                    result["flips"] = [flips(trainer, args.flip_batches, k or trainer.cfg.method.groups)
                                       for k in args.flip_groups]
                    print(json.dumps(result["flips"]), flush=True)
    result["load_average_after"] = list(os.getloadavg())
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"step_dtype_{os.path.splitext(os.path.basename(args.config))[0]}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
