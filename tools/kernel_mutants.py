"""Hand-made kernel mutants (run by `tools/mutants kernels`): each planted bug is built or applied in a
scratch copy of the tree and must fail at least one of the tests listed with it.

Compiled kernels: the SMOG_MUTANT ids of csrc/mutants.h, passed to setup.py (the CPU part rebuilds in
the copy; CUDA ones need a GPU and nvcc). Triton kernels: a textual change of
smog_kernels/triton/kernels.py, run under the interpreter without a GPU.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIES = "tests/test_assign_ties.py"
CPU_EMPTY = ["tests/test_kmeans.py", "tests/test_parity.py", "-k", "cpu and (momentum_update or segment_means)"]

# name: (SMOG_MUTANT id, needs a GPU, pytest arguments that must fail)
COMPILED = {
    "cpu-portable-tie": (1, False, [TIES, "-k", "cpu_ties_other_micro_kernels and portable"]),
    "cpu-avx2-tie": (2, False, [TIES, "-k", "cpu_ties_other_micro_kernels and avx2"]),
    "cpu-avx512-tie": (3, False, [TIES, "-k", "test_cpu_ties"]),
    "cpu-lane-tie": (4, False, [TIES, "-k", "test_cpu_ties"]),
    "cpu-empty-group": (5, False, CPU_EMPTY),
    "cuda-column-tie": (11, True, [TIES, "-k", "cuda"]),
    "cuda-shuffle-tie": (12, True, [TIES, "-k", "cuda"]),
    "cuda-tile-tie": (13, True, [TIES, "-k", "cuda"]),
    "cuda-merge-tie": (14, True, [TIES, "tests/test_cuda_backend.py", "-k", "cuda_ties or ties_across_split"]),
    "cuda-merge-order": (15, True, [TIES, "-k", "cuda"]),
    "cuda-empty-group": (16, True, ["tests/test_parity.py", "-k", "cuda and momentum_update"]),
}

KERNELS = "smog_kernels/triton/kernels.py"
# name: (old text, new text) in smog_kernels/triton/kernels.py
TRITON = {
    "triton-tile-tie": ("am = tl.min(tl.where(s == m[:, None], cols[None, :], 2147483647), 1)",
                        "am = tl.max(tl.where(s == m[:, None], cols[None, :], -1), 1)"),
    "triton-running-tie": ("        better = m > best\n", "        better = m >= best\n"),
    "triton-merge-tie": ("        better = v > best\n", "        better = v >= best\n"),
    "triton-merge-order": ("    for s in range(0, SPLIT):\n        v = tl.load(val_ptr + s * N + rows",
                           "    for s in range(SPLIT - 1, -1, -1):\n        v = tl.load(val_ptr + s * N + rows"),
}
TRITON_TESTS = [TIES, "-k", "triton"]


def scratch_copy() -> str:
    """The tracked and untracked (not ignored) files of the tree, in a temporary directory."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    dest = tempfile.mkdtemp(prefix="smog-mutant-")
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    return dest


def pytest_fails(tree: str, args: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args], cwd=tree,
                          env=env, capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return proc.returncode == 1, last  # 1: tests failed (not 2-5: usage, collection or internal errors)


def run_compiled(name: str, tree: str) -> tuple[bool, str]:
    ident, _, args = COMPILED[name]
    env = {**os.environ, "SMOG_MUTANT": str(ident), "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    if not torch.cuda.is_available():
        env["SMOG_BUILD_CUDA"] = "0"
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                           capture_output=True, text=True)
    if build.returncode != 0:
        return False, "build failed: " + build.stderr[-2000:]
    return pytest_fails(tree, args)


def run_triton(name: str, tree: str) -> tuple[bool, str]:
    for built in glob.glob(os.path.join(ROOT, "smog_kernels", "_C*.so")):  # the tree's own build, unchanged
        shutil.copy2(built, os.path.join(tree, "smog_kernels"))
    old, new = TRITON[name]
    path = os.path.join(tree, KERNELS)
    with open(path) as f:
        text = f.read()
    if text.count(old) != 1:
        return False, f"the text to mutate is not in {KERNELS} once: {old!r}"
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    return pytest_fails(tree, TRITON_TESTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mutants", nargs="*", help=f"default: all that run here ({', '.join([*COMPILED, *TRITON])})")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    names = args.mutants or [n for n in COMPILED if gpu or not COMPILED[n][1]] + list(TRITON)
    survived = []
    for name in names:
        if name in COMPILED and COMPILED[name][1] and not gpu:
            print(f"{name}: needs a GPU (SMOG_MUTANT={COMPILED[name][0]}), not run")
            continue
        start = time.time()
        tree = scratch_copy()
        try:
            killed, detail = (run_compiled if name in COMPILED else run_triton)(name, tree)
        finally:
            shutil.rmtree(tree, ignore_errors=True)
        print(f"{name}: {'killed' if killed else 'SURVIVED'} in {time.time() - start:.0f} s ({detail})", flush=True)
        if not killed:
            survived.append(name)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
