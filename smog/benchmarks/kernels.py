"""`smog bench kernels`: the fused CPU kernels against the reference, bare torch.mm and peers.

    smog bench kernels [--shapes small|issue] [--only N K D] [--repeats R] [--out DIR]

For each shape (N, K, D) and each operation (assign; assign + statistics + momentum update; loss
forward + backward to p with one and with two target sets), every implementation runs side by side
in one process, interleaved repeat by repeat, and the median wall time is reported. The bare matrix
products are the floor a GEMM-based implementation cannot beat: one product (x @ G.T) for the
assignment, two (p @ G.T and S @ G, S a given N x K matrix) for the loss. The loss's closest
PyTorch peer is torch.nn.functional.linear_cross_entropy, chunked over rows (torch >= 2.13), on
(p, G / temperature), with LinearCrossEntropyOptions() (its own chunk size) and with 1024-row
chunks (faster on the CPU at the issue's shapes); it takes one target per row, so two target sets
are one call on the rows repeated twice (2N rows: the mean over both sets, as smog's loss, at twice
the products, since its API cannot share one set of logits between two target vectors). Optional
peers in the same run, when installed: lightly's SMoGPrototypes (assign_groups +
get_updated_group_features) and faiss-cpu's spherical k-means against ours.

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
from typing import Callable

import torch

SHAPES = {
    "small": [(2048, 1000, 128)],
    "issue": [(4096, 3000, 128), (16384, 16384, 128), (16384, 65536, 128)],
}
KMEANS = {"small": (6000, 300, 64, 10), "issue": (60000, 3000, 128, 10)}  # N, K, D, iterations
LOSS_T1, LOSS_T2 = "loss fwd+bwd T=1", "loss fwd+bwd T=2"  # one and two target sets
OPS = ("assign", "assign+stats+update", LOSS_T1, LOSS_T2)
TORCH_CE = {"torch CE chunked": None, "torch CE chunk 1024": 1024}  # LinearCrossEntropyOptions' batch_chunk_size
LOSS_IMPLS = ("fused", "reference", *TORCH_CE, "torch.mm x2")
IMPLS = {
    "assign": ("fused", "reference", "torch.mm x1"),
    "assign+stats+update": ("fused", "reference", "lightly", "torch.mm x1"),
    LOSS_T1: LOSS_IMPLS,
    LOSS_T2: LOSS_IMPLS,
}
# Largest N x K float32 buffers alive at once (estimates used to skip cases that would not fit).
SCORE_BUFFERS = {
    ("assign", "reference"): 1.5, ("assign", "torch.mm x1"): 1,
    ("assign+stats+update", "reference"): 1.5, ("assign+stats+update", "lightly"): 2,
    ("assign+stats+update", "torch.mm x1"): 1,
    (LOSS_T1, "reference"): 5, (LOSS_T1, "torch.mm x2"): 2,
    (LOSS_T2, "reference"): 5, (LOSS_T2, "torch.mm x2"): 2,
}
BETA, TEMPERATURE = 0.99, 0.1


def unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=generator)
    return x.div_(x.norm(dim=1, keepdim=True))


def make_case(op: str, impl: str, n: int, k: int, d: int) -> Callable[[], object]:
    """Builds the inputs of one case (seeded) and returns the call to time."""
    import smog_kernels as sk
    from smog_kernels import reference as ref

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
        if impl == "lightly":
            from lightly.models.modules.heads import SMoGPrototypes

            prototypes = SMoGPrototypes(c.clone(), beta=BETA)

            def lightly_step():
                prototypes.assign_groups(x)
                return prototypes.get_updated_group_features(x)

            return lightly_step

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


def probe(op: str, impl: str, n: int, k: int, d: int) -> int:
    """Peak bytes one call of the case allocates beyond its inputs (this process must be fresh)."""
    run = make_case(op, impl, n, k, d)
    with torch.no_grad() if op not in (LOSS_T1, LOSS_T2) else torch.enable_grad():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _status_bytes("VmRSS:")
        run()
        return _status_bytes("VmHWM:") - before


def _probe_child(conn, op: str, impl: str, shape: tuple[int, int, int], threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        conn.send(probe(op, impl, *shape))
    except Exception as e:  # reported by the parent
        conn.send(f"{type(e).__name__}: {e}")
    conn.close()


_FORKSERVER = None


def measure_memory(op: str, impl: str, shape: tuple[int, int, int]) -> int | None:
    """probe() in a fresh process: a fork of a forkserver that has imported torch and smog_kernels
    but never run a kernel (cheaper than a new interpreter per case)."""
    global _FORKSERVER
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["torch", "smog_kernels", "smog.benchmarks.kernels"])
    parent, child = _FORKSERVER.Pipe(duplex=False)
    proc = _FORKSERVER.Process(target=_probe_child, args=(child, op, impl, shape, torch.get_num_threads()))
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


def kmeans_peers(n: int, k: int, d: int, iters: int, repeats: int, clock: Callable[[], float]) -> dict:
    """smog_kernels.spherical_kmeans (fused CPU) vs faiss.Kmeans(spherical=True), same data, K,
    iterations and thread count; quality = mean cosine of each point to its assigned group."""
    import numpy as np

    import smog_kernels as sk

    x = unit_rows(n, d, torch.Generator().manual_seed(1))
    results: dict[str, dict] = {}
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "fused": lambda: sk.spherical_kmeans(x, k, iters=iters, seed=0, backend="cpu")[0],
    }
    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        xn = np.ascontiguousarray(x.numpy())

        def faiss_kmeans() -> torch.Tensor:
            km = faiss.Kmeans(d, k, niter=iters, spherical=True, seed=0, verbose=False)
            km.train(xn)
            return torch.from_numpy(km.centroids)

        calls["faiss"] = faiss_kmeans
    except ImportError:
        results["faiss"] = {"skipped": "faiss-cpu is not installed"}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = clock()
            groups = call()
            times[name].append(clock() - start)
            quality = float(sk.assign(x, groups.float(), backend="cpu")[1].mean())
            results[name] = {"times_s": times[name], "median_s": statistics.median(times[name]),
                             "mean_cosine": quality}
    return {"shape": [n, k, d], "iterations": iters, "results": results}


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


def ratio(results: list[dict], shape, op: str, slow: str, fast: str) -> float | None:
    med = {r["impl"]: r.get("median_s") for r in results if tuple(r["shape"]) == tuple(shape) and r["op"] == op}
    if med.get(slow) is None or med.get(fast) is None:
        return None
    return med[slow] / med[fast]


def targets(results: list[dict], kmeans: dict, shapes: list) -> list[dict]:
    """The ratios the issue's targets refer to (at its shapes; computed the same way for others)."""
    first, last = shapes[0], shapes[-1]
    rows = [
        ("loss fwd+bwd T=2: reference / fused", ratio(results, first, LOSS_T2, "reference", "fused"), ">=", 2.0, first),
        ("loss fwd+bwd T=2: fused / two bare products", ratio(results, first, LOSS_T2, "fused", "torch.mm x2"), "<=", 1.3, first),
        *((f"loss fwd+bwd T={t}: {ce} / fused", ratio(results, first, op, ce, "fused"), ">=", 1.0, first)
          for t, op in ((1, LOSS_T1), (2, LOSS_T2)) for ce in TORCH_CE),
        ("assign: fused / one bare product", ratio(results, first, "assign", "fused", "torch.mm x1"), "<=", 1.15, first),
        ("assign+stats+update: reference / fused", ratio(results, first, "assign+stats+update", "reference", "fused"), ">=", 1.2, first),
        ("assign+stats+update: lightly / fused", ratio(results, first, "assign+stats+update", "lightly", "fused"), ">=", 4.0, first),
    ]
    fused_mem = [r.get("extra_bytes") for r in results if tuple(r["shape"]) == tuple(last) and r["impl"] == "fused"]
    worst = max(fused_mem) / 2**30 if fused_mem and None not in fused_mem else None
    rows.append(("largest fused extra memory (GB)", worst, "<", 1.0, last))
    km = kmeans["results"]
    if "median_s" in km.get("faiss", {}) and "median_s" in km.get("fused", {}):
        rows.append(("spherical k-means: fused / faiss", km["fused"]["median_s"] / km["faiss"]["median_s"], "<=", 1.25,
                     kmeans["shape"]))
    out = []
    for name, value, cmp, bound, shape in rows:
        ok = None if value is None else (value >= bound if cmp == ">=" else value <= bound if cmp == "<=" else value < bound)
        out.append({"target": name, "shape": list(shape), "value": value, "bound": f"{cmp} {bound}", "met": ok})
    return out


