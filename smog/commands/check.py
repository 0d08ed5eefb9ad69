"""`smog check`: numerical parity of every available backend against the reference, on this machine.

Prints a table of errors per op, backend and dtype and exits non-zero if any error is over its
tolerance (smog_kernels.parity).
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from smog_kernels import registry
from smog_kernels.parity import measure, tolerance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _targets(backends: list[str]) -> list[tuple[str, str]]:
    """(backend, device) pairs to check: each backend on the first device it runs on, the GPU first."""
    devices = ([torch.device("cuda")] if torch.cuda.is_available() else []) + [torch.device("cpu")]
    pairs = []
    for name in backends:
        device = next((d for d in devices if registry.get(name).supports(d)), None)
        if device is not None:
            pairs.append((name, device.type))
    return pairs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="smog check", description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=(1001, 3001, 128), metavar=("N", "K", "D"))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--backends", nargs="+", default=None, help="default: every available fused backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the table to this JSON file")
    args = parser.parse_args(argv)

    available = registry.available_backends()
    backends = args.backends or [b for b in available if b != "reference"]
    unknown = [b for b in backends if b not in available]
    if unknown:
        parser.error(f"backend(s) {unknown} not available here (available: {available})")
    n, k, d = args.shape
    print(f"smog check on {platform.processor() or platform.machine()}"
          f"{' + ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}, torch {torch.__version__}, "
          f"N={n} K={k} D={d}; relative error vs smog_kernels.reference (assign: score gap to the best group)")
    rows, failed = [], False
    header = f"{'backend':<8} {'device':<6} {'dtype':<9} {'op':<24} {'error':>10} {'tolerance':>10}  ok"
    print(header + "\n" + "-" * len(header))
    for backend, device in _targets(backends):
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for op, error in measure(backend, device, dtype, n, k, d, args.seed).items():
                tol = tolerance(op, dtype)
                ok = error <= tol
                failed |= not ok
                rows.append(dict(backend=backend, device=device, dtype=dtype_name, op=op, error=error, tolerance=tol,
                                 ok=ok))
                print(f"{backend:<8} {device:<6} {dtype_name:<9} {op:<24} {error:>10.2e} {tol:>10.1e}  "
                      f"{'yes' if ok else 'NO'}")
    if not rows:
        print("no fused backend available: only the reference is installed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0
