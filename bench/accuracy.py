"""`bench/accuracy`: smog's recipe vs lightly's SMoG recipe, same backbone, data, epochs and batch size.

Reports kNN top-1 of each (and of the random-init network and raw pixels) with the time per epoch of each;
writes bench/results/accuracy_<config>.json and .png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

from smog.config import load_config, to_dict
from smog.evaluation import knn_scores
from smog.train import run as train_smog
from smog.trainer import build_model, pick_device


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, scores) for name, scores in result["knn"].items()]
    keys = list(rows[0][1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(rows)
    for i, (name, scores) in enumerate(rows):
        left.bar([j + i * width for j in range(len(keys))], [scores[k] for k in keys], width, label=name)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    low = min(min(s.values()) for _, s in rows)
    left.set(ylabel="kNN top-1 (%)", ylim=(max(0, low - 10), 100), title=f"{result['config']}: kNN top-1")
    left.legend(fontsize=8)
    sides = list(result["seconds_per_epoch"])
    right.bar(sides, [sum(result["seconds_per_epoch"][s]) / len(result["seconds_per_epoch"][s]) for s in sides])
    right.set(ylabel="seconds per epoch (mean)", title="training time per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/accuracy", description=__doc__)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--sides", default="smog,lightly", help="comma list of smog, lightly")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to both sides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    sides = [s for s in args.sides.split(",") if s]
    device = pick_device(cfg.train.device)
    result = {"config": cfg.name, "resolved_config": to_dict(cfg), "device": str(device),
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "processor": platform.processor(), "torch": torch.__version__},
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "knn": {}, "seconds_per_epoch": {}}
    if "smog" in sides:
        smog_cfg = copy.deepcopy(cfg)
        smog_cfg.train.run_name = cfg.train.run_name or f"bench_{cfg.name}"
        smog_cfg.eval.baselines = False  # computed once below for both sides
        out = train_smog(smog_cfg, "")
        records = [json.loads(line) for line in open(os.path.join(out["run_dir"], "metrics.jsonl"))]
        result["knn"]["smog"] = out["final"]["knn"]
        result["seconds_per_epoch"]["smog"] = [r["seconds"] for r in records if r.get("kind") == "epoch"]
        result["smog_bank_fill_seconds"] = sum(r["seconds"] for r in records if r.get("kind") == "bank_fill")
    if "lightly" in sides:
        from bench.lightly_smog import train_lightly

        lightly = train_lightly(cfg)
        result["knn"]["lightly"] = lightly["knn"]
        result["seconds_per_epoch"]["lightly"] = lightly["seconds_per_epoch"]
    result["knn"]["random init"] = knn_scores(build_model(cfg).online.backbone.to(device), cfg, device)
    result["knn"]["raw pixels"] = knn_scores(None, cfg, device)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"accuracy_{cfg.name}")
    with open(stem + ".json", "w") as out_file:
        json.dump(result, out_file, indent=2)
    plot(result, stem + ".png")
    keys = list(result["knn"]["raw pixels"])
    print(f"{'kNN top-1 (%)':<14}" + "".join(f"{k:>12}" for k in keys) + f"{'s/epoch':>10}")
    for name, scores in result["knn"].items():
        times = result["seconds_per_epoch"].get(name)
        per_epoch = f"{sum(times) / len(times):>10.1f}" if times else f"{'':>10}"
        print(f"{name:<14}" + "".join(f"{scores[k]:>12.2f}" for k in keys) + per_epoch)
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
