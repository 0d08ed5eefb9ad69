"""`smog eval {knn,linear} CHECKPOINT_OR_RUN_DIR [section.key=value ...]`: frozen-feature evaluation of a
checkpoint's online backbone (a run directory means its checkpoint.pt), with the checkpoint's own config
(overrides apply, e.g. eval.linear_epochs=20)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from smog import checkpoint
from smog.config import ConfigError, config_from_dict
from smog.data import DatasetNotFound
from smog.evaluation import knn_scores, linear_score
from smog.trainer import build_model, pick_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smog eval", description=__doc__)
    parser.add_argument("protocol", choices=("knn", "linear"))
    parser.add_argument("checkpoint", help="a checkpoint file or a run directory (its checkpoint.pt)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if os.path.isdir(args.checkpoint):
        args.checkpoint = os.path.join(args.checkpoint, "checkpoint.pt")
    try:
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"no checkpoint at {args.checkpoint}")
        state = checkpoint.load(args.checkpoint)
        cfg = config_from_dict(state["config"], args.overrides)
        device = pick_device(cfg.train.device)
        model = build_model(cfg)
        model.load_state_dict(state["model"])
        backbone = model.online.backbone.to(device)
        if args.protocol == "knn":
            result = knn_scores(backbone, cfg, device)
        else:
            result = {"linear_top1": linear_score(backbone, cfg, device)}
    except (ConfigError, DatasetNotFound, FileNotFoundError) as error:
        print(f"smog eval: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": args.checkpoint, "epoch": state["epoch"], **result}, indent=2))
    return 0
