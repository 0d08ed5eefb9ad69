"""smog_kernels.distributed on real processes (gloo, 2 and 3 ranks) against one process.

Every rank rebuilds the same global inputs from one seed and works on its share; the test process
computes the single-process result on the concatenation and compares: assignments and counts
exactly, statistics, groups and gradients to float32 rounding, results across ranks bit for bit.
Shares are uneven, one rank holds no rows, one rank's rows all fall in one group. A rank that dies
or hangs must make the others raise a clear error within the process group's timeout.
"""
from __future__ import annotations

import importlib
import os
import time
import traceback
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import smog_kernels as sk
from smog_kernels import distributed as skd
from smog_kernels import reference as ref
from smog_kernels.step import grouping_step
from tests.conftest import SESSION_SEED

K, D, STEPS, BETA, TAU = 12, 16, 3, 0.7, 0.1
# per world size: (rows per rank, does the first rank's share sit on one group)
GROUPING_CASES = {
    2: [([7, 13], False), ([0, 16], False), ([9, 4], True)],
    3: [([5, 0, 11], False), ([1, 9, 3], True)],
}
STRATEGIES = [("allreduce", None), ("allgather", None), ("allgather", 20), ("auto", None)]
KMEANS_CASES = {2: [31, 0], 3: [20, 3, 26]}  # fewer rows than K on some ranks, none on one
KMEANS_K, KMEANS_ITERS = 9, 4
GRAD_CASES = {2: ([3, 5], [0, 9]), 3: ([2, 4, 3], [6, 0, 5])}  # (prediction rows, update rows) per rank
GRAD_PATHS = ("hook", "allreduce", "allgather")
T_SETS, VIEWS = 2, 2
JOIN_S = 90.0  # a launch that has not finished by then is killed and fails the test
HANG_TIMEOUT_S = 3.0  # process-group timeout of the failure tests


# ---- inputs, rebuilt identically on every rank and in the test process -----------------------


def unit(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1).float()


def grouping_inputs(seed: int, sizes: list[int], clustered: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(groups [K, D], one global batch [sum(sizes), D] per step)."""
    g = torch.Generator().manual_seed(seed)
    groups = unit(g, K, D)
    batches = []
    for _ in range(STEPS):
        x = unit(g, sum(sizes), D)
        if clustered:  # the first rank's rows all sit next to group 0
            x[: sizes[0]] = F.normalize(groups[0] + 0.01 * unit(g, sizes[0], D), dim=1)
        batches.append(x)
    return groups, batches


def kmeans_inputs(seed: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the union [sum(sizes), D], an explicit init [KMEANS_K, D])."""
    g = torch.Generator().manual_seed(seed)
    return unit(g, sum(KMEANS_CASES[world]), D), unit(g, KMEANS_K, D)


def grad_inputs(seed: int, world: int) -> dict[str, torch.Tensor]:
    n, m = (sum(s) for s in GRAD_CASES[world])
    g = torch.Generator().manual_seed(seed)
    return {"groups": unit(g, K, D), "targets": unit(g, T_SETS, n, D), "update": unit(g, m, D),
            "predictions": unit(g, VIEWS, n, D)}


def on(device: str, *items):
    """The tensors (or dicts of tensors) in `items` moved to `device`, as a list."""
    return [{k: v.to(device) for k, v in it.items()} if isinstance(it, dict)
            else [t.to(device) for t in it] if isinstance(it, list) else it.to(device) for it in items]


def share(x: torch.Tensor, sizes: list[int], rank: int, dim: int = 0) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank])


def local_loss(groups: torch.Tensor, updated: torch.Tensor, targets: torch.Tensor,
               predictions: torch.Tensor) -> torch.Tensor:
    """grouping_step's loss for one rank: targets [T, n, D] assigned under `groups` (before the
    update), predictions [V, n, D] scored against `updated`, mean over t, v, b."""
    t, n, _ = targets.shape
    index = ref.assign(targets.reshape(t * n, D), groups)[0].view(t, n)
    return ref.group_contrastive_loss(predictions.reshape(-1, D), updated, index.repeat(1, VIEWS), TAU,
                                      grad_groups=True)


