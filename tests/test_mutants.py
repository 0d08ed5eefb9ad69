"""The mutation-testing tools (docs/mutants.md): every kernel mutant's patch applies to the current sources
exactly once, a patch that does not fails loudly, and the check of docs/mutants.md's survivor entries
reports stale entries and survivors without an entry."""
from __future__ import annotations

import os

import pytest

from tools import kernel_mutants, python_mutants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFF = """--- smog/schedules.py
+++ smog/schedules.py
@@ -1,3 +1,3 @@
 def ema_rate(cfg, step, total_steps):
-    progress = min(1.0, step / max(1, total_steps))
+    progress = min(1.0, step / max(2, total_steps))
     return progress"""


@pytest.mark.parametrize("name", list(kernel_mutants.MUTANTS))
def test_every_kernel_mutant_changes_its_source_once(name):
    mutant = kernel_mutants.MUTANTS[name]
    with open(os.path.join(ROOT, mutant.path)) as f:
        text = f.read()
    mutated = kernel_mutants.patched(mutant, text)
    assert mutated != text and mutated.count(mutant.replace) == text.count(mutant.replace) + 1


def test_a_patch_whose_text_is_not_there_once_fails_loudly():
    mutant = kernel_mutants.MUTANTS["cpu-lane-tie"]
    for text in ("nothing to find", mutant.find + mutant.find):
        with pytest.raises(kernel_mutants.PatchError, match="must be once"):
            kernel_mutants.patched(mutant, text)


def test_a_key_is_the_function_and_the_changed_lines():
    name = "smog.schedules.x_ema_rate__mutmut_12"
    key = python_mutants.key_of(name, DIFF)
    assert key.startswith("smog.schedules.ema_rate:") and len(key.split(":")[1]) == 8
    moved = DIFF.replace("@@ -1,3 +1,3 @@", "@@ -40,3 +40,3 @@").replace(" def ema_rate", " def  ema_rate")
    assert python_mutants.key_of(name, moved) == key  # context and position do not count
    assert python_mutants.key_of(name, DIFF.replace("max(2,", "max(3,")) != key
    method = "smog_kernels.memory_bank.xǁMemoryBankǁ__init____mutmut_3"
    assert python_mutants.key_of(method, DIFF).startswith("smog_kernels.memory_bank.MemoryBank.__init__:")


def test_the_check_reports_stale_entries_and_survivors_without_one():
    survivor = {"name": "smog.schedules.x_ema_rate__mutmut_12", "status": "survived",
                "key": python_mutants.key_of("smog.schedules.x_ema_rate__mutmut_12", DIFF), "diff": DIFF}
    run = {"modules": ["smog.schedules"], "mutants": [survivor]}
    stale_key, elsewhere = "smog.schedules.learning_rate:0123abcd", "smog_kernels.kmeans.lloyd:0123abcd"
    assert python_mutants.check(run, {survivor["key"], elsewhere}) == ([], [])  # other modules: not judged
    assert python_mutants.check(run, {survivor["key"], stale_key}) == ([stale_key], [])
    assert python_mutants.check(run, {stale_key}) == ([stale_key], [survivor])


def test_every_entry_of_the_page_names_a_mutated_module():
    entries = python_mutants.doc_entries()
    assert entries
    assert {python_mutants.module_of(key) for key in entries} <= set(python_mutants.MODULES)


def test_the_mutmut_configuration_names_existing_modules_and_tests():
    config = python_mutants.config()
    for path in [*python_mutants.MODULES.values(), *(t.split("::")[0] for t in python_mutants.TESTS)]:
        assert os.path.exists(os.path.join(ROOT, path)), path
        assert f"    {path}" in config or path.startswith("tests/")
