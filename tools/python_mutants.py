"""mutmut (3.8) over the modules whose logic decides training results, and the check of the survivor
entries of docs/mutants.md against a run's survivors (`tools/mutants python | keys | check | results`).

Everything happens in a scratch folder (MUTANTS_DIR, default ./mutants/, git-ignored), never in the
tree: tree/ holds a copy of the tracked and untracked (not ignored) files and the built extension, with
the mutmut configuration below written there as setup.cfg; mutmut keeps its mutants and verdicts in
tree/mutants/ (it re-tests a function's mutants when the function changes); survivors.json is the
last run's survivors.

A survivor's key is `module.function:hash`, the hash (8 hex digits of SHA-1) taken over the lines the
mutant removes and adds (stripped), so the key outlives unrelated edits and changes when the mutated
code does. docs/mutants.md gives the reason for each survivor under its key; `check` reports entries
whose key is no survivor of the modules the run covered (stale) and survivors with no entry.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "mutants.md"
MODULES = {  # mutmut's dotted name: the file
    "smog.schedules": "smog/schedules.py",
    "smog.budget": "smog/budget.py",
    "smog.health": "smog/health.py",
    "smog.networks": "smog/networks.py",
    "smog.method": "smog/method.py",
    "smog_kernels.kmeans": "smog_kernels/kmeans.py",
    "smog_kernels.reference": "smog_kernels/reference.py",
    "smog_kernels.memory_bank": "smog_kernels/memory_bank.py",
    "smog_kernels.step": "smog_kernels/step.py",
    "smog_kernels.grouping": "smog_kernels/grouping.py",
}
# The fast CPU tests that check these modules against values derived by hand or from the reference.
# The Triton interpreter's parametrisations are left out (slow; the CPU backend's copies of the same
# tests decide) except the parity grouping step's (Triton is the only backend here with a fused first
# pass). Left out as well: tests whose processes are spawned (the multi-process memory-bank test, whose
# ranks are `smog train` processes, and the module's DDP test: mutmut maps no test to a function run only
# in another process), and the two budgeted training runs of test_budget.py (each runs the whole stack
# for a fixed time, on every survivor of every module; the Clock and Budget unit tests check smog.budget),
# and the torch.compile trace of the module (dynamo breaks the graph at mutmut's trampolines).
TESTS = [
    "tests/test_schedules.py",
    "tests/test_budget.py",
    "tests/test_health.py",
    "tests/test_networks.py",
    "tests/test_kmeans.py",
    "tests/test_assign_ties.py",
    "tests/test_reference.py",
    "tests/test_memory_bank.py",
    "tests/test_crop_batches.py",
    "tests/test_validation.py",
    "tests/test_method.py",
    "tests/test_accumulate.py",
    "tests/test_crop_roles.py",
    "tests/test_step.py",
    "tests/test_grouping.py",
    "tests/test_parity.py::test_grouping_step_matches_reference",
    "tests/test_backends_auto.py::test_public_functions_consult_their_ops_figures",
    "tests/test_backbones.py::test_swin_update_rows_come_from_a_forward_without_drop_path",
]
SELECT = ("((not interpreter and not triton) or (grouping_step and interpreter)) and not each_reclustering "
          "and not under_ddp and not budgeted_run and not torch_compile")
KEY = re.compile(r"`((?:smog|smog_kernels)\.[\w.]+:[0-9a-f]{8})`")


def config() -> str:
    """mutmut's configuration (setup.cfg in the scratch tree). The same for every run: mutmut forgets its
    verdicts when the test selection changes."""
    lines = ["[mutmut]", "source_paths =", "    smog", "    smog_kernels", "also_copy =", "    csrc",
             "only_mutate ="]
    lines += [f"    {path}" for path in MODULES.values()]
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -q", "    -k", f"    {SELECT}",
              "pytest_add_cli_args_test_selection ="]
    lines += [f"    {test}" for test in TESTS]
    return "\n".join(lines) + "\n"


def scratch() -> Path:
    return Path(os.environ.get("MUTANTS_DIR", ROOT / "mutants")).resolve()


def sync(tree: Path) -> None:
    """Make `tree` a copy of the working tree (tracked and untracked files, the built extension) plus
    setup.cfg; files gone from the working tree go from the copy; mutmut's own folder stays, less the
    non-Python files it copied (it would not refresh them)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    files = {f for f in listed if (ROOT / f).is_file()}
    files |= {str(p.relative_to(ROOT)) for p in (ROOT / "smog_kernels").glob("_C*.so")}
    tree.mkdir(parents=True, exist_ok=True)
    for path in tree.rglob("*"):
        rel = path.relative_to(tree)
        if rel.parts[0] != "mutants" and path.is_file() and str(rel) not in files and str(rel) != "setup.cfg":
            path.unlink()
    for f in sorted(files):
        source, dest = ROOT / f, tree / f
        if not dest.exists() or dest.stat().st_mtime_ns != source.stat().st_mtime_ns:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)  # the same mtime: mutmut regenerates a module's mutants when it changes
    (tree / "setup.cfg").write_text(config())
    for top in ("smog", "smog_kernels"):
        for path in (tree / "mutants" / top).rglob("*"):
            if path.is_file() and path.suffix not in (".py", ".meta"):
                path.unlink()


