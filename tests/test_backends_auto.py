"""backend="auto": the fixed rules, and a tuned table used only for its own device and kernels
(smog_kernels.auto, smog_kernels.registry.resolve).

CPU-only: GPU backends are stood in for by fake backends on a torch.device("cuda") that is never used
for tensors; resolve reads only the rows' device, dtype and shape, and the device's name.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

import smog_kernels as sk
from smog.benchmarks import tune
from smog_kernels import api, auto, registry, step
from smog_kernels.native import CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")
CARD = "Test Card 9000"


def table(device=CARD, kernel_hash=None) -> dict:
    """A tuned table whose figures disagree with the fixed rules (which put triton first for 16-bit)."""
    return {
        "format": auto.FORMAT, "device": device, "kernel_hash": kernel_hash or auto.kernel_hash(),
        "ops": {
            "assign": {"bfloat16": [
                {"shape": [4096, 3000, 128], "order": ["cuda", "triton"], "ms": {"cuda": 0.2, "triton": 0.3}},
                {"shape": [4096, 65536, 128], "order": ["triton", "cuda"], "ms": {"triton": 0.3, "cuda": 3.0}},
            ]},
            "step": {"float32": [{"shape": [4096, 3000, 128], "order": ["triton", "cuda"],
                                  "ms": {"triton": 1.0, "cuda": 2.0}}]},
        },
    }


def rows(n, d, dtype=torch.bfloat16, device=CUDA):
    """What resolve reads of a tensor, without allocating one on a GPU."""
    return SimpleNamespace(device=device, dtype=dtype, shape=(n, d))


def clear_caches():
    for cached in (registry._auto, registry._named, auto.tuned_table):
        if hasattr(cached, "cache_clear"):  # (not when a test has replaced it)
            cached.cache_clear()


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Fake GPU backends, a device called CARD and an empty cache folder; returns (the set of usable
    names, a function writing a table into the cache under a device name). Edit the set before the
    first choice: choices are cached, as usability is fixed for a process's life."""
    usable = {"reference", "cpu", "triton", "cuda"}
    fakes = {name: SimpleNamespace(name=name, capabilities=frozenset(), supports=lambda device: device.type == "cuda")
             for name in ("triton", "cuda")}
    monkeypatch.setenv("SMOG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(auto, "device_name", lambda device: CARD if device.type == "cuda" else "a cpu")
    monkeypatch.setattr(registry, "usable", lambda name: name in usable)
    real_get = registry.get
    monkeypatch.setattr(registry, "get", lambda name: fakes.get(name) or real_get(name))
    clear_caches()

    def write(content: dict, name: str = CARD) -> None:
        with open(auto.table_path(name), "w") as f:
            json.dump(content, f)
        clear_caches()

    yield usable, write
    clear_caches()


def choice(op, n, k, d, dtype=torch.bfloat16, device=CUDA):
    return registry.resolve("auto", rows(n, d, dtype, device), k, op).name


# ---- fixed rules ------------------------------------------------------------------------------------


def test_without_a_table_the_fixed_rules_decide(fake_gpu):
    assert choice("assign", 4096, 3000, 128) == "triton"  # 16-bit: triton first
    assert choice("assign", 4096, 3000, 128, torch.float16) == "triton"
    assert choice("step", 4096, 3000, 128, torch.float32) == "cuda"  # float32: cuda first
    assert choice("step", 4096, 3000, 128, device=torch.device("cpu")) == "cpu"


def test_the_rules_fall_back_to_the_next_usable_backend_then_the_reference(fake_gpu):
    usable, _ = fake_gpu
    usable.discard("triton")
    assert choice("assign", 4096, 3000, 128) == "cuda"
    usable.discard("cuda")
    clear_caches()
    assert choice("assign", 4096, 3000, 128) == "reference"


def test_rules_list_only_known_backends():
    for (device_type, width), names in auto.RULES.items():
        assert device_type in ("cpu", "cuda") and width in ("float32", auto.SIXTEEN_BIT)
        assert names and set(names) <= set(registry.NAMES) - {"reference"}


# ---- tuned tables -----------------------------------------------------------------------------------


def test_a_matching_table_picks_the_fastest_at_the_nearest_shape(fake_gpu):
    _, write = fake_gpu
    write(table())
    assert choice("assign", 4096, 3000, 128) == "cuda"
    assert choice("assign", 5000, 2500, 100) == "cuda"
    assert choice("assign", 1000, 40000, 128) == "triton"
    assert choice("step", 4096, 3000, 128, torch.float32) == "triton"
    assert choice("loss_fwd", 4096, 3000, 128) == "triton"  # op not in the table: the rule
    assert choice("assign", 4096, 3000, 128, torch.float16) == "triton"  # dtype not in the table: the rule


def test_a_table_of_another_device_or_other_kernels_is_ignored(fake_gpu):
    _, write = fake_gpu
    write(table(device="Another Card"))  # filed under this card's name, but measured on another
    assert choice("assign", 4096, 3000, 128) == "triton"
    write(table(kernel_hash="0" * 16))  # this card, other kernel sources
    assert choice("assign", 4096, 3000, 128) == "triton"
    write(table())  # both keys match: the table decides
    assert choice("assign", 4096, 3000, 128) == "cuda"


def test_a_table_choice_is_limited_to_usable_backends(fake_gpu):
    usable, write = fake_gpu
    usable.discard("cuda")
    write(table())
    assert choice("assign", 4096, 3000, 128) == "triton"


def test_cpu_tensors_never_read_a_table(fake_gpu, monkeypatch, generator):
    _, write = fake_gpu
    write({**table(device="a cpu"), "ops": {"assign": {"float32": [
        {"shape": [40, 5, 8], "order": ["reference"], "ms": {"reference": 0.1}}]}}}, name="a cpu")

    def no_reading(*args):
        raise AssertionError("auto read a table for CPU tensors")

    monkeypatch.setattr(auto, "tuned_table", no_reading)
    monkeypatch.setattr(auto, "fastest", no_reading)
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=1)
    sk.assign(x, x[:5])
    sk.grouping_step(x[:5], x.view(2, 20, 8), x, x.view(2, 20, 8).clone().requires_grad_(), 0.9, 0.1).loss.backward()
    assert choice("assign", 40, 5, 8, torch.float32, torch.device("cpu")) == "cpu"


