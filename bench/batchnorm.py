"""`bench/batchnorm`: the cost of pooled against per-resolution BatchNorm in a recipe's networks, in CPU time.

    bench/batchnorm [--config NAME] [--rounds R] [--repeats P] [--out DIR] [section.key=value ...]

Builds the recipe's SMoG model once per `model.bn_crops` value (per_resolution, pooled) and times, on the
same random crops of the recipe's sizes and memory format, the online network's forward over the q crops,
its backward, and the momentum network's forward over the k crops it takes (the target crops, plus the
small ones when method.momentum_small and pooled: the authors' recipe). Rounds interleave the variants,
the order alternating. Each phase is timed twice: wall clock, and this process's CPU time
(time.process_time), which other processes' load inflates far less on a shared machine. P repeats of R
rounds; the result is the median over repeats of each repeat's median ratio.
Writes DIR/batchnorm_<config>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from smog.benchmarks.kernels import machine
from smog.config import LARGE_CROPS, load_config
from smog.data import data_info
from smog.method import build_model

VARIANTS = ("per_resolution", "pooled")
PHASES = ("online forward", "backward", "momentum forward")


def _crops(cfg, generator: torch.Generator) -> list[torch.Tensor]:
    """LARGE_CROPS large + data.small_crops small random crops [batch, C, s, s] in the recipe's layout."""
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    channels = data_info(cfg.data).channels
    sizes = [cfg.data.large_size] * LARGE_CROPS + [cfg.data.small_size] * cfg.data.small_crops
    return [torch.randn(cfg.train.batch_size, channels, s, s, generator=generator).to(memory_format=fmt)
            for s in sizes]


def _round(model, crops: list[torch.Tensor], momentum_in: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """{phase: (wall s, CPU s)} of one forward, backward and momentum forward."""
    stamps = [(time.perf_counter(), time.process_time())]
    z, p = model.online(crops)
    stamps.append((time.perf_counter(), time.process_time()))
    (z.sum() + p.square().sum()).backward()
    stamps.append((time.perf_counter(), time.process_time()))
    with torch.no_grad():
        model.momentum(momentum_in)
    stamps.append((time.perf_counter(), time.process_time()))
    model.online.zero_grad(set_to_none=True)
    return {phase: (stamps[i + 1][0] - stamps[i][0], stamps[i + 1][1] - stamps[i][1])
            for i, phase in enumerate(PHASES)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart", help="packaged recipe name or YAML path")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per repeat (one step of each variant)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every variant")
    args = parser.parse_args(argv)
    models, inputs = {}, {}
    for variant in VARIANTS:
        cfg = load_config(args.config, [*args.overrides, f"model.bn_crops={variant}"])
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        model = build_model(cfg).train()
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        crops = _crops(cfg, torch.Generator().manual_seed(cfg.train.seed))
        momentum_small = cfg.method.momentum_small and variant == "pooled"
        models[variant] = model
        inputs[variant] = (crops, crops[:LARGE_CROPS] + (crops[LARGE_CROPS:] if momentum_small else []))
    result = {"benchmark": "batchnorm", "config": args.config, "overrides": args.overrides, "machine": machine(),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "warmup": args.warmup,
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "load_average_before": list(os.getloadavg()), "repeats": []}
    for repeat in range(args.repeats):
        times = {v: {p: ([], []) for p in PHASES} for v in VARIANTS}
        for r in range(args.warmup + args.rounds):
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                timed = _round(models[variant], *inputs[variant])
                if r >= args.warmup:
                    for phase, (wall, cpu) in timed.items():
                        times[variant][phase][0].append(wall)
                        times[variant][phase][1].append(cpu)
        row = {}
        for clock, i in (("wall", 0), ("cpu", 1)):
            medians = {v: {p: statistics.median(times[v][p][i]) for p in PHASES} for v in VARIANTS}
            for v in VARIANTS:
                medians[v]["total"] = sum(medians[v][p] for p in PHASES)
            row[clock] = {"median_s": medians,
                          "ratio": {p: medians["pooled"][p] / medians["per_resolution"][p] for p in medians["pooled"]}}
        result["repeats"].append(row)
        print(f"repeat {repeat + 1}: " + "; ".join(
            f"{clock} " + ", ".join(f"{p} {x:.3f}" for p, x in row[clock]["ratio"].items()) for clock in row),
              flush=True)
    result["ratio_median_over_repeats"] = {
        clock: {p: statistics.median(rep[clock]["ratio"][p] for rep in result["repeats"])
                for p in (*PHASES, "total")} for clock in ("wall", "cpu")}
    result["load_average_after"] = list(os.getloadavg())
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print("pooled / per_resolution, median over repeats:", json.dumps(result["ratio_median_over_repeats"]))
    os.makedirs(args.out, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.config))[0]
    suffix = "_" + "_".join(o.replace("=", "-") for o in args.overrides) if args.overrides else ""
    path = os.path.join(args.out, f"batchnorm_{name}{suffix}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