# ---- what each rank runs ----------------------------------------------------------------------


def run_grouping(rank: int, world: int, seed: int, device: str) -> dict:
    out = {}
    for case, (sizes, clustered) in enumerate(GROUPING_CASES[world]):
        groups0, batches = on(device, *grouping_inputs(seed + case, sizes, clustered))
        for strategy, max_rows in STRATEGIES:
            groups, steps = groups0, []
            for batch in batches:
                x = share(batch, sizes, rank)
                index, _ = sk.assign(x, groups)
                sums, counts = skd.sync_group_stats(x, index, K, strategy=strategy, max_rows=max_rows)
                groups = sk.momentum_update(groups, sums, counts, BETA)
                steps.append((index, sums, counts, groups))
            out[(case, strategy, max_rows)] = steps
        x16 = share(batches[0], sizes, rank).bfloat16()
        index, _ = sk.assign(x16, groups0.bfloat16())
        for strategy in ("allreduce", "allgather"):
            out[(case, "bf16", strategy)] = skd.sync_group_stats(x16, index, K, strategy=strategy)
    out["deterministic_mode_after"] = torch.are_deterministic_algorithms_enabled()  # must be restored
    return out


def run_kmeans(rank: int, world: int, seed: int, device: str) -> dict:
    union, init = on(device, *kmeans_inputs(seed, world))
    x = share(union, KMEANS_CASES[world], rank)
    # only rank 0's seed and init count: the others pass different ones
    drawn = skd.spherical_kmeans(x, KMEANS_K, KMEANS_ITERS, seed=seed + rank)
    given = skd.spherical_kmeans(x, KMEANS_K, KMEANS_ITERS, init=init if rank == 0 else -init)
    return {"drawn": drawn, "given": given}


def run_grad(rank: int, world: int, seed: int, device: str) -> dict:
    data, (n_sizes, m_sizes) = on(device, grad_inputs(seed, world))[0], GRAD_CASES[world]
    targets = share(data["targets"], n_sizes, rank, dim=1)
    out = {}
    for path in GRAD_PATHS:
        update = share(data["update"], m_sizes, rank).clone().requires_grad_()
        predictions = share(data["predictions"], n_sizes, rank, dim=1).clone().requires_grad_()
        if path == "hook":
            loss = grouping_step(data["groups"], targets, update, predictions, BETA, TAU, grad_groups=True,
                                 reduce_stats=skd.make_stats_reducer()).loss
        else:
            index = ref.assign(update.detach(), data["groups"])[0]
            sums, counts = skd.sync_group_stats(update, index, K, strategy=path)
            updated = ref.momentum_update(data["groups"], sums, counts, BETA)
            loss = local_loss(data["groups"], updated, targets, predictions)
        loss.backward()
        out[path] = (loss.detach(), update.grad, predictions.grad)
    return out


def run_all(rank: int, world: int, seed: int, device: str = "cpu") -> dict:
    return {"grouping": run_grouping(rank, world, seed, device), "kmeans": run_kmeans(rank, world, seed + 100, device),
            "grad": run_grad(rank, world, seed + 200, device)}


def run_peer_dies(rank: int, world: int, seed: int) -> dict:
    """Two good reductions, then the last rank dies before the third."""
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(seed + rank))
    index = torch.zeros(4, dtype=torch.int64)
    for _ in range(2):
        skd.sync_group_stats(x, index, K, strategy="allreduce")
    if rank == world - 1:
        os._exit(3)
    return failing_reduction(x, index)


def run_peer_hangs(rank: int, world: int, seed: int) -> dict:
    """The last rank never joins the reduction (it sleeps past the timeout, then leaves)."""
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(seed + rank))
    index = torch.zeros(4, dtype=torch.int64)
    if rank == world - 1:
        time.sleep(3 * HANG_TIMEOUT_S)
        os._exit(4)
    return failing_reduction(x, index)


