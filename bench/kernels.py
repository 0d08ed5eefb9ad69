"""`bench/kernels`: `smog bench kernels` with the peers and the issue's targets (development only).

    bench/kernels [--shapes small|issue] [--only N K D] [--repeats R] [--out DIR] (the options of
                  `smog bench kernels`)

The cases of smog.benchmarks.kernels plus, in the same run, when installed: lightly's SMoGPrototypes
(assign_groups + get_updated_group_features) next to the fused assign + statistics + update, and
faiss-cpu's spherical k-means (faiss.Kmeans(spherical=True), same data, K, iterations and threads)
against smog_kernels.spherical_kmeans; then the ratios the kernel issue's targets refer to (at its
shapes; computed the same way for others). JSON: DIR/kernels_cpu.json (kernels_cpu_small.json for
--shapes small), with "kmeans" and "targets" added.
"""
from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import torch

from smog.benchmarks import kernels as base

UPDATE = "assign+stats+update"
IMPLS = {**base.IMPLS, UPDATE: ("fused", "reference", "lightly", "torch.mm x1")}
SCORE_BUFFERS = {**base.SCORE_BUFFERS, (UPDATE, "lightly"): 2}
KMEANS = {"small": (6000, 300, 64, 10), "issue": (60000, 3000, 128, 10)}  # N, K, D, iterations


def make_case(op: str, impl: str, n: int, k: int, d: int) -> Callable[[], object]:
    """smog.benchmarks.kernels.make_case, and lightly's SMoGPrototypes step for impl "lightly"."""
    if impl != "lightly":
        return base.make_case(op, impl, n, k, d)
    from lightly.models.modules.heads import SMoGPrototypes

    g = torch.Generator().manual_seed(0)
    x, c = base.unit_rows(n, d, g), base.unit_rows(k, d, g)  # the inputs base.make_case draws
    prototypes = SMoGPrototypes(c.clone(), beta=base.BETA)

    def lightly_step():
        prototypes.assign_groups(x)
        return prototypes.get_updated_group_features(x)

    return lightly_step


def kmeans_peers(n: int, k: int, d: int, iters: int, repeats: int, clock: Callable[[], float]) -> dict:
    """smog_kernels.spherical_kmeans (fused CPU) vs faiss.Kmeans(spherical=True), same data, K,
    iterations and thread count; quality = mean cosine of each point to its assigned group."""
    import numpy as np

    import smog_kernels as sk

    x = base.unit_rows(n, d, torch.Generator().manual_seed(1))
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


def ratio(results: list[dict], shape, op: str, slow: str, fast: str) -> float | None:
    med = {r["impl"]: r.get("median_s") for r in results if tuple(r["shape"]) == tuple(shape) and r["op"] == op}
    if med.get(slow) is None or med.get(fast) is None:
        return None
    return med[slow] / med[fast]


def targets(results: list[dict], kmeans: dict, shapes: list) -> list[dict]:
    """The ratios the issue's targets refer to (at its shapes; computed the same way for others)."""
    first, last = shapes[0], shapes[-1]
    t1, t2 = base.LOSS_T1, base.LOSS_T2
    rows = [
        ("loss fwd+bwd T=2: reference / fused", ratio(results, first, t2, "reference", "fused"), ">=", 2.0, first),
        ("loss fwd+bwd T=2: fused / two bare products", ratio(results, first, t2, "fused", "torch.mm x2"), "<=", 1.3,
         first),
        *((f"loss fwd+bwd T={t}: {ce} / fused", ratio(results, first, op, ce, "fused"), ">=", 1.0, first)
          for t, op in ((1, t1), (2, t2)) for ce in base.TORCH_CE),
        ("assign: fused / one bare product", ratio(results, first, "assign", "fused", "torch.mm x1"), "<=", 1.15, first),
        (f"{UPDATE}: reference / fused", ratio(results, first, UPDATE, "reference", "fused"), ">=", 1.2, first),
        (f"{UPDATE}: lightly / fused", ratio(results, first, UPDATE, "lightly", "fused"), ">=", 4.0, first),
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


def main(argv: list[str] | None = None) -> int:
    ready = base.setup(base.parser(prog="bench/kernels", description=__doc__), argv)
    if ready is None:
        return 1
    args, shapes, repeats = ready
    info = base.machine()
    results = base.time_cases(args, shapes, repeats, info, IMPLS, make_case, SCORE_BUFFERS)
    kn, kk, kd, iters = KMEANS[args.shapes]
    kmeans = kmeans_peers(kn, kk, kd, iters, max(1, min(repeats, 2)), base.CLOCKS[args.clock])
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
    base.write(args, shapes, repeats, info, results, kmeans=kmeans, targets=goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
