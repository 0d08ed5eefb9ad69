"""`smog bench tune`: time auto's candidate backends on this machine's GPU and write the table auto reads.

    smog bench tune [--device cuda] [--dtypes bfloat16 float32] [--shapes N,K,D ...] [--reps R] [--out DIR]

For each dtype, shape (N rows, K groups, D features) and op of smog_kernels.auto.OPS, every candidate
backend (the fused backends auto.rule lists for the device and dtype that this install can run, or
--backends) runs side by side: a warm-up call, then R timed calls (CUDA events on a GPU), median.
The table goes to smog_kernels.auto.table_path(device name) under the cache folder ($SMOG_CACHE_DIR,
else $XDG_CACHE_HOME/smog, else ~/.cache/smog), keyed by the device's name and the hash of the
kernel sources: auto uses it on this device until the kernels change. --out also writes a copy there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from smog_kernels import auto, registry
from smog_kernels.api import run_loss
from smog_kernels.graphed_step import GraphedGroupingStep
from smog_kernels.step import grouping_step

SHAPES = [(4096, 3000, 128), (4096, 65536, 128), (32768, 65536, 256)]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TEMPERATURE, BETA = 0.1, 0.99


def _calls(backend: str, n: int, k: int, d: int, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    """The timed call of each op on one backend: 2 target sets, N update rows, one view of predictions."""
    g = torch.Generator().manual_seed(0)

    def unit(rows: int) -> torch.Tensor:
        return F.normalize(torch.randn(rows, d, generator=g), dim=1).to(device, dtype)

    groups, target_rows, update_rows = unit(k), unit(2 * n).view(2, n, d), unit(n)
    p = unit(n).requires_grad_(True)
    targets = torch.randint(0, k, (2, n), generator=g).to(device)
    chosen = registry.resolve(backend, p)

    def loss_fwd():
        with torch.no_grad():
            return run_loss(chosen, p, groups, targets, TEMPERATURE, "mean", False)

    def loss_fwdbwd():
        p.grad = None
        run_loss(chosen, p, groups, targets, TEMPERATURE, "mean", False).backward()

    def step():
        p.grad = None
        grouping_step(groups, target_rows, update_rows, p.view(1, n, d), BETA, TEMPERATURE, backend=backend).loss.backward()

    calls = {"assign": lambda: chosen.assign(update_rows, groups), "loss_fwd": loss_fwd, "loss_fwdbwd": loss_fwdbwd,
             "step": step}
    if device.type == "cuda":
        graphed = GraphedGroupingStep(TEMPERATURE, backend=backend)

        def step_graph():
            p.grad = None
            graphed(groups, target_rows, update_rows, p.view(1, n, d), BETA).loss.backward()

        calls["step_graph"] = step_graph
    return calls


def _median_ms(call: Callable, reps: int, device: torch.device) -> float:
    call()  # warm-up: compilation, graph capture
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            call()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def measure(device: torch.device, dtypes: list[str], shapes: list[tuple[int, int, int]], reps: int,
            backends: list[str] | None = None) -> list[dict]:
    """Timing rows {op, dtype, shape, backend, ms} (ms None with "error" where a call failed)."""
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        names = backends or [b for b in auto.rule(device.type, dtype)
                             if registry.usable(b) and registry.get(b).supports(device)]
        for shape in shapes:
            for backend in names:
                for op, call in _calls(backend, *shape, dtype, device).items():
                    row = {"op": op, "dtype": dtype_name, "shape": list(shape), "backend": backend, "ms": None}
                    try:
                        row["ms"] = _median_ms(call, reps, device)
                    except Exception as exc:  # noqa: BLE001 (a failed candidate is recorded, not fatal)
                        row["error"] = f"{type(exc).__name__}: {exc}"
                    rows.append(row)
                    print(f"{dtype_name:>9} {str(tuple(shape)):>20} {op:>12} {backend:>9} "
                          + (f"{row['ms']:10.4f} ms" if row["ms"] is not None else row["error"]), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def make_table(device: torch.device, rows: list[dict]) -> dict:
    """auto's table (format in smog_kernels.auto) for this device and these kernels."""
    ops: dict = {}
    times: dict = {}
    for row in rows:
        if row["ms"] is not None:
            times.setdefault((row["op"], row["dtype"], tuple(row["shape"])), {})[row["backend"]] = row["ms"]
    for (op, dtype, shape), ms in sorted(times.items()):
        order = sorted(ms, key=ms.get)
        entry = {"shape": list(shape), "order": order, "ms": {name: round(ms[name], 4) for name in order}}
        ops.setdefault(op, {}).setdefault(dtype, []).append(entry)
    return {"format": auto.FORMAT, "device": auto.device_name(device), "kernel_hash": auto.kernel_hash(),
            "measured_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "torch": torch.__version__, "ops": ops}


def write_table(table: dict, path: str) -> None:
    """JSON, one line per flat list (readable diffs)."""
    text = json.dumps(table, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, k, d = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is N,K,D (three integers), got {text!r}") from None
    return n, k, d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smog bench tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="default cuda (auto reads no table for CPU tensors)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    parser.add_argument("--shapes", nargs="+", type=_shape, default=SHAPES, metavar="N,K,D")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--backends", nargs="+", default=None, help="default: auto's candidates for the device")
    parser.add_argument("--out", default=None, help="also write a copy of the table in this folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("smog bench tune: no CUDA GPU visible to torch", file=sys.stderr)
        return 1
    unknown = [b for b in args.backends or () if b not in registry.available_backends()]
    if unknown:
        parser.error(f"backend(s) {unknown} not available here (available: {registry.available_backends()})")
    print(f"smog bench tune on {auto.device_name(device)}, kernels {auto.kernel_hash()}, median of {args.reps}")
    table = make_table(device, measure(device, args.dtypes, args.shapes, args.reps, args.backends))
    path = auto.table_path(table["device"])
    write_table(table, path)
    print(f"wrote {path}")
    if args.out:
        copy = os.path.join(args.out, os.path.basename(path))
        write_table(table, copy)
        print(f"wrote {copy}")
    return 0