def failing_reduction(x: torch.Tensor, index: torch.Tensor) -> dict:
    start = time.monotonic()
    try:
        skd.sync_group_stats(x, index, K, strategy="allgather", max_rows=4)
    except RuntimeError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}



def worker(rank: int, world: int, init_file: str, out_dir: str, scenario: str, seed: int, timeout_s: float) -> None:
    """One rank: join the gloo group, run the scenario, save its result (or its traceback)."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        result = scenario_function(scenario)(rank, world, seed)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        code = 0
    except BaseException:  # noqa: BLE001 -- reported to the test process through the file
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    os._exit(code)  # skip interpreter teardown: a broken group must not hang the exit


SCENARIOS: dict[str, Callable[[int, int, int], dict]] = {
    "all": run_all, "all_cuda": lambda rank, world, seed: run_all(rank, world, seed, "cuda"),
    "peer_dies": run_peer_dies, "peer_hangs": run_peer_hangs,
}


def scenario_function(scenario: str) -> Callable[[int, int, int], dict]:
    """A scenario of this module by name, or any module's function as "module:function"."""
    if ":" not in scenario:
        return SCENARIOS[scenario]
    module, name = scenario.split(":")
    return getattr(importlib.import_module(module), name)


def launch(world: int, scenario: str, seed: int, tmp: Path, timeout_s: float = 30.0) -> tuple[list, list[int]]:
    """Runs `scenario` (see scenario_function) on `world` spawned processes; returns (per-rank results or
    None, exit codes)."""
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, str(tmp / "rendezvous"), str(tmp), scenario, seed, timeout_s))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    stuck = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in stuck:
        procs[r].kill()
        procs[r].join()
    assert not stuck, f"ranks {stuck} of {world} still running after {JOIN_S} s ({scenario})"
    errors = {r: (tmp / f"rank{r}.err").read_text() for r in range(world) if (tmp / f"rank{r}.err").exists()}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    results = [torch.load(tmp / f"rank{r}.pt", map_location="cpu") if (tmp / f"rank{r}.pt").exists() else None for r in range(world)]
    return results, [p.exitcode for p in procs]


def seed_for(name: str) -> int:
    return (SESSION_SEED + zlib.crc32(name.encode())) % (2**31)


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", params=[pytest.param((2, "cpu"), id="2-ranks"), pytest.param((3, "cpu"), id="3-ranks"),
                                        pytest.param((2, "cuda"), id="2-ranks-cuda", marks=GPU)])
def runs(request, tmp_path_factory) -> tuple[int, str, int, list[dict]]:
    """(world, device, seed, per-rank results of run_all on CPU), one launch per world size and
    device; the CUDA case runs gloo on CUDA tensors, all ranks on one GPU."""
    world, device = request.param
    seed = seed_for(f"all-{world}-{device}")
    scenario = "all" if device == "cpu" else "all_cuda"
    results, codes = launch(world, scenario, seed, tmp_path_factory.mktemp(f"all{world}{device}"))
    assert codes == [0] * world
    return world, device, seed, results


# ---- checks -----------------------------------------------------------------------------------


def assert_same_on_all_ranks(values: list, what: str) -> None:
    for r, v in enumerate(values[1:], start=1):
        for a, b in zip(values[0], v):
            assert torch.equal(a, b), f"{what}: rank {r} differs from rank 0"


