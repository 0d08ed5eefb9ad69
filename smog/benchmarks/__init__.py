"""`smog bench NAME`: the benchmarks behind bench/. Each writes JSON (and PNG where a curve helps)."""
from __future__ import annotations

import importlib
import sys

SUITES = {
    "kernels": "smog.benchmarks.kernels",        # fused vs reference vs torch.mm vs peers (CPU)
    "gpu": "smog.benchmarks.gpu",                # the same on a CUDA GPU (bench/gpu_check)
    "distributed": "smog.benchmarks.distributed",  # statistics reduction strategies over processes
    "accuracy": "smog.benchmarks.accuracy",      # smog vs lightly's SMoG recipe, kNN accuracy
    "train": "smog.benchmarks.train_step",       # one training step's time by phase, variants side by side
    "faults": "smog.benchmarks.faults",          # random SIGKILLs under torchrun --max-restarts, exact resume
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print("usage: smog bench {" + ",".join(SUITES) + "} [options]   (smog bench NAME --help)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(SUITES[argv[0]]).main(argv[1:]) or 0)