def test_explicit_backends_ignore_tables_and_rules(fake_gpu):
    _, write = fake_gpu
    write(table())
    assert registry.resolve("triton", rows(4096, 128), 3000, "assign").name == "triton"
    with pytest.raises(ValueError, match="cannot run on tensors on cpu"):
        registry.resolve("cuda", rows(4096, 128, device=torch.device("cpu")), 3000, "assign")


def test_the_decision_is_cached_per_power_of_two_bucket(fake_gpu):
    choice("assign", 4096, 3000, 128)
    before = registry._auto.cache_info()
    choice("assign", 4000, 3100, 130)
    after = registry._auto.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


def test_the_kernel_hash_follows_the_sources(tmp_path, monkeypatch):
    (tmp_path / "kernels.py").write_text("x = 1\n")
    monkeypatch.setattr(auto, "_PACKAGE", str(tmp_path))
    auto.kernel_hash.cache_clear()
    first = auto.kernel_hash()
    (tmp_path / "kernels.py").write_text("x = 2\n")
    auto.kernel_hash.cache_clear()
    assert auto.kernel_hash() != first
    auto.kernel_hash.cache_clear()


# ---- smog bench tune writes what auto reads -----------------------------------------------------------


def test_tune_writes_a_table_auto_accepts_for_its_device(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOG_CACHE_DIR", str(tmp_path / "cache"))
    clear_caches()
    code = tune.main(["--device", "cpu", "--dtypes", "float32", "--shapes", "40,6,8", "--reps", "1",
                      "--backends", "cpu", "reference", "--out", str(tmp_path / "copy")])
    assert code == 0
    name = auto.device_name(torch.device("cpu"))
    written = auto.tuned_table(name)
    assert written is not None and written["device"] == name and written["kernel_hash"] == auto.kernel_hash()
    assert set(written["ops"]) == {"assign", "loss_fwd", "loss_fwdbwd", "step"}
    for entries in written["ops"].values():
        (entry,) = entries["float32"]
        assert entry["shape"] == [40, 6, 8] and sorted(entry["order"]) == ["cpu", "reference"]
        assert entry["ms"][entry["order"][0]] <= entry["ms"][entry["order"][1]]
    assert json.loads((tmp_path / "copy" / os.path.basename(auto.table_path(name))).read_text()) == written
    clear_caches()


def test_the_committed_h200_table_is_an_example_of_the_format():
    with open(os.path.join(ROOT, "bench", "results", "auto_nvidia_h200_example.json")) as f:
        example = json.load(f)
    assert example["format"] == auto.FORMAT and example["device"] == "NVIDIA H200"
    assert example["kernel_hash"] != auto.kernel_hash()  # measured on older kernels: never applied
    assert set(example["ops"]) <= set(auto.OPS)
    for dtypes in example["ops"].values():
        for entries in dtypes.values():
            for e in entries:
                assert sorted(e["order"]) == sorted(e["ms"]) and len(e["shape"]) == 3
                assert [e["ms"][n] for n in e["order"]] == sorted(e["ms"].values())


# ---- which op's figures the public functions consult ------------------------------------------------


@pytest.fixture
def recorded_ops(monkeypatch):
    """Public functions resolve on the CPU backend; returns the op names they asked resolve about."""
    asked = []

    def resolve(backend, x, num_groups=None, op=None):
        asked.append(op)
        return registry.resolve(backend, x)

    monkeypatch.setattr(api, "resolve", resolve)
    monkeypatch.setattr(step, "resolve", resolve)
    return asked


def test_public_functions_consult_their_ops_figures(recorded_ops, generator):
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=1)
    c, targets = x[:5], torch.zeros(40, dtype=torch.int64)
    sk.assign(x, c)
    sk.group_contrastive_loss(x.clone().requires_grad_(), c, targets, 0.1)
    with torch.no_grad():
        sk.group_contrastive_loss(x, c, targets, 0.1)
    sk.spherical_kmeans(x, 5, iters=1)
    sk.grouping_step(c, x.view(2, 20, 8), x, x.view(2, 20, 8), 0.9, 0.1)
    assert recorded_ops == ["assign", "loss_fwdbwd", "loss_fwd", "assign", "step"]


def test_loss_backward_runs_on_the_backend_of_its_forward(monkeypatch, generator):
    calls = []

    def recording(fn):
        return lambda *args: calls.append(fn.__name__) or fn(*args)

    chosen = SimpleNamespace(name="chosen", capabilities=frozenset(), loss_forward=recording(CPU.loss_forward),
                             loss_group_grad=recording(CPU.loss_group_grad))
    monkeypatch.setattr(api, "resolve", lambda *args: chosen)
    p = torch.nn.functional.normalize(torch.randn(30, 8, generator=generator), dim=1).requires_grad_()
    c = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=1).requires_grad_()
    sk.group_contrastive_loss(p, c, torch.zeros(30, dtype=torch.int64), 0.1, grad_groups=True).backward()
    assert calls == ["loss_forward", "loss_group_grad"]
