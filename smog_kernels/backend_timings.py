"""Measured GPU timings behind backend="auto": which backend was fastest per op, dtype and shape.

The figures come from `bench/gpu_check`'s benchmark (`smog bench gpu`: medians of CUDA-event timings
on one card, JSON filed as bench/results/gpu_<card>.json). `build_table` reduces that JSON to
backend_timings.json next to this file (shipped with the package); bench/gpu_check rewrites it after
each GPU run, or by hand:

    bench/backend_timings bench/results/gpu_nvidia_h200.json

The table keeps the benchmark's op names: "assign", "loss_fwd" (loss forward only), "loss_fwdbwd"
(forward + backward to p), "step" (grouping_step called eagerly), "step_graphed" (through
GraphedGroupingStep) and "step_graph" (the step replayed as one CUDA graph). GraphedGroupingStep
consults "step_graphed", then "step_graph", then "step": without the host's launch overhead the
fastest backend can differ from the eager step's. For each op and dtype it lists every measured (N, K, D)
with the backends ordered fastest first and their times in ms. "reference" is recorded for comparison;
_backends only chooses among the fused backends (the reference holds the N x K score matrix).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_timings.json")
BACKENDS = ("triton", "cuda", "reference")  # the benchmark's methods that are smog backends


def build_table(bench: dict, source: str) -> dict:
    """The table from a `smog bench gpu` JSON (`source`: where that JSON is filed). Rows without a
    time (failed configurations) and methods that are not smog backends are left out."""
    if bench.get("tiny"):
        raise ValueError(f"{source} is a --tiny run: its timings mean nothing")
    times: dict = {}
    for row in bench["rows"]:
        if row["method"] in BACKENDS and row.get("ms") is not None:
            key = (row["op"], row["dtype"], (row["n"], row["k"], row["d"]))
            times.setdefault(key, {})[row["method"]] = row["ms"]
    ops: dict = {}
    for (op, dtype, shape), ms in sorted(times.items()):
        order = sorted(ms, key=ms.get)
        entry = {"shape": list(shape), "order": order, "ms": {name: round(ms[name], 4) for name in order}}
        ops.setdefault(op, {}).setdefault(dtype, []).append(entry)
    env = bench.get("environment", {})
    return {"card": env.get("device"), "measured_utc": env.get("time_utc"), "source": source, "ops": ops}


@functools.cache
def _table() -> dict:
    try:
        with open(TABLE) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"ops": {}}


def fastest(op: str, dtype: str, shape: tuple[int, int, int], candidates: list[str]) -> str | None:
    """The candidate measured fastest for `op` and `dtype` (e.g. "bfloat16") at the recorded (N, K, D)
    nearest to `shape` (sum of |log2| differences) among those where some candidate was measured;
    None where the table has no such figure."""
    entries = [e for e in _table()["ops"].get(op, {}).get(dtype, []) if any(c in e["ms"] for c in candidates)]
    if not entries:
        return None
    nearest = min(entries, key=lambda e: sum(abs(math.log2(a / b)) for a, b in zip(e["shape"], shape)))
    return next(name for name in nearest["order"] if name in candidates)


def write_table(bench_json: str, out: str = TABLE) -> dict:
    """Reduce the benchmark JSON at `bench_json` to the table and write it to `out` (one line per
    flat list, for readable diffs); returns the table."""
    with open(bench_json) as f:
        bench = json.load(f)
    # recorded as filed under bench/results/ (where whoever brings a GPU run's files back puts them)
    table = build_table(bench, "bench/results/" + os.path.basename(bench_json))
    text = json.dumps(table, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(out, "w") as f:
        f.write(text + "\n")
    return table
