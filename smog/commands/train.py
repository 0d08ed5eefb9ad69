"""`smog train [--config NAME_OR_FILE] [--resume auto|PATH] [section.key=value ...]`.

With no arguments: the packaged `quickstart` recipe. With eval.baselines, the run ends with a table of
kNN top-1: SMoG features vs the same network at its random initialisation vs raw pixels.
"""
from __future__ import annotations

import argparse
import sys
import time

from smog.checkpoint import CheckpointError, CheckpointWriteError
from smog.config import Config, ConfigError, load_config
from smog.data import DatasetNotFound
from smog.evaluation import knn_scores
from smog.loop import NonFiniteLoss, Trainer
from smog.method import build_model


def parse(argv: list[str]) -> tuple[Config, str]:
    parser = argparse.ArgumentParser(prog="smog train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quickstart", help="packaged recipe name or YAML path")
    parser.add_argument("--resume", default=None, help="auto (this run's checkpoint, if any) or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="section.key=value (e.g. train.epochs=3)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    resume = args.resume if args.resume is not None else cfg.train.resume
    return cfg, resume


def baseline_table(trainer: Trainer, final: dict) -> str:
    """kNN top-1 of SMoG features, the random-init network and raw pixels, as a text table."""
    cfg = trainer.cfg
    rows = [("SMoG features", final),
            ("same network, random init", knn_scores(build_model(cfg).encoder().to(trainer.device), cfg,
                                                     trainer.device)),
            ("raw pixels", knn_scores(None, cfg, trainer.device))]
    keys = list(final)
    header = f"{'kNN top-1 (%)':<28}" + "".join(f"{k:>14}" for k in keys)
    lines = [header, "-" * len(header)]
    lines += [f"{name:<28}" + "".join(f"{scores[k]:>14.2f}" for k in keys) for name, scores in rows]
    return "\n".join(lines)


def run(cfg: Config, resume: str = "") -> dict:
    """Train; returns {"final": last epoch record, "table": baseline table or ""}."""
    trainer = Trainer(cfg)
    trainer.resume(resume)
    record = trainer.fit()
    trainer.log.close()
    table = ""
    if cfg.eval.baselines and trainer.dist.main and "knn" in record:
        table = baseline_table(trainer, record["knn"])
    return {"final": record, "table": table, "run_dir": trainer.run_dir}


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        cfg, resume = parse(sys.argv[1:] if argv is None else argv)
        result = run(cfg, resume)
    except (ConfigError, DatasetNotFound, NonFiniteLoss, CheckpointError, CheckpointWriteError,
            FileNotFoundError) as error:
        print(f"smog train: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (ConfigError, DatasetNotFound, CheckpointError, FileNotFoundError)) else 1
    if result["table"]:
        print("\n" + result["table"])
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    print(f"\nrun directory: {result['run_dir']} (config.yaml, metrics.jsonl, *.png, checkpoint.pt)")
    print(f"finished in {minutes} min {seconds} s")
    return 0
