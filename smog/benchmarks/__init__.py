"""`smog bench NAME`: the kernel benchmarks a user runs on their own hardware. (Training, accuracy, GPU and
distributed benchmarks, and peers, are development tools in the repository's bench/.)"""
from __future__ import annotations

import importlib
import sys

SUITES = {
    "kernels": "smog.benchmarks.kernels",  # fused vs reference vs torch.mm vs torch's chunked cross-entropy (CPU)
    "tune": "smog.benchmarks.tune",        # time auto's candidates on this GPU; writes the table auto reads
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print("usage: smog bench {" + ",".join(SUITES) + "} [options]   (smog bench NAME --help)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(SUITES[argv[0]]).main(argv[1:]) or 0)