def test_statistics_and_groups_match_one_process(runs) -> None:
    world, device, seed, results = runs
    for case, (sizes, clustered) in enumerate(GROUPING_CASES[world]):
        groups, batches = on(device, *grouping_inputs(seed + case, sizes, clustered))
        expected = []
        for batch in batches:
            index, _ = sk.assign(batch, groups)
            sums, counts = sk.group_stats(batch, index, K)
            groups = sk.momentum_update(groups, sums, counts, BETA)
            expected.append(on("cpu", index, sums, counts, groups))
        for strategy, max_rows in STRATEGIES:
            key, what = (case, strategy, max_rows), f"sizes {sizes}, {strategy}, max_rows {max_rows}"
            for step, (index, sums, counts, groups) in enumerate(expected):
                per_rank = [res["grouping"][key][step] for res in results]
                assert torch.equal(torch.cat([p[0] for p in per_rank]), index), f"{what}: assignments, step {step}"
                assert_same_on_all_ranks([p[1:] for p in per_rank], f"{what}, step {step}")
                _, got_sums, got_counts, got_groups = per_rank[0]
                assert torch.equal(got_counts, counts), f"{what}: counts, step {step}"
                scale = counts.clamp(min=1).unsqueeze(1).float()
                assert torch.allclose(got_sums / scale, sums / scale, rtol=0, atol=1e-6), f"{what}: sums, step {step}"
                assert (got_groups - groups).abs().max() <= 1e-6, f"{what}: groups, step {step}"
            assert any((c == 0).any() for _, _, c, _ in expected), "the cases must include empty groups"
    assert not any(res["grouping"]["deterministic_mode_after"] for res in results)


def test_bfloat16_rows_match_one_process(runs) -> None:
    world, device, seed, results = runs
    for case, (sizes, clustered) in enumerate(GROUPING_CASES[world]):
        groups, batches = on(device, *grouping_inputs(seed + case, sizes, clustered))
        x16 = batches[0].bfloat16()
        sums, counts = on("cpu", *sk.group_stats(x16, sk.assign(x16, groups.bfloat16())[0], K))
        for strategy in ("allreduce", "allgather"):
            got_sums, got_counts = results[0]["grouping"][(case, "bf16", strategy)]
            assert torch.equal(got_counts, counts)
            scale = counts.clamp(min=1).unsqueeze(1).float()
            assert torch.allclose(got_sums / scale, sums / scale, rtol=0, atol=1e-6), f"{sizes} {strategy}"


def test_kmeans_matches_one_process_on_the_union(runs) -> None:
    world, device, seed, results = runs
    seed += 100
    union, init = on(device, *kmeans_inputs(seed, world))
    for name, expected in (("drawn", sk.spherical_kmeans(union, KMEANS_K, KMEANS_ITERS, seed=seed)),
                           ("given", sk.spherical_kmeans(union, KMEANS_K, KMEANS_ITERS, init=init))):
        expected = on("cpu", *expected)
        per_rank = [res["kmeans"][name] for res in results]
        assert_same_on_all_ranks([(c,) for c, _ in per_rank], f"k-means ({name} init) groups")
        assert (per_rank[0][0] - expected[0]).abs().max() <= 1e-6, f"k-means ({name} init) groups"
        assert torch.equal(torch.cat([i for _, i in per_rank]), expected[1]), f"k-means ({name} init) assignment"


def test_gradients_match_one_process(runs) -> None:
    """Rank r's gradients equal those of the sum of all ranks' losses (the DDP convention), one process."""
    world, device, seed, results = runs
    data, (n_sizes, m_sizes) = on(device, grad_inputs(seed + 200, world))[0], GRAD_CASES[world]
    update = data["update"].clone().requires_grad_()
    predictions = data["predictions"].clone().requires_grad_()
    index = ref.assign(update.detach(), data["groups"])[0]
    sums, counts = ref.group_stats(update, index, K)
    updated = ref.momentum_update(data["groups"], sums, counts, BETA)
    losses = [local_loss(data["groups"], updated, share(data["targets"], n_sizes, r, dim=1),
                         share(predictions, n_sizes, r, dim=1)) for r in range(world)]
    torch.stack(losses).sum().backward()
    assert update.grad.norm() > 0, "the gradient through the groups must not vanish in this test"
    for path in GRAD_PATHS:
        for r, res in enumerate(results):
            loss, g_update, g_pred = res["grad"][path]
            assert torch.allclose(loss, losses[r].detach().cpu(), rtol=1e-5, atol=0), f"{path}: loss of rank {r}"
            for got, want, what in ((g_update, share(update.grad, m_sizes, r).cpu(), "update rows"),
                                    (g_pred, share(predictions.grad, n_sizes, r, dim=1).cpu(), "predictions")):
                assert got.shape == want.shape, f"{path}: {what} gradient shape on rank {r}"
                assert (got - want).norm() <= 1e-5 * want.norm().clamp(min=1e-12), f"{path}: {what} gradient, rank {r}"


