#!/usr/bin/env python3
"""Compile every Triton kernel of smog_kernels.triton, with the block configurations ops._config picks,
for an NVIDIA GPU architecture *without a GPU*, and report registers, spills and shared memory
from ptxas. Catches what the interpreter cannot: kernels that do not compile for the real target,
configurations that exceed shared memory, and register spills.

    tools/triton_aot_check.py [--cap 90] [--dtypes bf16,fp16,fp32] [--dims 128,256]
                              [--kernels assign,loss,group_grad,small] [--strict]

Integer arguments are declared as the JIT specialises them at run time: unit feature strides
(contiguous rows) become the constant 1, pointers, D and the other strides divisible by 16 (the
sizes in do_not_specialize stay plain integers). Exit
status 1 if a kernel fails to compile, or (--strict) spills registers. Run it with TRITON_INTERPRET
unset: the kernels must be real JIT functions.
"""
from __future__ import annotations

import argparse
import inspect
import time
import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/triton_aot_check.py: unset TRITON_INTERPRET (the kernels must be real JIT functions)")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from smog_kernels.triton import kernels as k  # noqa: E402
from smog_kernels.triton import ops  # noqa: E402

UNIT_STRIDES = ("stride_xd", "stride_cd", "stride_pd", "stride_sd", "stride_tn", "stride_i", "stride_n")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compile_for(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, cap: int):
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = dict(constexprs)
    for name in names:
        if name in UNIT_STRIDES:
            constexprs.setdefault(name, 1)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (signature[n].startswith("*") or n.startswith("stride") or n == "D")}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(compiled, cap: int) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return {"note": "no bundled ptxas"}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(compiled.asm["ptx"])
    arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
    try:
        out = subprocess.run([ptxas, "-v", f"-arch={arch}", fh.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(fh.name)
    text = out.stdout + out.stderr
    report = {"registers": None, "spill_bytes": 0}
    for line in text.splitlines():
        if "Used" in line and "registers" in line:
            report["registers"] = int(line.split("Used")[1].split("registers")[0])
        if "spill stores" in line:
            stores = int(line.split("bytes spill stores")[0].split(",")[-1].strip())
            loads = int(line.split("bytes spill loads")[0].split(",")[-1].strip())
            report["spill_bytes"] = stores + loads
    report["tensor_cores"] = "wgmma" if "wgmma" in compiled.asm["ptx"] else (
        "mma" if "mma.sync" in compiled.asm["ptx"] else "none")
    return report


def jobs(dtype: str, d: int, cap: int, kernels: list[str]):
    """(name, kernel, pointer types, constexprs, num_warps, num_stages) as ops would launch them."""
    tdt = TORCH_DTYPES[dtype]
    prec = "ieee" if dtype == "fp32" else "tf32"
    ptr = "*" + dtype
    bd = ops.block_d(d)
    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: (cap // 10, cap % 10)
    try:
        cfg = {kind: ops._config(kind, torch.device("cuda"), tdt, d) for kind in ("assign", "loss", "group_grad")}
    finally:
        torch.cuda.get_device_capability = real
    f32 = "*fp32"
    if "assign" in kernels:
        c = cfg["assign"]
        yield ("assign", k.assign_kernel,
               {"x_ptr": ptr, "c_ptr": ptr, "val_ptr": f32, "idx_ptr": "*i64", "sums_ptr": f32, "counts_ptr": "*i64"},
               dict(BM=c["BM"], BN=c["BN"], BD=bd, PRECISION=prec, UPCAST=False, STATS=True, EVEN_K=False),
               c["num_warps"], c["num_stages"])
    if "loss" in kernels:
        c = cfg["loss"]
        for final, even in ((True, True), (False, False)):
            yield (f"loss_fwd(FINAL={final},EVEN_K={even})", k.loss_fwd_kernel,
                   {"p_ptr": ptr, "c_ptr": ptr, "tgt_ptr": "*i64", "m_ptr": f32, "l_ptr": f32, "acc_ptr": f32,
                    "lse_ptr": f32, "att_ptr": f32, "tl_ptr": f32, "inv_t": "fp32", "scale2": "fp32"},
                   dict(BM=c["BM"], BN=c["BN"], BD=bd, PRECISION=prec, UPCAST=False, FINAL=final, EVEN_K=even),
                   c["num_warps"], c["num_stages"])
    if "group_grad" in kernels:
        c = cfg["group_grad"]
        yield ("group_grad", k.group_grad_kernel,
               {"p_ptr": ptr, "c_ptr": ptr, "lse_ptr": f32, "w_ptr": f32, "wmax_ptr": f32, "out_ptr": f32,
                "inv_t": "fp32"},
               dict(BM=c["BM"], BN=c["BN"], BD=bd, PRECISION=prec, UPCAST=False, NORMALIZE_W=dtype == "fp16",
                    SPLIT_PROB=dtype != "fp32"),
               c["num_warps"], c["num_stages"])
    if "small" in kernels:
        sbd = min(bd, 128)
        yield ("assign_merge", k.assign_merge_kernel,
               {"val_ptr": f32, "idx_ptr": "*i64", "score_ptr": f32, "index_ptr": "*i64", "x_ptr": ptr,
                "sums_ptr": f32, "counts_ptr": "*i64"}, dict(BM=64, BD=bd, STATS=True), 4, 3)
        yield ("stats_atomic", k.stats_atomic_kernel,
               {"x_ptr": ptr, "index_ptr": "*i64", "sums_ptr": f32, "counts_ptr": "*i64"},
               dict(BM=32, BD=sbd), 4, 3)
        yield ("stats_segmented", k.stats_segmented_kernel,
               {"x_ptr": ptr, "order_ptr": "*i64", "bounds_ptr": "*i64", "sums_ptr": f32, "counts_ptr": "*i64"},
               dict(BM=32, BD=sbd), 4, 3)
        yield ("momentum", k.momentum_kernel,
               {"c_ptr": ptr, "sums_ptr": f32, "counts_ptr": "*i64", "out_ptr": ptr, "beta": "fp32"},
               dict(BK=max(1, min(16, 8192 // bd)), BD=bd), 4, 3)
        yield ("loss_merge", k.loss_merge_kernel,
               {"m_ptr": f32, "l_ptr": f32, "acc_ptr": f32, "lse_ptr": f32, "att_ptr": f32, "inv_t": "fp32",
                "scale2": "fp32"},
               dict(BM=32, BD=bd), 4, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/triton_aot_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap", type=int, default=90, help="compute capability x10 (90 = Hopper, 80 = Ampere)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--dims", default="128,256")
    parser.add_argument("--kernels", default="assign,loss,group_grad,small")
    parser.add_argument("--strict", action="store_true", help="fail on register spills too")
    args = parser.parse_args(argv)
    kernels = args.kernels.split(",")
    failed = False
    for dtype in args.dtypes.split(","):
        for d in (int(v) for v in args.dims.split(",")):
            for name, fn, types, constexprs, warps, stages in jobs(dtype, d, args.cap, kernels):
                shown = {key: v for key, v in constexprs.items() if key in ("BM", "BN", "BK", "BD")}
                label = f"sm_{args.cap} {dtype} D={d} {name} {shown} warps={warps} stages={stages}"
                start = time.perf_counter()
                try:
                    compiled = compile_for(fn, types, constexprs, warps, stages, args.cap)
                except Exception as exc:  # noqa: BLE001
                    print(f"FAILED  {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
                    failed = True
                    continue
                report = ptxas_report(compiled, args.cap)
                spills = report.get("spill_bytes", 0)
                bad = args.strict and spills
                failed |= bool(bad)
                print(f"{'SPILLS' if spills else 'ok':7} {label}: compile {time.perf_counter() - start:.1f} s, "
                      f"shared={compiled.metadata.shared} "
                      + " ".join(f"{key}={v}" for key, v in report.items()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
