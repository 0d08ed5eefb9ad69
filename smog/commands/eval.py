"""`smog eval {knn,linear} CHECKPOINT_OR_RUN_DIR [section.key=value ...]`: frozen-backbone evaluation of
a checkpoint's online backbone (a run directory means its checkpoint.pt), with the checkpoint's own config
(overrides apply, e.g. eval.linear_epochs=20).

linear --protocol features: a layer fitted on pre-extracted centre-crop features (smog.evaluation.linear), seconds on
small data. linear --protocol paper: the authors' protocol (smog.evaluation.paper_linear) on augmented images, under
torchrun over several processes; its result is also written to linear_paper.json beside the checkpoint.
auto (the default): paper for image folders (ImageNet), features otherwise. --epochs/--lr default to
eval.linear_epochs/eval.linear_lr, --batch-size (images per process, paper protocol) to the authors' 32."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from smog import checkpoint
from smog.commands import checkpoint_arg
from smog.config import ConfigError
from smog.data import DatasetNotFound
from smog.dist import init_from_env
from smog.evaluation import knn_scores, linear_score
from smog.evaluation.paper_linear import paper_linear
from smog.loop import pick_device


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smog eval", description=__doc__)
    parser.add_argument("protocol", choices=("knn", "linear"))
    parser.add_argument("checkpoint", help="a checkpoint file or a run directory (its checkpoint.pt)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--protocol", dest="linear_protocol", choices=("auto", "features", "paper"), default="auto",
                        help="linear only: features (pre-extracted centre crops) or paper (augmented images)")
    parser.add_argument("--epochs", type=_positive(int), help="linear: epochs (default eval.linear_epochs)")
    parser.add_argument("--lr", type=_positive(float), help="linear: learning rate (default eval.linear_lr)")
    parser.add_argument("--batch-size", type=_positive(int), default=32, help="paper protocol: images per process")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        args.checkpoint, _, state = checkpoint_arg.load(args.checkpoint)
        cfg, model = checkpoint_arg.build(args.checkpoint, state, args.overrides)
        device = pick_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        backbone = model.encoder().to(device)
        protocol = args.linear_protocol
        if protocol == "auto":
            protocol = "paper" if cfg.data.name == "folder" else "features"
        epochs = args.epochs or cfg.eval.linear_epochs
        lr = args.lr or cfg.eval.linear_lr
        main_process = True
        if args.protocol == "knn":
            result = knn_scores(backbone, cfg, device)
        elif protocol == "features":
            cfg.eval.linear_epochs, cfg.eval.linear_lr = epochs, lr
            result = {"protocol": "features", "linear_top1": linear_score(backbone, cfg, device)}
        else:
            info = init_from_env(device.type, cfg.train.dist_timeout_s)
            if device.type == "cuda":
                device = torch.device("cuda", info.local_rank)
            main_process = info.main
            scores = paper_linear(backbone, cfg, device, info, epochs, lr, cfg.eval.linear_weight_decay,
                                  args.batch_size)
            result = {"protocol": "paper", **scores, "epochs": epochs, "lr": lr,
                      "weight_decay": cfg.eval.linear_weight_decay, "batch_per_process": args.batch_size,
                      "processes": info.world}
            if info.world > 1:
                torch.distributed.destroy_process_group()
    except (ConfigError, DatasetNotFound, FileNotFoundError, checkpoint.CheckpointError,
            checkpoint_arg.NotACheckpoint) as error:
        print(f"smog eval: error: {error}", file=sys.stderr)
        return 2
    if main_process:
        report = {"checkpoint": args.checkpoint, "epoch": state["epoch"], **result}
        if result.get("protocol") == "paper":
            path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "linear_paper.json")
            with open(path, "w") as out:
                json.dump(report, out, indent=2)
        print(json.dumps(report, indent=2))
    return 0
