"""CPU-specific checks of the compiled smog:: operators (the generic parity grid is test_parity.py):
tracing through the fake kernels (torch.library.opcheck, torch.compile), results independent of
the thread count, the AVX2 and portable micro-kernels agreeing with the reference, and memory that
stays far below an N x K score matrix at large K."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from smog_kernels import native
from smog_kernels import reference as ref
from smog_kernels.parity import REL_TOL, rel_err
from tests.conftest import cpu_has

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def extension_built() -> None:
    """A missing extension is a failure, not a skip (conftest.require)."""
    if not native.has_kernels("cpu"):
        pytest.fail("smog_kernels._C has no CPU kernels; build the extension with "
                    "`pip install --no-build-isolation -e .`")


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def op_args(n: int = 45, k: int = 77, d: int = 19) -> dict[str, tuple]:
    x, c = unit(n, d, 0), unit(k, d, 1)
    index = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(2))
    sums, counts = ref.group_stats(x, index, k)
    targets = torch.randint(0, k, (2, n), generator=torch.Generator().manual_seed(3))
    lse = torch.logsumexp(10.0 * x @ c.T, dim=1)
    return {
        "assign": (x, c),
        "group_stats": (x, index, k),
        "momentum_update": (c, sums, counts, 0.99),
        "loss_forward": (x, c, targets, 10.0),
        "loss_group_grad": (x, c, lse, torch.rand(n, generator=torch.Generator().manual_seed(4)), 10.0),
    }


@pytest.mark.parametrize("name", list(op_args()))
def test_opcheck(name):
    """Schema, fake (meta) kernel and AOT dispatch agree with the CPU kernel."""
    torch.library.opcheck(
        getattr(torch.ops.smog, name).default,
        op_args()[name],
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_torch_compile_traces_the_ops():
    """A full graph through the fused loss and assignment compiles (fake kernels give the shapes)
    and computes what eager mode computes."""
    x, c = unit(67, 32, 5), unit(129, 32, 6)
    targets = torch.randint(0, 129, (67,), generator=torch.Generator().manual_seed(7))

    def step(x, c, targets):
        index, score = torch.ops.smog.assign(x, c)
        lse, target_logits, attention = torch.ops.smog.loss_forward(x, c, targets.unsqueeze(0), 10.0)
        return index, score, (lse - target_logits[0]).mean(), attention.sum(0)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, c, targets), step(x, c, targets)):
        assert torch.equal(got, want)


def run_all(args: dict[str, tuple]) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, a in args.items():
        result = getattr(torch.ops.smog, name.split()[0])(*a)
        out[name] = list(result) if isinstance(result, tuple) else [result]
    return out


def test_results_do_not_depend_on_thread_count():
    """Bitwise identical results with 1, 2 and 3 threads (every block has one owner, and the
    row shares of the group gradient are fixed, not per thread)."""
    args = op_args(n=1001, k=3001, d=64)
    # sizes at which the memory-bound statistics and update passes run in parallel too
    x, c = unit(70000, 64, 12), unit(65536, 64, 13)
    index = torch.randint(0, 65536, (70000,), generator=torch.Generator().manual_seed(14))
    args["group_stats (large)"] = (x, index, 65536)
    args["momentum_update (large)"] = (c, *ref.group_stats(x, index, 65536), 0.9)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run_all(args))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name, tensors in results[0].items():
            for a, b in zip(tensors, other[name]):
                assert torch.equal(a, b), f"{name} differs between thread counts"


def _in_subprocess(code: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernels", ["portable", "avx2"])
def test_other_micro_kernels_match_the_reference(kernels):
    """The micro-kernels that CPUs without AVX-512 run (AVX2 + FMA on x86-64, portable loops
    elsewhere), forced through SMOG_CPU_KERNELS, pass the same checks."""
    if kernels == "avx2" and not (cpu_has("avx2") and cpu_has("fma")):
        pytest.skip("this CPU has no AVX2 + FMA")
    code = """
        import json, torch, smog_kernels as sk
        from smog_kernels import reference as ref
        from smog_kernels.parity import rel_err
        g = torch.Generator().manual_seed(0)
        def unit(n, d):
            x = torch.randn(n, d, generator=g)
            return x / x.norm(dim=1, keepdim=True)
        x, c = unit(301, 35), unit(67, 35)
        t = torch.randint(0, 67, (2, 301), generator=g)
        index, score = sk.assign(x, c, backend="cpu")
        exact = x.double() @ c.double().T
        errors = {"assign gap": float((exact.max(1).values - exact.gather(1, index[:, None])[:, 0]).max())}
        losses = []
        for fn in (lambda *a: sk.group_contrastive_loss(*a, backend="cpu"), ref.group_contrastive_loss):
            p, cc = x.clone().requires_grad_(), c.clone().requires_grad_()
            loss = fn(p, cc, t, 0.1, "mean", True)
            loss.backward()
            losses.append((loss.detach(), p.grad, cc.grad))
        for name, a, b in zip(("loss", "grad p", "grad c"), *losses):
            errors[name] = rel_err(a, b)
        print(json.dumps(errors))
    """
    errors = _in_subprocess(code, {"SMOG_CPU_KERNELS": kernels})
    assert errors.pop("assign gap") <= 1e-6
    for name, err in errors.items():
        assert err <= REL_TOL[torch.float32], name


@pytest.mark.parametrize("op", ["assign", "assign_stats_update", "loss"])
def test_large_k_memory_stays_far_below_the_score_matrix(op):
    """At K = 65536 the peak extra memory of each fused op is far below the N x K float32 score
    matrix it avoids. Measured in a fresh process: the kernel's peak resident set (VmHWM, reset
    through /proc/self/clear_refs once the inputs exist) minus the resident set before the call."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs")
    n, k, d = 2048, 65536, 128
    code = f"""
        import json, torch, smog_kernels as sk
        def status(key):
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
        g = torch.Generator().manual_seed(0)
        def unit(n, d):
            x = torch.randn(n, d, generator=g)
            return x.div_(x.norm(dim=1, keepdim=True))
        x, c = unit({n}, {d}), unit({k}, {d})
        t = torch.randint(0, {k}, ({n},), generator=g)
        p, cc = x.clone().requires_grad_(), c.clone().requires_grad_()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS:")
        if "{op}" == "assign":
            sk.assign(x, c, backend="cpu")
        elif "{op}" == "assign_stats_update":
            index, _ = sk.assign(x, c, backend="cpu")
            sums, counts = sk.group_stats(x, index, {k}, backend="cpu")
            sk.momentum_update(c, sums, counts, 0.99, backend="cpu")
        else:
            sk.group_contrastive_loss(p, cc, t, 0.1, grad_groups=True, backend="cpu").backward()
        print(json.dumps({{"extra": status("VmHWM:") - before}}))
    """
    extra = _in_subprocess(code)["extra"]
    score_matrix = n * k * 4
    assert extra < score_matrix / 4, f"{op}: {extra / 2**20:.0f} MiB extra (scores would be {score_matrix / 2**20:.0f} MiB)"


