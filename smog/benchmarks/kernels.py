"""`smog bench kernels`: the fused CPU kernels against the reference, bare torch.mm and torch's chunked
linear cross-entropy, on this machine.

    smog bench kernels [--shapes small|issue] [--only N K D] [--repeats R] [--out DIR]

For each shape (N, K, D) and each operation (assign; assign + statistics + momentum update; loss
forward + backward to p with one and with two target sets), every implementation runs side by side
in one process, interleaved repeat by repeat, and the median time is reported. The bare matrix
products are the floor a GEMM-based implementation cannot beat: one product (x @ G.T) for the
assignment, two (p @ G.T and S @ G, S a given N x K matrix) for the loss. The loss's closest
PyTorch peer is torch.nn.functional.linear_cross_entropy, chunked over rows (torch >= 2.13), on
(p, G / temperature), with LinearCrossEntropyOptions() (its own chunk size) and with 1024-row
chunks; it takes one target per row, so two target sets are one call on the rows repeated twice (2N
rows: the mean over both sets, as smog's loss, at twice the products, since its API cannot share one
set of logits between two target vectors).

Peak extra memory: each case runs once more in a fresh process (forked from a server process that
has imported torch but run nothing), which builds the inputs, resets the kernel's peak resident-set
counter (/proc/self/clear_refs, Linux), runs the case and reports VmHWM minus the resident set
before the call: everything the call allocated at its peak, inputs excluded. Cases whose estimated memory
exceeds half of the memory free when the run starts (or --max-gb) are skipped and marked as such.

Writes a table to stdout and JSON to DIR/kernels_cpu.json (kernels_cpu_small.json for --shapes
small).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

SHAPES = {
    "small": [(2048, 1000, 128)],
    "issue": [(4096, 3000, 128), (16384, 16384, 128), (16384, 65536, 128)],
}
LOSS_T1, LOSS_T2 = "loss fwd+bwd T=1", "loss fwd+bwd T=2"  # one and two target sets
OPS = ("assign", "assign+stats+update", LOSS_T1, LOSS_T2)
TORCH_CE = {"torch CE chunked": None, "torch CE chunk 1024": 1024}  # LinearCrossEntropyOptions' batch_chunk_size
LOSS_IMPLS = ("fused", "reference", *TORCH_CE, "torch.mm x2")
IMPLS = {
    "assign": ("fused", "reference", "torch.mm x1"),
    "assign+stats+update": ("fused", "reference", "torch.mm x1"),
    LOSS_T1: LOSS_IMPLS,
    LOSS_T2: LOSS_IMPLS,
}
# Largest N x K float32 buffers alive at once (estimates used to skip cases that would not fit).
SCORE_BUFFERS = {
    ("assign", "reference"): 1.5, ("assign", "torch.mm x1"): 1,
    ("assign+stats+update", "reference"): 1.5, ("assign+stats+update", "torch.mm x1"): 1,
    (LOSS_T1, "reference"): 5, (LOSS_T1, "torch.mm x2"): 2,
    (LOSS_T2, "reference"): 5, (LOSS_T2, "torch.mm x2"): 2,
}
BETA, TEMPERATURE = 0.99, 0.1
CaseMaker = Callable[[str, str, int, int, int], Callable[[], object]]


def unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=generator)
    return x.div_(x.norm(dim=1, keepdim=True))


def make_case(op: str, impl: str, n: int, k: int, d: int) -> Callable[[], object]:
    """Builds the inputs of one case (seeded) and returns the call to time."""
    import smog_kernels as sk

    g = torch.Generator().manual_seed(0)
    x, c = unit_rows(n, d, g), unit_rows(k, d, g)
    if impl.startswith("torch.mm"):
        if impl == "torch.mm x1":
            return lambda: torch.mm(x, c.T)
        s = torch.rand(n, k, generator=g)
        return lambda: (torch.mm(x, c.T), torch.mm(s, c))
    backend = "cpu" if impl == "fused" else "reference"
    if op == "assign":
        return lambda: sk.assign(x, c, backend=backend)
    if op == "assign+stats+update":

        def step():
            index, _ = sk.assign(x, c, backend=backend)
            sums, counts = sk.group_stats(x, index, k, backend=backend)
            return sk.momentum_update(c, sums, counts, BETA, backend=backend)

        return step
    targets = torch.randint(0, k, (1 if op == LOSS_T1 else 2, n), generator=g)
    if impl in TORCH_CE:
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=TORCH_CE[impl])

        def torch_loss_step():
            p = x.detach().requires_grad_(True)
            rows = p.repeat(targets.shape[0], 1)  # row t * N + b is p_b, scored against targets[t, b]
            torch.nn.functional.linear_cross_entropy(rows, c / TEMPERATURE, targets.reshape(-1),
                                                     options=options).backward()
            return p.grad

        return torch_loss_step

    def loss_step():
        p = x.detach().requires_grad_(True)
        sk.group_contrastive_loss(p, c, targets, TEMPERATURE, backend=backend).backward()
        return p.grad

    return loss_step


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def probe(make: CaseMaker, op: str, impl: str, n: int, k: int, d: int) -> int:
    """Peak bytes one call of the case allocates beyond its inputs (this process must be fresh)."""
    run = make(op, impl, n, k, d)
    with torch.no_grad() if op not in (LOSS_T1, LOSS_T2) else torch.enable_grad():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _status_bytes("VmRSS:")
        run()
        return _status_bytes("VmHWM:") - before


def _probe_child(conn, make: CaseMaker, op: str, impl: str, shape: tuple[int, int, int], threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        conn.send(probe(make, op, impl, *shape))
    except Exception as e:  # noqa: BLE001 (reported by the parent)
        conn.send(f"{type(e).__name__}: {e}")
    conn.close()


_FORKSERVER = None


def measure_memory(make: CaseMaker, op: str, impl: str, shape: tuple[int, int, int]) -> int | None:
    """probe() in a fresh process: a fork of a forkserver that has imported torch, smog_kernels and the
    module of `make` (a module-level function) but never run a kernel (cheaper than a new interpreter
    per case)."""
    global _FORKSERVER
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["torch", "smog_kernels", make.__module__])
    parent, child = _FORKSERVER.Pipe(duplex=False)
    proc = _FORKSERVER.Process(target=_probe_child, args=(child, make, op, impl, shape, torch.get_num_threads()))
    proc.start()
    child.close()
    result = parent.recv() if parent.poll(3600) else "no answer"
    proc.join()
    if not isinstance(result, int):
        print(f"  memory probe failed for {op} / {impl} at {shape}: {result}", file=sys.stderr)
        return None
    return result


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_side_by_side(calls: dict[str, Callable[[], object]], repeats: int, grad: bool,
                      clock: Callable[[], float]) -> dict[str, list[float]]:
    """Each call once to warm up, then `repeats` rounds that run every call once, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.enable_grad() if grad else torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                start = clock()
                call()
                times[name].append(clock() - start)
    return times


