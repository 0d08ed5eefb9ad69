"""`python -m bench.gpu` (step 4 of bench/gpu_check): the grouping step on a CUDA GPU, fused kernels vs
the reference vs torch's chunked linear cross-entropy vs lightly's SMoGPrototypes vs bare torch.mm.

For (N, K, D) in {(4096, 3000, 128), (4096, 65536, 128), (32768, 65536, 256)} x {bfloat16, float32}
it times (median, CUDA events through triton.testing.do_bench) and measures the peak extra memory
(torch.cuda.max_memory_allocated above what was allocated before the call) of:

  assign        argmax assignment of N rows
  loss_fwd      the group contrastive loss (2 target sets), forward only
  loss_fwdbwd   forward + backward to p (the default: no gradient into the groups)
  loss_fwdbwd_t1  the same with one target set
  step          the whole grouping step of one head: assign the 2 x N target rows (momentum
                network) and the N update rows (online network), group statistics of the update
                rows, momentum update, loss forward + backward against the updated groups
                (smog_kernels.step.grouping_step with the method's backend)
  step_graphed  the same step through smog_kernels.GraphedGroupingStep, what training code calls
                (fused backends on a GPU): CUDA graphs captured on the first call, then per call
                the input copies, two graph replays and autograd's bookkeeping
  step_graph    the same step captured as one CUDA graph (forward + backward) and replayed: the
                GPU time alone, a lower bound (possible because no kernel of the step synchronises
                with the host)

for each method: "triton" (and "cuda" where the extension has CUDA kernels), "reference"
(smog_kernels.reference), "torch_ce" (torch.nn.functional.linear_cross_entropy with
LinearCrossEntropyOptions(), on (p, G / temperature): one target per row, so two target sets are one
call on the rows repeated twice, twice the products of one set), "lightly"
(lightly.models.modules.heads.SMoGPrototypes, when importable) and "torch.mm" (the bare products:
p @ C^T for the forward, plus softmax @ C for the backward).
TFLOP/s counts the useful products: 2NKD for assign and loss_fwd, 4NKD for loss_fwdbwd(_t1),
2(3N)KD + 4NKD for the step; "of_mm" is that rate over torch.mm's measured rate for the same
products at the same shapes. Each configuration also checks the fused results against the
reference (relative errors in the JSON).

A host-time profile follows on a GPU (--no-profile skips it): for the eager step at (4096, 3000, 128)
and the loss at (4096, 65536, 128), bfloat16, the host time per call, the GPU kernels per call and
their GPU time, and the ops with the most host time ("host_profile" in the JSON).

assign/loss rows of the fused backends call the Backend objects directly, without the public API's
argument checks (they read index ranges back to the host); the step rows go through the public
smog_kernels.step.grouping_step, whose checks need no host synchronisation.

--tiny runs small shapes (on CPU tensors under TRITON_INTERPRET=1 when there is no GPU) for
correctness only; its timings mean nothing. Results: a table on stdout and JSON
gpu_<device>.json (device name, driver, torch/triton versions) in --out (default bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

SHAPES = [(4096, 3000, 128), (4096, 65536, 128), (32768, 65536, 256)]
TINY_SHAPES = [(40, 37, 24), (33, 70, 16)]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
OPS = ("assign", "loss_fwd", "loss_fwdbwd", "loss_fwdbwd_t1", "step", "step_graphed", "step_graph")
LOSS_GRAD_OPS = ("loss_fwdbwd", "loss_fwdbwd_t1")
STEP_OPS = ("step", "step_graphed", "step_graph")
TEMPERATURE = 0.1
BETA = 0.99


# ---- environment ----------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1))
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}), Triton interpreter",
                   driver=None)
    return env


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


# ---- methods --------------------------------------------------------------------------------------


def load_lightly():
    try:
        from lightly.models.modules.heads import SMoGPrototypes
    except Exception as exc:  # noqa: BLE001 (any import failure means: no peer)
        return None, f"{type(exc).__name__}: {exc}"
    return SMoGPrototypes, None


class Problem:
    """One configuration's inputs: 2 target sets (momentum z), update rows (online z), predictions p
    and the groups C. All rows unit-norm, in the benchmark dtype."""

    def __init__(self, n, k, d, dtype, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def unit(rows):
            return F.normalize(torch.randn(rows, d, generator=g), dim=1).to(device=device, dtype=dtype)

        self.n, self.k, self.d = n, k, d
        self.x_all = unit(3 * n)  # rows [0, 2N): the two target sets, [2N, 3N): the update rows
        self.z_targets = self.x_all[: 2 * n]
        self.z_update = self.x_all[2 * n:]
        self.p = unit(n).requires_grad_(True)
        self.c = unit(k)
        self.targets = torch.randint(0, k, (2, n), generator=g).to(device)


def grouping_step_fn(pb: Problem, backend: str):
    """smog_kernels.step.grouping_step (the public one-head step: fused assign + statistics where the
    backend has it, update, loss) followed by the backward pass; returns (loss, groups', targets,
    index of the update rows)."""
    from smog_kernels.step import grouping_step

    out = grouping_step(pb.c, pb.z_targets.view(2, pb.n, pb.d), pb.z_update, pb.p.view(1, pb.n, pb.d),
                        BETA, TEMPERATURE, backend=backend)
    out.loss.backward()
    return out.loss, out.groups, out.targets, out.index


def graphed_step_fn(pb: Problem, backend: str):
    """The step of grouping_step_fn through smog_kernels.GraphedGroupingStep (captured on first call)."""
    from smog_kernels.graphed_step import GraphedGroupingStep

    step = GraphedGroupingStep(TEMPERATURE, backend=backend)

    def run():
        out = step(pb.c, pb.z_targets.view(2, pb.n, pb.d), pb.z_update, pb.p.view(1, pb.n, pb.d), BETA)
        out.loss.backward()
        return out.loss, out.groups, out.targets, out.index

    return run


def graphed(fn, grads):
    """fn (forward + backward) captured once in a CUDA graph; returns the replay function. Works only
    when nothing in fn synchronises with the host."""
    for t in grads:
        t.grad = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
            for t in grads:
                t.grad = None
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def fused_fns(pb: Problem, backend, name: str) -> dict:
    from smog_kernels.fused_loss import FusedGroupLoss

    def loss(p, c, targets):
        return FusedGroupLoss.apply(p, c, targets, TEMPERATURE, "mean", False, backend)

    def loss_fwd():
        with torch.no_grad():
            return loss(pb.p, pb.c, pb.targets)

    def loss_fwdbwd(targets=pb.targets):
        out = loss(pb.p, pb.c, targets)
        out.backward()
        return out

    def step():
        return grouping_step_fn(pb, name)

    return {"assign": lambda: backend.assign(pb.z_update, pb.c), "loss_fwd": loss_fwd,
            "loss_fwdbwd": loss_fwdbwd, "loss_fwdbwd_t1": lambda: loss_fwdbwd(pb.targets[:1]), "step": step}


def reference_fns(pb: Problem) -> dict:
    from smog_kernels import reference as ref

    def loss_fwdbwd(targets=pb.targets):
        out = ref.group_contrastive_loss(pb.p, pb.c, targets, TEMPERATURE)
        out.backward()
        return out

    def loss_fwd():
        with torch.no_grad():
            return ref.group_contrastive_loss(pb.p, pb.c, pb.targets, TEMPERATURE)

    def step():
        return grouping_step_fn(pb, "reference")

    return {"assign": lambda: ref.assign(pb.z_update, pb.c), "loss_fwd": loss_fwd,
            "loss_fwdbwd": loss_fwdbwd, "loss_fwdbwd_t1": lambda: loss_fwdbwd(pb.targets[:1]), "step": step}


def torch_ce_fns(pb: Problem) -> dict:
    """torch.nn.functional.linear_cross_entropy, chunked; T target sets = the rows repeated T times."""
    options = torch.nn.LinearCrossEntropyOptions()

    def loss(targets):
        rows = pb.p.repeat(targets.shape[0], 1)  # row t * N + b is p_b, scored against targets[t, b]
        return F.linear_cross_entropy(rows, pb.c / TEMPERATURE, targets.reshape(-1), options=options)

    def loss_fwd():
        with torch.no_grad():
            return loss(pb.targets)

    def loss_fwdbwd(targets=pb.targets):
        out = loss(targets)
        out.backward()
        return out

    return {"loss_fwd": loss_fwd, "loss_fwdbwd": loss_fwdbwd, "loss_fwdbwd_t1": lambda: loss_fwdbwd(pb.targets[:1])}


def lightly_fns(pb: Problem, prototypes_cls, with_step: bool) -> dict:
    """lightly's recipe: assign_groups for the targets, get_updated_group_features (a Python loop
    over the groups present) for the update, logits = forward(p, groups) / tau, cross-entropy."""
    protos = prototypes_cls(pb.c.clone(), BETA)
    n = pb.n

    def loss(c):
        logits = protos(pb.p, c, TEMPERATURE)
        return 0.5 * (F.cross_entropy(logits, pb.targets[0]) + F.cross_entropy(logits, pb.targets[1]))

    def loss_fwd():
        with torch.no_grad():
            return loss(pb.c)

    def loss_fwdbwd():
        out = loss(pb.c)
        out.backward()
        return out

    def step():
        t0 = protos.assign_groups(pb.z_targets[:n])
        t1 = protos.assign_groups(pb.z_targets[n:])
        updated = protos.get_updated_group_features(pb.z_update)
        logits = protos(pb.p, updated, TEMPERATURE)
        out = 0.5 * (F.cross_entropy(logits, t0) + F.cross_entropy(logits, t1))
        out.backward()
        return out

    fns = {"assign": lambda: protos.assign_groups(pb.z_update), "loss_fwd": loss_fwd, "loss_fwdbwd": loss_fwdbwd}
    if with_step:
        fns["step"] = step
    return fns


def mm_fns(pb: Problem) -> dict:
    """The bare products of the loss: S = p C^T [N, K] and S @ C [N, D]."""
    p = pb.p.detach()
    held = {}  # the [N, K] score operand of the second product, made on first use (then reused)

    def both():
        if "scores" not in held:
            held["scores"] = torch.mm(p, pb.c.T)
        torch.mm(p, pb.c.T)
        return torch.mm(held["scores"], pb.c)

    return {"assign": lambda: torch.mm(pb.z_update, pb.c.T), "loss_fwd": lambda: torch.mm(p, pb.c.T),
            "loss_fwdbwd": both, "loss_fwdbwd_t1": both}


def useful_flops(op: str, n: int, k: int, d: int) -> float:
    if op in STEP_OPS:  # assign 3N rows, loss forward + backward for N
        return 2.0 * 3 * n * k * d + 4.0 * n * k * d
    return {"assign": 2.0 * n * k * d, "loss_fwd": 2.0 * n * k * d, "loss_fwdbwd": 4.0 * n * k * d,
            "loss_fwdbwd_t1": 4.0 * n * k * d}[op]


# ---- measurement ----------------------------------------------------------------------------------


def timed(fn, device: torch.device, reps: int, warmup_ms: int, rep_ms: int, grad_to_none) -> float:
    """Median milliseconds: CUDA events through triton.testing.do_bench on the GPU, wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    fn()
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn, device: torch.device, grad_to_none) -> int | None:
    if device.type != "cuda":
        return None
    for t in grad_to_none or ():
        t.grad = None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_against_reference(pb: Problem, fns: dict, ref_fns: dict) -> dict:
    """Relative errors of one fused method against the reference on this configuration."""
    errors = {}
    index, _ = fns["assign"]()
    ref_index, _ = ref_fns["assign"]()
    errors["assign_agreement"] = float((index == ref_index).float().mean())
    for name, fn in (("fused", fns["loss_fwdbwd"]), ("ref", ref_fns["loss_fwdbwd"])):
        pb.p.grad = None
        out = fn()
        if name == "fused":
            loss, grad = out.detach(), pb.p.grad.clone()
        else:
            errors["loss"] = rel_err(loss, out)
            errors["grad_p"] = rel_err(grad, pb.p.grad)
    pb.p.grad = None
    f_loss, f_updated, f_targets, f_index = fns["step"]()
    r_loss, r_updated, r_targets, r_index = ref_fns["step"]()
    f_index, r_index = torch.cat([f_targets.reshape(-1), f_index]), torch.cat([r_targets.reshape(-1), r_index])
    errors["step_loss"] = rel_err(f_loss, r_loss)
    errors["step_groups"] = rel_err(f_updated, r_updated)
    errors["step_assign_agreement"] = float((f_index == r_index).float().mean())
    pb.p.grad = None
    return errors