def test_non_contiguous_and_16_bit_inputs():
    """Strided (transposed, sliced) inputs give the results of their contiguous copies; 16-bit
    inputs give the float32 results of their widened values."""
    x = unit(40, 300, 8).T[:, :37]  # [300, 37], strides (1, 300)
    c = unit(52, 37, 9)[::2]  # [26, 37], row stride 74
    assert not x.is_contiguous() and not c.is_contiguous()
    for got, want in zip(torch.ops.smog.assign(x, c), torch.ops.smog.assign(x.contiguous(), c.contiguous())):
        assert torch.equal(got, want)
    for dtype in (torch.bfloat16, torch.float16):
        xl, cl = x.to(dtype), c.to(dtype)
        t = torch.randint(0, 26, (1, 300), generator=torch.Generator().manual_seed(1))
        for got, want in zip(torch.ops.smog.loss_forward(xl, cl, t, 10.0),
                             torch.ops.smog.loss_forward(xl.float(), cl.float(), t, 10.0)):
            assert torch.equal(got, want)
        moved = torch.ops.smog.momentum_update(cl, *ref.group_stats(xl[:26], torch.arange(26), 26), 0.5)
        assert moved.dtype == dtype
        assert rel_err(moved, ref.momentum_update(cl, *ref.group_stats(xl[:26], torch.arange(26), 26), 0.5)) <= REL_TOL[dtype]


def test_non_finite_rows_propagate():
    """A NaN row gets a NaN score (and an index in range) and a NaN loss; other rows are unaffected
    (the contract in smog_kernels.api)."""
    x, c = unit(9, 16, 10), unit(40, 16, 11)
    x[3] = float("nan")
    index, score = torch.ops.smog.assign(x, c)
    assert bool(score[3].isnan()) and 0 <= int(index[3]) < 40
    keep = torch.arange(9) != 3
    ref_index, _ = ref.assign(x[keep], c)
    assert torch.equal(index[keep], ref_index)
    lse, target_logits, _ = torch.ops.smog.loss_forward(x, c, torch.zeros(1, 9, dtype=torch.long), 10.0)
    assert bool(lse[3].isnan()) and bool(lse[keep].isfinite().all())


def test_kernel_benchmark_runs(tmp_path):
    """`smog bench kernels --shapes small` times every implementation and writes its JSON."""
    from smog.benchmarks import kernels

    assert kernels.main(["--shapes", "small", "--repeats", "1", "--no-memory", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernels_cpu_small.json").read_text())
    timed = {(r["op"], r["impl"]) for r in report["results"] if "median_s" in r}
    for op in kernels.OPS:
        assert (op, "fused") in timed and (op, "reference") in timed
    assert {(op, peer) for op in (kernels.LOSS_T1, kernels.LOSS_T2) for peer in kernels.TORCH_CE} <= timed
    assert all(r["median_s"] > 0 for r in report["results"] if "median_s" in r)
    assert {r["impl"] for r in report["results"]} == {i for impls in kernels.IMPLS.values() for i in impls}


def test_the_torch_cross_entropy_peer_computes_smogs_loss():
    """The benchmark's torch.nn.functional.linear_cross_entropy case (rows repeated per target set) does
    the same work as smog's loss: the same gradient to p, with one and with two target sets."""
    from smog.benchmarks import kernels

    for op in (kernels.LOSS_T1, kernels.LOSS_T2):
        reference = kernels.make_case(op, "reference", 300, 40, 16)()
        for peer in kernels.TORCH_CE:
            got = kernels.make_case(op, peer, 300, 40, 16)()
            assert (got - reference).abs().max() <= 1e-6 * reference.abs().max(), (op, peer)


def test_kernel_benchmark_refuses_a_shape_outside_its_set(capsys):
    from smog.benchmarks import kernels

    with pytest.raises(SystemExit) as exit_info:
        kernels.main(["--shapes", "small", "--only", "1", "2", "3"])
    assert exit_info.value.code == 2 and "not in --shapes small" in capsys.readouterr().err