@pytest.mark.parametrize("scenario,world,exit_code", [("peer_dies", 3, 3), ("peer_hangs", 2, 4)])
def test_failed_peer_raises_clear_error_within_timeout(scenario, world, exit_code, tmp_path) -> None:
    results, codes = launch(world, scenario, seed_for(scenario), tmp_path, timeout_s=HANG_TIMEOUT_S)
    assert codes[-1] == exit_code and results[-1] is None
    for r, res in enumerate(results[:-1]):
        assert codes[r] == 0
        assert res["error"] is not None, f"rank {r}: the reduction did not fail"
        assert "smog_kernels.distributed" in res["error"] and f"rank {r} of {world}" in res["error"], res["error"]
        assert res["seconds"] < 2 * HANG_TIMEOUT_S + 5, f"rank {r} took {res['seconds']:.1f} s to fail"


# ---- single process and the strategy rule ------------------------------------------------------


def test_single_process_is_local(generator) -> None:
    assert not dist.is_initialized()
    x = unit(generator, 33, D)
    index, _ = sk.assign(x, unit(generator, K, D))
    sums, counts = sk.group_stats(x, index, K)
    reducer = skd.make_stats_reducer()
    got_sums, got_counts = reducer(sums, counts)
    assert got_sums is sums and got_counts is counts
    for strategy in ("allreduce", "allgather", "auto"):
        got = skd.sync_group_stats(x, index, K, strategy=strategy)
        assert torch.equal(got[0], sums) and torch.equal(got[1], counts)
    union_result = skd.spherical_kmeans(x, 5, 3, seed=7)
    expected = sk.spherical_kmeans(x, 5, 3, seed=7)
    assert torch.equal(union_result[0], expected[0]) and torch.equal(union_result[1], expected[1])


def test_strategy_rule() -> None:
    # all-gather for SMoG's per-GPU batches against K = 65536, all-reduce for large shares
    assert skd.choose_strategy(256, 65536, 128, 4) == "allgather"
    assert skd.choose_strategy(4096, 3000, 128, 4) == "allreduce"
    # the switch sits at W * N (4 D + 8) = 4 K (D + 2), W * N ~ K (measured on gloo: between N = 1024
    # and 1536 for W = 2, K = 3000)
    assert skd.choose_strategy(1024, 3000, 128, 2) == "allgather"
    assert skd.choose_strategy(1536, 3000, 128, 2) == "allreduce"
    for w, n, k in ((2, 256, 3000), (4, 1024, 3000), (3, 100, 100)):
        gather, reduce = (skd.bytes_moved(s, n, k, 128, w) for s in ("allgather", "allreduce"))
        assert (w - 1) * n * (4 * 128 + 8) == gather and 2 * (w - 1) * k * 130 * 4 // w == reduce
    with pytest.raises(ValueError, match="strategy"):
        skd.bytes_moved("ring", 1, 1, 1, 2)


def test_bad_arguments_raise() -> None:
    x = torch.zeros(4, D)
    with pytest.raises(ValueError, match="strategy"):
        skd.make_stats_reducer(strategy="gossip")
    with pytest.raises(ValueError, match="max_rows"):
        skd.make_stats_reducer(max_rows=-1)
    with pytest.raises(ValueError, match="index"):
        skd.sync_group_stats(x, torch.zeros(3, dtype=torch.int64), K)
    with pytest.raises(ValueError, match="index"):
        skd.sync_group_stats(x, torch.full((4,), K, dtype=torch.int64), K)
    with pytest.raises(TypeError, match="x"):
        skd.sync_group_stats(x.long(), torch.zeros(4, dtype=torch.int64), K)
