"""Hand-made kernel mutants (run by `tools/mutants kernels`): each planted bug is a source patch applied
to a scratch copy of the tree (the tree itself is never changed), built there where it is compiled,
and must fail at least one of the tests listed with it.

A patch is an exact find/replace in one file: the text to find must occur exactly once, or the mutant
fails loudly (the kernel changed under it: update the patch). Compiled kernels (csrc/) rebuild the
extension in the copy (CUDA ones need nvcc to build and a GPU to run); Triton kernels run under the
interpreter without a GPU.

    tools/mutants kernels [MUTANT...]           run the mutants this machine can run (default: all of them)
    tools/mutants kernels --check [MUTANT...]   only check that each patch applies (no build, no tests)
    tools/mutants kernels --build [MUTANT...]   apply and build in the copy (CUDA ones with nvcc, no GPU
                                                needed), no tests
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
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIES = "tests/test_assign_ties.py"
CPU_EMPTY = ["tests/test_kmeans.py", "tests/test_parity.py", "-k", "cpu and (momentum_update or segment_means)"]
CUDA_TIES = [TIES, "-k", "cuda"]
TRITON_TIES = [TIES, "-k", "triton"]
MICRO = "csrc/cpu/microkernels.cpp"
OPS_CPU = "csrc/cpu/ops_cpu.cpp"
ASSIGN_CU = "csrc/cuda/assign.cu"
TRITON = "smog_kernels/triton/kernels.py"


@dataclass(frozen=True)
class Mutant:
    bug: str
    path: str  # the file patched, relative to the tree
    find: str  # must occur exactly once in it
    replace: str
    tests: list[str]  # pytest arguments: at least one selected test must fail

    @property
    def kind(self) -> str:
        """"cpu" or "cuda" (compiled into the extension) or "triton" (Python, interpreted here)."""
        return "triton" if self.path.endswith(".py") else "cuda" if self.path.endswith(".cu") else "cpu"


MUTANTS = {
    "cpu-portable-tie": Mutant(
        "portable running argmax: a tie moves it (> becomes >=)", MICRO,
        "      if (acc[r][j] > best[r * kNR + j]) {\n", "      if (acc[r][j] >= best[r * kNR + j]) {\n",
        [TIES, "-k", "cpu_ties_other_micro_kernels and portable"]),
    "cpu-avx2-tie": Mutant(
        "AVX2 running argmax: _CMP_GT_OQ becomes _CMP_GE_OQ", MICRO,
        "_mm256_cmp_ps(acc[r], old, _CMP_GT_OQ)", "_mm256_cmp_ps(acc[r], old, _CMP_GE_OQ)",
        [TIES, "-k", "cpu_ties_other_micro_kernels and avx2"]),
    "cpu-avx512-tie": Mutant(
        "AVX-512 running argmax: _CMP_GT_OQ becomes _CMP_GE_OQ", MICRO,
        "acc0[r], best0, _CMP_GT_OQ);\n    const __mmask16 g1 = _mm512_mask_cmp_ps_mask(m1, acc1[r], best1, _CMP_GT_OQ);",
        "acc0[r], best0, _CMP_GE_OQ);\n    const __mmask16 g1 = _mm512_mask_cmp_ps_mask(m1, acc1[r], best1, _CMP_GE_OQ);",
        [TIES, "-k", "test_cpu_ties"]),
    "cpu-lane-tie": Mutant(
        "lane reduction (the merge of the 32 lanes): a tie keeps the larger index", OPS_CPU,
        "(b[j] == top && a[j] < top_index)", "(b[j] == top && a[j] > top_index)",
        [TIES, "-k", "test_cpu_ties"]),
    "cpu-empty-group": Mutant(
        "momentum_update: a group with no member is moved (<= 0 becomes < 0)", OPS_CPU,
        "      if (counts[g] <= 0) {\n", "      if (counts[g] < 0) {\n", CPU_EMPTY),
    "cuda-column-tie": Mutant(
        "a thread's 16-column scan: > becomes >=", ASSIGN_CU,
        "if (k0 + col < K && s > v) {", "if (k0 + col < K && s >= v) {", CUDA_TIES),
    "cuda-shuffle-tie": Mutant(
        "the 4-thread shuffle combine: a tie takes the larger index", ASSIGN_CU,
        "(ov == v && ok < vk)", "(ov == v && ok > vk)", CUDA_TIES),
    "cuda-tile-tie": Mutant(
        "running best over the tiles of a split: > becomes >=", ASSIGN_CU,
        "    if (v > best) {\n      best = v;\n      best_k = vk;\n",
        "    if (v >= best) {\n      best = v;\n      best_k = vk;\n", CUDA_TIES),
    "cuda-merge-tie": Mutant(
        "split-K merge: > becomes >= (a later split wins a tie)", ASSIGN_CU,
        "    if (v > best) {\n      best = v;\n      best_k = part_index[s * N + row];\n",
        "    if (v >= best) {\n      best = v;\n      best_k = part_index[s * N + row];\n",
        [TIES, "tests/test_cuda_backend.py", "-k", "cuda_ties or ties_across_split"]),
    "cuda-merge-order": Mutant(
        "split-K merge in decreasing split order (the last split wins a tie)", ASSIGN_CU,
        "  float best = part_score[row];\n  int64_t best_k = part_index[row];\n"
        "  for (int64_t s = 1; s < splits; ++s) {\n",
        "  float best = part_score[(splits - 1) * N + row];\n  int64_t best_k = part_index[(splits - 1) * N + row];\n"
        "  for (int64_t s = splits - 2; s >= 0; --s) {\n", CUDA_TIES),
    "cuda-empty-group": Mutant(
        "momentum_update: a group with no member is moved", "csrc/cuda/stats.cu",
        "  if (n <= 0) {\n", "  if (n < 0) {\n", ["tests/test_parity.py", "-k", "cuda and momentum_update"]),
    "triton-tile-tie": Mutant(
        "inside a tile the largest maximal column wins", TRITON,
        "am = tl.min(tl.where(s == m[:, None], cols[None, :], 2147483647), 1)",
        "am = tl.max(tl.where(s == m[:, None], cols[None, :], -1), 1)", TRITON_TIES),
    "triton-running-tie": Mutant(
        "the running best over tiles moves on a tie", TRITON,
        "        better = m > best\n", "        better = m >= best\n", TRITON_TIES),
    "triton-merge-tie": Mutant(
        "split-K merge: a later split wins a tie", TRITON,
        "        better = v > best\n", "        better = v >= best\n", TRITON_TIES),
    "triton-merge-order": Mutant(
        "split-K merge in decreasing split order", TRITON,
        "    for s in range(0, SPLIT):\n        v = tl.load(val_ptr + s * N + rows",
        "    for s in range(SPLIT - 1, -1, -1):\n        v = tl.load(val_ptr + s * N + rows", TRITON_TIES),
}


class PatchError(RuntimeError):
    """A mutant's text to find is not in its file exactly once."""