def fmt_bytes(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smog bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="issue")
    parser.add_argument("--only", type=int, nargs=3, action="append", metavar=("N", "K", "D"),
                        help="time only these shapes of the --shapes set (repeatable)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 small, 3 issue)")
    parser.add_argument("--out", default=os.path.join("bench", "results"), help="directory for the JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (default), or process CPU time: steadier on a busy machine, "
                             "meaningful with --threads 1 only")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--max-gb", type=float, default=None,
                        help="skip cases estimated to need more (default: half the memory available)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import smog_kernels

    if "cpu" not in smog_kernels.available_backends():
        print("smog bench kernels: the fused CPU kernels are not built (smog_kernels._C)", file=sys.stderr)
        return 1
    repeats = args.repeats or (5 if args.shapes == "small" else 3)
    shapes = SHAPES[args.shapes]
    if args.only:
        unknown = [tuple(o) for o in args.only if tuple(o) not in shapes]
        if unknown:
            parser.error(f"--only {unknown} not in --shapes {args.shapes}: {shapes}")
        shapes = [tuple(o) for o in args.only]
    info = machine()
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
            for impl in IMPLS[op]:
                need = SCORE_BUFFERS.get((op, impl), 0) * n * k * 4
                row = {"shape": list(shape), "op": op, "impl": impl}
                if limit is not None and need > limit:
                    row["skipped"] = f"needs ~{need / 2**30:.1f} GB > {limit / 2**30:.1f} GB allowed"
                else:
                    try:
                        calls[impl] = make_case(op, impl, n, k, d)
                    except ImportError as e:
                        row["skipped"] = f"not installed ({e.name})"
                rows[impl] = row
            times = time_side_by_side(calls, repeats, op in (LOSS_T1, LOSS_T2), CLOCKS[args.clock])
            del calls
            for impl, row in rows.items():
                if impl in times:
                    row["times_s"] = times[impl]
                    row["median_s"] = statistics.median(times[impl])
                    row["extra_bytes"] = None if args.no_memory else measure_memory(op, impl, shape)
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
    kn, kk, kd, iters = KMEANS[args.shapes]
    kmeans = kmeans_peers(kn, kk, kd, iters, max(1, min(repeats, 2)), CLOCKS[args.clock])
    print(f"\nspherical k-means, N={kn} K={kk} D={kd}, {iters} iterations:")
    for name, r in kmeans["results"].items():
        if "skipped" in r:
            print(f"  {name:<8} skipped: {r['skipped']}")
        else:
            print(f"  {name:<8} {r['median_s']:8.2f} s   mean cosine to its group {r['mean_cosine']:.4f}")
    goals = targets(results, kmeans, shapes)
    note = "" if args.shapes == "issue" else " (the issue's targets refer to --shapes issue)"
    print(f"\ntargets{note}:")
    for t in goals:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  {t['target']:<46} {value:>7}  (target {t['bound']}) at {tuple(t['shape'])}: {met}")
    os.makedirs(args.out, exist_ok=True)
    name = "kernels_cpu.json" if args.shapes == "issue" else f"kernels_cpu_{args.shapes}.json"
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        json.dump({"machine": info, "shapes": args.shapes, "timed_shapes": [list(s) for s in shapes],
                   "repeats": repeats, "clock": args.clock,
                   "settings": {"beta": BETA, "temperature": TEMPERATURE},
                   "results": results, "kmeans": kmeans, "targets": goals}, f, indent=1)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