def machine() -> dict:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l.split(":", 1)[1] for l in info.splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    have = set(flags.split())
    kernels = ("avx512" if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= have
               else "avx2" if {"avx2", "fma"} <= have else "portable")
    forced = os.environ.get("SMOG_CPU_KERNELS")
    if forced == "portable" or (forced == "avx2" and kernels == "avx512"):
        kernels = forced
    return {
        "cpu": model, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "micro_kernels": kernels, "torch": torch.__version__, "python": platform.python_version(),
        "memory_available_gb": round((available_bytes() or 0) / 2**30, 1),
    }


def fmt_bytes(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def parser(prog: str = "smog bench kernels", description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description.split("\n\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="issue")
    p.add_argument("--only", type=int, nargs=3, action="append", metavar=("N", "K", "D"),
                   help="time only these shapes of the --shapes set (repeatable)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 small, 3 issue)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="directory for the JSON")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time (default), or process CPU time: steadier on a busy machine, "
                        "meaningful with --threads 1 only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--max-gb", type=float, default=None,
                   help="skip cases estimated to need more (default: half the memory available)")
    return p


def setup(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list, int] | None:
    """Parse `argv` (sys.argv's by default) and set the threads: (args, shapes, repeats), or None with a
    message when the fused CPU kernels are not built."""
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import smog_kernels

    if "cpu" not in smog_kernels.available_backends():
        print(f"{p.prog}: the fused CPU kernels are not built (smog_kernels._C)", file=sys.stderr)
        return None
    repeats = args.repeats or (5 if args.shapes == "small" else 3)
    shapes = SHAPES[args.shapes]
    if args.only:
        unknown = [tuple(o) for o in args.only if tuple(o) not in shapes]
        if unknown:
            p.error(f"--only {unknown} not in --shapes {args.shapes}: {shapes}")
        shapes = [tuple(o) for o in args.only]
    return args, shapes, repeats


def time_cases(args: argparse.Namespace, shapes: list, repeats: int, info: dict,
               impls: dict[str, tuple[str, ...]] = IMPLS, make: CaseMaker = make_case,
               buffers: dict = SCORE_BUFFERS) -> list[dict]:
    """Every (shape, op, implementation) case timed side by side (and its peak extra memory) on the machine
    `info` (machine()), printed as a table; one result dict per case."""
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['threads']} torch threads, "
          f"{info['micro_kernels']} micro-kernels, torch {info['torch']}, {info['memory_available_gb']} GB available; "
          f"{args.clock} clock, median of {repeats}")
    free = available_bytes()
    limit = args.max_gb * 2**30 if args.max_gb is not None else (free / 2 if free is not None else None)
    results: list[dict] = []
    header = f"{'N':>6} {'K':>6} {'D':>4}  {'operation':<20} {'implementation':<19} {'median ms':>10} {'x fused':>8} {'peak extra MiB':>15}"
    print(header)
    print("-" * len(header))
    for shape in shapes:
        n, k, d = shape
        for op in OPS:
            calls, rows = {}, {}
            for impl in impls[op]:
                need = buffers.get((op, impl), 0) * n * k * 4
                row = {"shape": list(shape), "op": op, "impl": impl}
                if limit is not None and need > limit:
                    row["skipped"] = f"needs ~{need / 2**30:.1f} GB > {limit / 2**30:.1f} GB allowed"
                else:
                    try:
                        calls[impl] = make(op, impl, n, k, d)
                    except ImportError as e:
                        row["skipped"] = f"not installed ({e.name})"
                rows[impl] = row
            times = time_side_by_side(calls, repeats, op in (LOSS_T1, LOSS_T2), CLOCKS[args.clock])
            del calls
            for impl, row in rows.items():
                if impl in times:
                    row["times_s"] = times[impl]
                    row["median_s"] = statistics.median(times[impl])
                    row["extra_bytes"] = None if args.no_memory else measure_memory(make, op, impl, shape)
                results.append(row)
            fused = rows["fused"].get("median_s")
            for impl, row in rows.items():
                if "skipped" in row:
                    text = f"skipped: {row['skipped']}"
                    print(f"{n:>6} {k:>6} {d:>4}  {op:<20} {impl:<19} {text}")
                    continue
                rel = f"{row['median_s'] / fused:.2f}" if fused else "-"
                print(f"{n:>6} {k:>6} {d:>4}  {op:<20} {impl:<19} {row['median_s'] * 1e3:>10.1f} {rel:>8} "
                      f"{fmt_bytes(row.get('extra_bytes')):>15}")
    return results


def write(args: argparse.Namespace, shapes: list, repeats: int, info: dict, results: list[dict], **extra) -> str:
    """The run's JSON (machine, settings, results and `extra`) in --out; returns its path."""
    os.makedirs(args.out, exist_ok=True)
    name = "kernels_cpu.json" if args.shapes == "issue" else f"kernels_cpu_{args.shapes}.json"
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        json.dump({"machine": info, "shapes": args.shapes, "timed_shapes": [list(s) for s in shapes],
                   "repeats": repeats, "clock": args.clock,
                   "settings": {"beta": BETA, "temperature": TEMPERATURE},
                   "results": results, **extra}, f, indent=1)
    print(f"\nwrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    ready = setup(parser(), argv)
    if ready is None:
        return 1
    args, shapes, repeats = ready
    info = machine()
    write(args, shapes, repeats, info, time_cases(args, shapes, repeats, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