def patched(mutant: Mutant, text: str) -> str:
    """`text` with the mutant's one find/replace applied; PatchError unless `find` occurs exactly once."""
    count = text.count(mutant.find)
    if count != 1:
        raise PatchError(f"{mutant.path}: the text to mutate occurs {count} times (must be once): {mutant.find!r}")
    return text.replace(mutant.find, mutant.replace)


def apply(mutant: Mutant, tree: str) -> None:
    path = os.path.join(tree, mutant.path)
    with open(path) as f:
        text = patched(mutant, f.read())
    with open(path, "w") as f:
        f.write(text)


def scratch_copy() -> str:
    """The tracked and untracked (not ignored) files of the tree, in a temporary directory."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    dest = tempfile.mkdtemp(prefix="smog-mutant-")
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    return dest


def build(mutant: Mutant, tree: str) -> tuple[bool, str]:
    """Build the extension in `tree` (with the CUDA part for a CUDA mutant: nvcc must be found)."""
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2"),
           "SMOG_BUILD_CUDA": "1" if mutant.kind == "cuda" else "0"}
    if mutant.kind == "cuda" and "SMOG_CUDA_ARCH" not in env:
        env["SMOG_CUDA_ARCH"] = "-gencode=arch=compute_90,code=sm_90"  # one architecture: a quicker build
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return False, "build failed: " + (proc.stdout + proc.stderr)[-3000:]
    return True, "built"


def pytest(tree: str, args: list[str]) -> tuple[int, str]:
    """(pytest's exit status, its last line) for the tests `args` of `tree`."""
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args], cwd=tree,
                          env=env, capture_output=True, text=True)
    return proc.returncode, (proc.stdout.strip().splitlines() or ["(no output)"])[-1]


def pytest_fails(tree: str, args: list[str]) -> tuple[bool, str]:
    rc, last = pytest(tree, args)
    return rc == 1, last  # 1: tests failed (not 2-5: usage, collection or internal errors)


def run(name: str, build_only: bool) -> tuple[bool, str]:
    """(killed, or built with --build; what happened) for one mutant in a fresh scratch copy."""
    mutant = MUTANTS[name]
    tree = scratch_copy()
    try:
        apply(mutant, tree)
        if mutant.kind == "triton":
            if build_only:
                return True, "patched (nothing to build)"
            for built in glob.glob(os.path.join(ROOT, "smog_kernels", "_C*.so")):  # the tree's own build
                shutil.copy2(built, os.path.join(tree, "smog_kernels"))
        else:
            built, detail = build(mutant, tree)
            if not built or build_only:
                return built, detail
        return pytest_fails(tree, mutant.tests)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/mutants kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mutants", nargs="*", help=f"default: all ({', '.join(MUTANTS)})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only check that each patch applies")
    mode.add_argument("--build", action="store_true", help="apply and build, run no tests")
    args = parser.parse_args(argv)
    unknown = [n for n in args.mutants if n not in MUTANTS]
    if unknown:
        parser.error(f"unknown mutants {unknown}; choose from {', '.join(MUTANTS)}")
    names = args.mutants or list(MUTANTS)
    failed = []
    for name in names:  # every patch must apply before anything is built
        mutant = MUTANTS[name]
        try:
            with open(os.path.join(ROOT, mutant.path)) as f:
                patched(mutant, f.read())
        except PatchError as e:
            print(f"{name}: PATCH DOES NOT APPLY: {e}", flush=True)
            failed.append(name)
    if args.check or failed:
        if not failed:
            print(f"all {len(names)} patches apply: {', '.join(names)}")
        return 1 if failed else 0
    runnable = [n for n in names if args.build or MUTANTS[n].kind != "cuda" or gpu_available()]
    for name in names:
        if name not in runnable:
            print(f"{name}: needs a GPU, not run (the patch applies; --build compiles it)", flush=True)
    if not args.build:  # the control: unmutated, every selection passes (a kill then means the bug was seen)
        for tests in {tuple(MUTANTS[n].tests) for n in runnable}:
            rc, last = pytest(ROOT, list(tests))
            if rc != 0:
                print(f"the unmutated tree fails {' '.join(tests)} ({last}): no mutant run", flush=True)
                return 1
    for name in runnable:
        start = time.time()
        ok, detail = run(name, args.build)
        verdict = ("built" if ok else "BUILD FAILED") if args.build else ("killed" if ok else "SURVIVED")
        print(f"{name}: {verdict} in {time.time() - start:.0f} s ({detail})", flush=True)
        if not ok:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
