"""What the wheel holds and what importing it loads: the ops, the trainer, `smog check` and the kernel
microbenchmarks; no development benchmark, peer re-implementation or tool."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_BENCHMARKS = {"__init__.py", "kernels.py", "tune.py"}  # what `smog bench` runs; the GPU harness is bench/gpu.py


def _setup_packages() -> list[str]:
    """The packages setup.py ships: its find_packages(include=[...]) call, read without running setup()."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    (call,) = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
               and getattr(node.func, "id", None) == "find_packages"]
    (include,) = [kw.value for kw in call.keywords if kw.arg == "include"]
    return find_packages(where=ROOT, include=ast.literal_eval(include))


def test_the_wheel_ships_the_library_and_only_the_user_facing_benchmarks():
    packages = set(_setup_packages())
    assert {"smog", "smog.benchmarks", "smog_kernels", "smog_kernels.triton"} <= packages
    assert not {p for p in packages if p.split(".")[0] not in ("smog", "smog_kernels")}, packages
    modules = {n for n in os.listdir(os.path.join(ROOT, "smog", "benchmarks")) if n.endswith(".py")}
    assert modules == USER_BENCHMARKS
    shipped = [os.path.relpath(os.path.join(folder, name), ROOT) for package in packages
               for folder in [os.path.join(ROOT, *package.split("."))] for name in os.listdir(folder)]
    assert not [path for path in shipped if os.path.basename(path) in ("gpu.py", "aot_check.py")], shipped


def test_importing_the_packages_loads_no_benchmark_lightly_or_tool_code():
    code = ("import json, sys; import smog, smog_kernels, smog.cli, smog.commands.check, smog.method; "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    unwanted = [m for m in loaded if m.split(".")[0] in ("bench", "tools", "lightly", "faiss")
                or m.startswith("smog.benchmarks") or "aot_check" in m]
    assert not unwanted, unwanted
    assert "smog_kernels.registry" in loaded  # (the check itself sees the modules)


def test_the_product_holds_no_mutation_switch():
    """Mutation testing patches a scratch copy (tools/kernel_mutants.py, tools/python_mutants.py): no switch
    in the kernels or the build, and no mutmut configuration at the root."""
    sources = [os.path.join(ROOT, "setup.py")] + [os.path.join(folder, name) for folder, _, names in
                                                  os.walk(os.path.join(ROOT, "csrc")) for name in names]
    switched = []
    for path in sources:
        with open(path) as f:
            switched += [path] if "SMOG_MUTANT" in f.read() else []
    assert not switched, switched
    assert not os.path.exists(os.path.join(ROOT, "setup.cfg"))