def tolerances(dtype: torch.dtype) -> dict:
    from smog_kernels.parity import REL_TOL

    return {"loss": REL_TOL[dtype], "grad_p": REL_TOL[dtype], "step_loss": 10 * REL_TOL[dtype],
            "step_groups": 10 * REL_TOL[dtype]}


def run_config(n, k, d, dtype_name, device, methods, args, lightly_cls) -> list[dict]:
    dtype = DTYPES[dtype_name]
    pb = Problem(n, k, d, dtype, device)
    rows = []
    ref = reference_fns(pb)
    available = {}
    for name, module in methods:
        available[name] = fused_fns(pb, module, name)
        if device.type == "cuda":
            available[name]["step_graphed"] = graphed_step_fn(pb, name)
            available[name]["step_graph"] = None  # built (captured) when timed
    if not args.no_reference:
        available["reference"] = ref
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        available["torch_ce"] = torch_ce_fns(pb)
    if lightly_cls is not None:
        available["lightly"] = lightly_fns(pb, lightly_cls, with_step=k <= args.lightly_step_max_k)
    available["torch.mm"] = mm_fns(pb)

    checks = {}
    for name, module in methods:
        try:
            checks[name] = check_against_reference(pb, available[name], ref)
        except Exception as exc:  # noqa: BLE001
            checks[name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()

    for method, fns in available.items():
        for op in OPS:
            row = {"n": n, "k": k, "d": d, "dtype": dtype_name, "method": method, "op": op}
            if op not in fns and (op in STEP_OPS or method == "torch_ce" or op == "loss_fwdbwd_t1"):
                if op == "step" and method == "lightly":
                    row["skipped"] = "per-group Python loop, minutes at this K"
                    rows.append(row)
                continue
            if op not in fns:
                row["skipped"] = ("per-group Python loop, minutes at this K" if method == "lightly"
                                  else "no such product")
                rows.append(row)
                continue
            grads = [pb.p] if op in (*LOSS_GRAD_OPS, "step", "step_graphed") else None
            try:
                fn = fns[op]
                if op == "step_graph":
                    fn = graphed(fns["step"], [pb.p])  # replays write p.grad in place: no reset
                row["ms"] = timed(fn, device, args.reps, args.warmup_ms, args.rep_ms, grads)
                row["peak_extra_bytes"] = peak_extra_bytes(fn, device, grads)
            except torch.cuda.OutOfMemoryError as exc:
                row["skipped"] = f"out of memory: {str(exc).splitlines()[0]}"
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            pb.p.grad = None
            if "ms" in row:
                row["tflops"] = useful_flops(op, n, k, d) / (row["ms"] * 1e-3) / 1e12
            if method in checks:
                row["check"] = checks[method]
            rows.append(row)
    # rates relative to torch.mm (same products, same shapes) and speed-ups over the peers
    mm = {r["op"]: r for r in rows if r["method"] == "torch.mm" and "ms" in r}
    mm_rate_loss = mm["loss_fwdbwd"]["tflops"] if "loss_fwdbwd" in mm else None
    by = {(r["method"], r["op"]): r for r in rows}
    for r in rows:
        if "tflops" not in r:
            continue
        base = mm.get(r["op"], {}).get("tflops") if not r["op"].startswith("step") else mm_rate_loss
        if base:
            r["of_mm"] = r["tflops"] / base
        for peer in ("reference", "torch_ce", "lightly"):
            other = by.get((peer, "step" if r["op"] in STEP_OPS else r["op"]))
            if other and "ms" in other and r["method"] != peer:
                r[f"speedup_vs_{peer}"] = other["ms"] / r["ms"]
        if r.get("peak_extra_bytes") is not None:
            r["memory_bound_bytes"] = 2 * (n + k) * d * 4 + 64 * 2**20
    del pb, available, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'N':>6} {'K':>6} {'D':>4} {'dtype':>8} {'method':>10} {'op':>14} {'ms':>10} {'TFLOP/s':>8} " \
           f"{'of_mm':>6} {'xref':>7} {'xtorch_ce':>9} {'xlightly':>8} {'extraMiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "ms" not in r:
            why = r.get("skipped") or r.get("error", "")
            lines.append(f"{r['n']:>6} {r['k']:>6} {r['d']:>4} {r['dtype']:>8} {r['method']:>10} {r['op']:>14}  -- {why}")
            continue

        def fmt(key, spec):
            value = r.get(key)
            return format(value, spec) if value is not None else "-"

        mib = r.get("peak_extra_bytes")
        lines.append(
            f"{r['n']:>6} {r['k']:>6} {r['d']:>4} {r['dtype']:>8} {r['method']:>10} {r['op']:>14} "
            f"{r['ms']:>10.4f} {fmt('tflops', '8.1f'):>8} {fmt('of_mm', '6.2f'):>6} "
            f"{fmt('speedup_vs_reference', '7.1f'):>7} {fmt('speedup_vs_torch_ce', '9.2f'):>9} "
            f"{fmt('speedup_vs_lightly', '8.1f'):>8} "
            f"{(format(mib / 2**20, '9.1f') if mib is not None else '-'):>9}")
    return "\n".join(lines)


def targets_summary(rows: list[dict]) -> list[dict]:
    """The issue's targets, evaluated on what was measured (bfloat16, fused backends)."""
    out = []
    for r in rows:
        if r["dtype"] != "bfloat16" or r["method"] not in ("triton", "cuda") or "ms" not in r:
            continue
        shape = (r["n"], r["k"], r["d"])
        if shape == (4096, 3000, 128) and r["op"] in STEP_OPS:
            for peer, need in (("reference", 5.0), ("lightly", 100.0)):
                got = r.get(f"speedup_vs_{peer}")
                out.append({"target": f"{r['method']} {r['op']} {shape} >= {need}x {peer}", "value": got,
                            "met": None if got is None else got >= need})
        if shape in ((4096, 65536, 128), (32768, 65536, 256)) and r["op"] == "loss_fwdbwd":
            got = r.get("of_mm")
            out.append({"target": f"{r['method']} loss_fwdbwd {shape} >= 0.5 of torch.mm", "value": got,
                        "met": None if got is None else got >= 0.5})
            mem, bound = r.get("peak_extra_bytes"), r.get("memory_bound_bytes")
            out.append({"target": f"{r['method']} loss_fwdbwd {shape} peak extra < 2(N+K)D*4 + 64MB",
                        "value": mem, "met": None if mem is None else mem < bound})
    return out


PROFILED = (((4096, 3000, 128), "step"), ((4096, 65536, 128), "loss_fwdbwd"))


def host_profile(methods, device: torch.device, calls: int = 20) -> list[dict]:
    """Where an eager call's time goes, bfloat16, for the rows whose targets are host-bound: host
    milliseconds per call (the Python and launch work, measured until the last launch returns, then
    with the GPU drained), GPU kernels per call and their summed GPU time, and the ops taking the
    most host time (torch.profiler, CPU + CUDA activities)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out = []
    for (n, k, d), op in PROFILED:
        pb = Problem(n, k, d, torch.bfloat16, device)
        for name, module in methods:
            fn = fused_fns(pb, module, name)[op]
            try:
                for _ in range(3):
                    fn()
                    pb.p.grad = None
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                    pb.p.grad = None
                launched = time.perf_counter()
                torch.cuda.synchronize(device)
                drained = time.perf_counter()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls):
                        fn()
                        pb.p.grad = None
                    torch.cuda.synchronize(device)
                kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
                cpu_ops = sorted((e for e in prof.key_averages() if e.device_type == DeviceType.CPU),
                                 key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
                out.append({"n": n, "k": k, "d": d, "method": name, "op": op, "calls": calls,
                            "host_ms_per_call": (launched - start) * 1e3 / calls,
                            "wall_ms_per_call": (drained - start) * 1e3 / calls,
                            "gpu_kernels_per_call": len(kernels) / calls,
                            "gpu_kernel_ms_per_call": sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / calls,
                            "top_host_ops": [{"op": e.key, "calls_per_call": e.count / calls,
                                              "self_host_us_per_call": e.self_cpu_time_total / calls}
                                             for e in cpu_ops]})
            except Exception as exc:  # noqa: BLE001 (a diagnostic: never fail the benchmark)
                out.append({"n": n, "k": k, "d": d, "method": name, "op": op, "error": f"{type(exc).__name__}: {exc}"})
            pb.p.grad = None
        del pb
        torch.cuda.empty_cache()
    return out


def profile_table(entries: list[dict]) -> str:
    lines = []
    for e in entries:
        head = f"{e['method']} {e['op']} {(e['n'], e['k'], e['d'])} bfloat16: "
        if "error" in e:
            lines.append(head + e["error"])
            continue
        lines.append(head + f"host {e['host_ms_per_call']:.3f} ms/call, wall {e['wall_ms_per_call']:.3f}, "
                     f"{e['gpu_kernels_per_call']:.1f} kernels/call, GPU {e['gpu_kernel_ms_per_call']:.3f} ms/call")
        lines += [f"    {o['self_host_us_per_call']:8.1f} us  x{o['calls_per_call']:.1f}  {o['op']}" for o in e["top_host_ops"][:8]]
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes, correctness only (CPU interpreter ok)")
    parser.add_argument("--out", default=os.path.join("bench", "results"), help="output directory")
    parser.add_argument("--shapes", default=None, help="N,K,D;N,K,D;... instead of the defaults")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--backends", default="triton,cuda", help="fused backends to time, where available")
    parser.add_argument("--no-lightly", action="store_true")
    parser.add_argument("--no-reference", action="store_true", help="(checks still use the reference)")
    parser.add_argument("--lightly-step-max-k", type=int, default=4096,
                        help="time lightly's whole step only up to this K (its update loops over groups)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new configuration after this many seconds (the rest are listed as skipped)")
    parser.add_argument("--reps", type=int, default=5, help="CPU repetitions (GPU: --rep-ms)")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the host-time profile of the eager step and loss (GPU only, ~20 s)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench.gpu: no CUDA GPU; use --tiny (with TRITON_INTERPRET=1) for a CPU correctness run",
              file=sys.stderr)
        return 2
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            print("bench.gpu --tiny on CPU needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32, for every method alike

    env = environment(device)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    from smog_kernels import registry  # after TRITON_INTERPRET is settled: the backends read it

    methods, notes = [], []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            if name not in ("triton", "cuda"):
                raise ValueError(f"unknown GPU backend {name!r}")
            methods.append((name, registry.resolve(name, torch.empty(0, 1, device=device))))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"backend {name} skipped: {type(exc).__name__}: {exc}")
    lightly_cls, why = (None, "--no-lightly") if args.no_lightly else load_lightly()
    if lightly_cls is None:
        notes.append(f"lightly's SMoGPrototypes skipped: {why}")
    for note in notes:
        print("note: " + note)

    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s.strip()]
    else:
        shapes = TINY_SHAPES if args.tiny else SHAPES
    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu_{slug(env['device'])}{'_tiny' if args.tiny else ''}.json")
    result = {"environment": env, "notes": notes, "tiny": args.tiny, "temperature": TEMPERATURE, "beta": BETA,
              "rows": [], "failures": []}
    failed = False
    started = time.monotonic()
    for dtype_name in dtypes:  # bfloat16 (the targets) first
        for n, k, d in shapes:
            if args.budget_s is not None and time.monotonic() - started > args.budget_s:
                note = f"N={n} K={k} D={d} {dtype_name} skipped: time budget of {args.budget_s:.0f} s spent"
                print("note: " + note)
                result["notes"].append(note)
                continue
            print(f"-- N={n} K={k} D={d} {dtype_name} [{time.monotonic() - started:.0f}s]", flush=True)
            try:
                rows = run_config(n, k, d, dtype_name, device, methods, args, lightly_cls)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                result["failures"].append(f"{(n, k, d, dtype_name)}: {type(exc).__name__}: {exc}")
                failed = True
                continue
            result["rows"] += rows
            tol = tolerances(DTYPES[dtype_name])
            for r in rows:
                check = r.get("check")
                if r["op"] != "assign" or not check:
                    continue
                bad = [f"{key}={check[key]:.3g} > {limit:.3g}" for key, limit in tol.items()
                       if key in check and not check[key] <= limit]
                if "error" in check:
                    bad.append(check["error"])
                if bad:
                    failed = True
                    result["failures"].append(f"{r['method']} {(n, k, d, dtype_name)} vs reference: {', '.join(bad)}")
            result["targets"] = targets_summary(result["rows"])
            write_json(result, path)
    if cuda and methods and not args.no_profile and not args.tiny:
        print("-- host-time profile of eager calls", flush=True)
        result["host_profile"] = host_profile(methods, device)
        print(profile_table(result["host_profile"]))
    write_json(result, path)
    print(table(result["rows"]))
    for t in result.get("targets", []):
        print(f"target: {t['target']}: {t['value']} -> {'met' if t['met'] else ('not met' if t['met'] is False else 'n/a')}")
    for f in result["failures"]:
        print("FAILURE: " + f)
    print(f"wrote {path}")
    return 1 if failed or not methods else 0


if __name__ == "__main__":
    sys.exit(main())
