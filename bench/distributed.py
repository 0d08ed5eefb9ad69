"""`bench/distributed`: the two group-statistics reductions of smog_kernels.distributed, timed.

For each world size W (processes on this machine, gloo over loopback) and each (rows per rank N,
groups K), every rank times `sync_group_stats` with strategy "allreduce" and "allgather" (with
max_rows, so one collective each) on random unit rows; a step's time is the slowest rank's, after a
barrier; the table shows medians, bytes sent per rank (ring model, `bytes_moved`), the choice of
the "auto" rule and the measured winner. JSON goes to bench/results/distributed_gloo.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from smog_kernels import assign, available_backends
from smog_kernels import distributed as skd

STRATEGIES = ("allreduce", "allgather")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4], help="process counts")
    parser.add_argument("--groups", type=int, nargs="+", default=[3000, 65536], help="K values")
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 1024], help="rows per rank N")
    parser.add_argument("--dim", type=int, default=128, help="feature dimension D")
    parser.add_argument("--reps", type=int, default=15, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per world size")
    parser.add_argument("--out", default="bench/results/distributed_gloo.json", help="JSON output")
    return parser.parse_args(argv)


def _time_cases(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """Every (N, K, strategy) on this rank: per-step seconds of the slowest rank (rank 0 returns them)."""
    rows = []
    generator = torch.Generator().manual_seed(1234 + rank)
    for n in args.rows:
        x = F.normalize(torch.randn(n, args.dim, generator=generator), dim=1)
        for k in args.groups:
            groups = F.normalize(torch.randn(k, args.dim, generator=torch.Generator().manual_seed(k)), dim=1)
            index, _ = assign(x, groups)
            for strategy in STRATEGIES:
                steps = []
                for rep in range(args.warmup + args.reps):
                    dist.barrier()
                    start = time.perf_counter()
                    skd.sync_group_stats(x, index, k, strategy=strategy, max_rows=n)
                    steps.append(time.perf_counter() - start)
                slowest = torch.tensor(steps[args.warmup :], dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                rows.append({"world": world, "rows_per_rank": n, "groups": k, "dim": args.dim,
                             "strategy": strategy, "step_s": slowest.tolist()})
    return rows


def _worker(rank: int, world: int, init_file: str, out_file: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=args.timeout))
        rows = _time_cases(rank, world, args)
        if rank == 0:
            Path(out_file).write_text(json.dumps(rows))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 -- reported by the launcher
        Path(f"{out_file}.rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def _run_world(world: int, args: argparse.Namespace) -> list[dict]:
    """Spawns `world` processes, returns rank 0's rows; raises if a rank fails or runs past the timeout."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "rdv"), out_file, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = sorted(Path(tmp).glob("rows.json.rank*.err"))
        if errors or any(p.exitcode != 0 for p in procs):
            details = "\n".join(e.read_text() for e in errors)
            raise RuntimeError(f"world {world}: exit codes {[p.exitcode for p in procs]}\n{details}")
        return json.loads(Path(out_file).read_text())


def _summarise(rows: list[dict]) -> list[dict]:
    """Adds medians, bytes and the rule's choice; marks the faster strategy of each case."""
    for row in rows:
        row["median_ms"] = 1e3 * statistics.median(row["step_s"])
        row["min_ms"] = 1e3 * min(row["step_s"])
        row["bytes_sent_per_rank"] = skd.bytes_moved(row["strategy"], row["rows_per_rank"], row["groups"],
                                                     row["dim"], row["world"])
        row["auto_choice"] = skd.choose_strategy(row["rows_per_rank"], row["groups"], row["dim"], row["world"])
    for row in rows:
        pair = [r for r in rows if all(r[key] == row[key] for key in ("world", "rows_per_rank", "groups", "dim"))]
        row["measured_faster"] = min(pair, key=lambda r: r["median_ms"])["strategy"]
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'W':>2} {'N/rank':>6} {'K':>6} {'strategy':>9} {'MB sent/rank':>12} {'median ms':>10} {'min ms':>8} "
            f"{'auto':>9} {'faster':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['world']:>2} {r['rows_per_rank']:>6} {r['groups']:>6} {r['strategy']:>9} "
                     f"{r['bytes_sent_per_rank'] / 1e6:>12.3f} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} {r['auto_choice']:>9} "
                     f"{r['measured_faster']:>9}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    load_before = os.getloadavg()
    rows = []
    for world in args.worlds:
        if world < 2:
            raise SystemExit(f"--worlds: each world size must be >= 2, got {world}")
        rows += _run_world(world, args)
    rows = _summarise(rows)
    print(_table(rows))
    agree = sum(r["auto_choice"] == r["measured_faster"] for r in rows if r["strategy"] == "allreduce")
    print(f"\nrule agrees with the measurement in {agree} of {len(rows) // 2} cases")
    meta = {"backend": "gloo", "transport": "loopback", "device": "cpu", "threads_per_process": args.threads,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "kernels": available_backends(),
            "python": platform.python_version(), "reps": args.reps, "warmup": args.warmup,
            "time": "per step, slowest rank, after a barrier; median (and min) over reps",
            "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
