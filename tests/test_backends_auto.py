"""backend="auto" by measured figures (smog_kernels.backend_timings, _backends.resolve_for).

CPU-only: GPU backends are stood in for by fake modules on a torch.device("cuda") that is never used
for tensors; resolve_for reads only the rows' device, dtype and shape.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

import smog_kernels as sk
from smog_kernels import _backends, api, backend_timings, native, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")

TABLE = {
    "card": "test card",
    "ops": {
        "assign": {
            "bfloat16": [
                {"shape": [4096, 3000, 128], "order": ["reference", "cuda", "triton"],
                 "ms": {"reference": 0.1, "cuda": 0.2, "triton": 0.3}},
                {"shape": [4096, 65536, 128], "order": ["triton", "cuda"], "ms": {"triton": 0.3, "cuda": 3.0}},
            ],
        },
        "step": {
            "float32": [{"shape": [4096, 3000, 128], "order": ["cuda", "triton"], "ms": {"cuda": 1.0, "triton": 2.0}}],
            "bfloat16": [{"shape": [4096, 3000, 128], "order": ["cuda", "triton"], "ms": {"cuda": 1.1, "triton": 1.8}}],
        },
        "step_graph": {
            "bfloat16": [{"shape": [4096, 3000, 128], "order": ["triton", "cuda"], "ms": {"triton": 0.1, "cuda": 0.8}}],
        },
    },
}


def rows(n, d, dtype=torch.bfloat16, device=CUDA):
    """What resolve_for reads of a tensor, without allocating one on a GPU."""
    return SimpleNamespace(device=device, dtype=dtype, shape=(n, d))


@pytest.fixture
def fake_gpu(monkeypatch):
    """The test table, and fake GPU backends; returns the set of usable names (edit it before the
    first choice to disable one: choices are cached, as usability is fixed for a process's life)."""
    usable = {"reference", "cpu", "triton", "cuda"}
    modules = {name: SimpleNamespace(name=name, supports=lambda device: True) for name in ("triton", "cuda")}
    monkeypatch.setattr(backend_timings, "_table", lambda: TABLE)
    monkeypatch.setattr(_backends, "_usable", lambda name: name in usable)
    real_load = _backends._load
    monkeypatch.setattr(_backends, "_load", lambda name: modules.get(name) or real_load(name))
    for cached in (_backends.resolve, _backends._measured_choice):
        cached.cache_clear()
    yield usable
    for cached in (_backends.resolve, _backends._measured_choice):
        cached.cache_clear()


def choice(op, n, k, d, dtype=torch.bfloat16):
    return _backends.resolve_for(op, "auto", rows(n, d, dtype), k)[0]


def test_picks_the_fused_backend_measured_faster_at_a_recorded_shape(fake_gpu):
    assert choice("assign", 4096, 3000, 128) == "cuda"  # reference is faster there but never chosen
    assert choice("assign", 4096, 65536, 128) == "triton"
    assert choice("step", 4096, 3000, 128, torch.float32) == "cuda"


def test_graphed_steps_prefer_graph_figures(fake_gpu):
    """GraphedGroupingStep's ops: the first with a figure for the dtype decides."""
    from smog_kernels.graphed_step import GRAPH_OPS

    assert choice("step", 4096, 3000, 128) == "cuda"  # eager: host overhead decides
    assert choice(GRAPH_OPS, 4096, 3000, 128) == "triton"  # no step_graphed figure: step_graph's
    assert choice(GRAPH_OPS, 4096, 3000, 128, torch.float32) == "cuda"  # only the eager step's figure


def test_picks_by_the_nearest_recorded_shape(fake_gpu):
    assert choice("assign", 5000, 2500, 100) == "cuda"
    assert choice("assign", 1000, 40000, 128) == "triton"
    assert choice("assign", 10**6, 10**6, 4096) == "triton"  # beyond every recorded shape


def test_falls_back_to_the_next_measured_when_the_fastest_is_unusable(fake_gpu):
    fake_gpu.discard("cuda")
    assert choice("assign", 4096, 3000, 128) == "triton"


def test_falls_back_to_the_fixed_order_without_figures(fake_gpu):
    first = _backends.AUTO_ORDER["cuda"][0]
    assert choice("loss_fwd", 4096, 3000, 128) == first  # op not in the table
    assert choice("assign", 4096, 3000, 128, torch.float16) == first  # dtype not in the table


def test_falls_back_to_the_reference_without_a_usable_fused_backend(fake_gpu):
    fake_gpu.difference_update({"triton", "cuda"})
    assert choice("assign", 4096, 65536, 128) == "reference"


def test_explicit_backends_and_cpu_tensors_ignore_the_figures(fake_gpu):
    assert _backends.resolve_for("assign", "triton", rows(4096, 128), 3000)[0] == "triton"
    assert _backends.resolve_for("assign", "auto", rows(4096, 128, device=torch.device("cpu")), 3000)[0] == "cpu"


def test_the_decision_is_cached_per_power_of_two_bucket(fake_gpu):
    choice("assign", 4096, 3000, 128)
    before = _backends._measured_choice.cache_info()
    choice("assign", 4000, 3100, 130)
    after = _backends._measured_choice.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


# ---- which op's figures the public functions consult ------------------------------------------------


@pytest.fixture
def recorded_ops(monkeypatch):
    """Public functions resolve on the CPU backend; returns the op names they asked resolve_for about."""
    asked = []

    def resolve_for(op, backend, x, num_groups):
        asked.append(op)
        return _backends.resolve(backend, x.device)

    monkeypatch.setattr(api, "resolve_for", resolve_for)
    monkeypatch.setattr(step, "resolve_for", resolve_for)
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

    chosen = SimpleNamespace(loss_forward=recording(native.loss_forward),
                             loss_centroid_grad=recording(native.loss_centroid_grad))
    monkeypatch.setattr(api, "resolve_for", lambda *args: ("chosen", chosen))
    p = torch.nn.functional.normalize(torch.randn(30, 8, generator=generator), dim=1).requires_grad_()
    c = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=1).requires_grad_()
    sk.group_contrastive_loss(p, c, torch.zeros(30, dtype=torch.int64), 0.1, grad_centroids=True).backward()
    assert calls == ["loss_forward", "loss_centroid_grad"]


# ---- the shipped table ------------------------------------------------------------------------------


def test_shipped_table_is_the_benchmark_json_reduced():
    with open(backend_timings.TABLE) as f:
        table = json.load(f)
    with open(os.path.join(ROOT, table["source"])) as f:
        bench = json.load(f)
    assert table == backend_timings.build_table(bench, table["source"]), (
        f"rebuild it: bench/backend_timings {table['source']}")
    assert table["card"] == bench["environment"]["device"]
    # independently of build_table: each recorded shape's first backend has the lowest benchmark time
    best: dict = {}
    for r in bench["rows"]:
        if r["method"] in _backends.NAMES and r["ms"] is not None:
            key = (r["op"], r["dtype"], (r["n"], r["k"], r["d"]))
            if key not in best or r["ms"] < best[key][1]:
                best[key] = (r["method"], r["ms"])
    firsts = {(op, dtype, tuple(e["shape"])): e["order"][0]
              for op, dtypes in table["ops"].items() for dtype, entries in dtypes.items() for e in entries}
    assert firsts == {key: method for key, (method, _) in best.items()}


def test_the_table_ships_with_the_package():
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert '"smog_kernels": ["*.json"]' in f.read()
    assert os.path.dirname(backend_timings.TABLE) == os.path.dirname(os.path.abspath(sk.__file__))