def environment() -> dict[str, str]:
    """This process's environment with the working tree off PYTHONPATH: the tests import the mutants."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != ROOT and Path(p).resolve() != scratch() / "tree"]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(keep)}


def mutmut(tree: Path, args: list[str], log: Path | None = None) -> int:
    cmd = [sys.executable, "-m", "mutmut", *args]
    if log is None:
        return subprocess.run(cmd, cwd=tree, env=environment()).returncode
    with open(log, "w") as out:
        return subprocess.run(cmd, cwd=tree, env=environment(), stdout=out, stderr=subprocess.STDOUT).returncode


def function_of(name: str) -> str:
    """`module.function` (`module.Class.method`) of a mutmut mutant name."""
    mangled = name.partition("__mutmut_")[0]
    module, _, function = mangled.rpartition(".")
    if "ǁ" in function:  # mutmut's x<sep>Class<sep>method
        _, cls, method = function.split("ǁ")
        return f"{module}.{cls}.{method}"
    return f"{module}.{function.removeprefix('x_')}"


def key_of(name: str, diff: str) -> str:
    changed = [line[1:].strip() for line in diff.splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return f"{function_of(name)}:{hashlib.sha1(chr(10).join(changed).encode()).hexdigest()[:8]}"


def generate(tree: Path) -> None:
    """mutmut's first step alone (copy the sources, write every mutant), in this process, inside `tree`."""
    os.chdir(tree)
    from mutmut.__main__ import create_mutants
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir

    os.makedirs("mutants", exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # mutmut prints every file it copies
        copy_src_dir()
        copy_also_copy_files()
        create_mutants(2)


def mutants(tree: Path, modules: list[str]) -> list[dict]:
    """The mutants of `modules` mutmut has generated in `tree`: [{"name", "status", "key", "diff"}]. Runs in this process, inside `tree` (mutmut reads its
    configuration from the working directory)."""
    os.chdir(tree)
    import libcst as cst
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import (
        read_mutant_function,
        read_mutants_module,
        read_original_function,
    )
    from mutmut.stats import status_by_exit_code

    found = []
    for module in modules:
        path = MODULES[module]
        data = SourceFileMutationData(path=Path(path))
        data.load()
        parsed = read_mutants_module(path)  # once per module (mutmut's `show` parses it once per mutant)
        originals: dict[str, list[str]] = {}
        for name, code in sorted(data.exit_code_by_key.items()):
            function = name.partition("__mutmut_")[0]
            if function not in originals:
                originals[function] = cst.Module([read_original_function(parsed, name)]).code.strip().split("\n")
            mutated = cst.Module([read_mutant_function(parsed, name)]).code.strip().split("\n")
            diff = "\n".join(difflib.unified_diff(originals[function], mutated, fromfile=path, tofile=path, lineterm=""))
            found.append({"name": name, "status": status_by_exit_code[code], "key": key_of(name, diff), "diff": diff})
    return found


def doc_entries(doc: Path = DOC) -> set[str]:
    """The survivor keys docs/mutants.md gives a reason for."""
    return set(KEY.findall(doc.read_text()))


def module_of(key: str) -> str:
    return next(m for m in sorted(MODULES, key=len, reverse=True) if key.startswith(m + "."))


def check(survivors: dict, entries: set[str]) -> tuple[list[str], list[dict]]:
    """(stale entries: keys of the run's modules that no survivor has, survivors without an entry)."""
    keys = {m["key"] for m in survivors["mutants"]}
    stale = sorted(k for k in entries if module_of(k) in survivors["modules"] and k not in keys)
    missing = [m for m in survivors["mutants"] if m["key"] not in entries]
    return stale, missing


def report(stale: list[str], missing: list[dict]) -> int:
    for key in stale:
        print(f"stale entry in docs/mutants.md (no such survivor): {key}")
    for m in missing:
        print(f"survivor without an entry in docs/mutants.md: {m['key']} ({m['name']}, {m['status']})\n{m['diff']}\n")
    if not stale and not missing:
        print("docs/mutants.md gives a reason for every survivor, and every entry of these modules is one")
    return 1 if stale or missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/mutants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("python", help="mutmut over MODULES (default all), one after another, timed; "
                                        "the survivors to --out, then the check")
    keys = sub.add_parser("keys", help="generate the mutants of MODULES (no tests run) and print every key and diff")
    for p in (run, keys):
        p.add_argument("modules", nargs="*", metavar="MODULE", help=f"mutmut's dotted name: {', '.join(MODULES)}")
    run.add_argument("--out", type=Path, default=None, help="survivors JSON (default MUTANTS_DIR/survivors.json)")
    run.add_argument("--workers", type=int, default=int(os.environ.get("MUTANTS_WORKERS", "2")))
    chk = sub.add_parser("check", help="docs/mutants.md's entries against the survivors of a run")
    chk.add_argument("survivors", type=Path, nargs="?", default=None, help="default MUTANTS_DIR/survivors.json")
    sub.add_parser("results", help="mutmut's verdicts of the last run")
    args = parser.parse_args(argv)
    tree = scratch() / "tree"
    if args.command == "check":
        path = args.survivors or scratch() / "survivors.json"
        return report(*check(json.loads(path.read_text()), doc_entries()))
    if args.command == "results":
        return mutmut(tree, ["results"])
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown modules {unknown}; choose from {', '.join(MODULES)}")
    modules = args.modules or list(MODULES)
    sync(tree)
    if args.command == "keys":
        generate(tree)
        for m in mutants(tree, modules):
            print(f"{m['key']} {m['name']} ({m['status']})\n{m['diff']}\n")
        return 0
    for module in modules:
        start = time.time()
        log = scratch() / f"{module}.log"
        rc = mutmut(tree, ["run", "--max-children", str(args.workers), f"{module}.*"], log)
        print(f"{module}: mutmut exit {rc} in {time.time() - start:.0f} s (log: {log})", flush=True)
        if rc != 0:
            print(log.read_text()[-3000:], file=sys.stderr)
            return 1
    found = mutants(tree, modules)
    unchecked = [m["name"] for m in found if m["status"] == "not checked"]
    if unchecked:
        print(f"{len(unchecked)} mutants were not checked (the run stopped early?): {unchecked[:5]}", file=sys.stderr)
        return 1
    survivors = {"modules": modules, "mutants": [m for m in found if m["status"] != "killed"]}
    out = args.out or scratch() / "survivors.json"
    out.write_text(json.dumps(survivors, indent=1))
    print(f"{len(found)} mutants, {len(survivors['mutants'])} not killed: written to {out}")
    return report(*check(survivors, doc_entries()))


if __name__ == "__main__":
    sys.exit(main())
