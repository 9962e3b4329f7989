"""DDP and FSDP2 on 2 CPU processes (gloo, file-store rendezvous) against one process on the
whole batch (``dist_worker.single_run``, in this process).

The fast test spawns ONE 2-rank process group that runs every distributed mode in turn
(starting processes and importing torch is most of the cost); the slow test runs each mode in
a process group of its own, so that no mode can lean on what an earlier one left behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dist_worker
import fxbackmatch

WORKER = Path(__file__).with_name("dist_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


def _spawn(modes, tmp_path) -> dict[str, list[dict]]:
    """Run ``modes`` in one 2-rank process group; per mode, each rank's result."""
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run(
        [sys.executable, str(WORKER), ",".join(modes), "2", str(out), str(tmp_path / "store")],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return {m: [torch.load(out / f"{m}.{rank}.pt", weights_only=True) for rank in (0, 1)] for m in modes}


@pytest.fixture(scope="module")
def single():
    return dist_worker.single_run()


@pytest.fixture(scope="module")
def single_length():
    return dist_worker.single_run(length=True)


def check_ddp(r, single):
    r0, r1 = r
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
        torch.testing.assert_close(r0["params"][n], single["params"][n], rtol=1e-5, atol=1e-5)
    for a, b in zip(r0["scales"], r1["scales"]):
        assert torch.equal(a, b)


def check_fsdp(r, single):
    r0 = r[0]
    assert r0["sharded"]
    for a, b in zip(r0["scales"], single["scales"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for n in r0["params"]:
        torch.testing.assert_close(r0["params"][n], single["params"][n], rtol=1e-5, atol=1e-5)


def check_fsdp_local_is_wrong(r, single):
    """The same run with shard-local norms (no all-reduce) is measurably wrong: the FSDP
    check has teeth."""
    err = max(float(((a - b).abs() / b).max()) for a, b in zip(r[0]["scales"], single["scales"]))
    assert err > 1e-2


def check_fsdp_length(r, single_length):
    """AdamW in the step-length mode under FSDP2: the update lengths and the first-moment
    norms are global (one all-reduce), so the sharded run equals one process."""
    r0 = r[0]
    assert r0["sharded"]
    for n in r0["params"]:
        torch.testing.assert_close(r0["params"][n], single_length["params"][n], rtol=1e-5, atol=1e-5)


def check_fsdp_after(r):
    """prepare on an already sharded model refuses, and leaves the model training."""
    assert all(x == {"refused": True, "grads": True} for x in r)


def _bn_scales(state: dict) -> torch.Tensor:
    """One process, no process group: the scales of a BNNet holding ``state`` (parameters and
    BatchNorm running statistics)."""
    with torch.random.fork_rng():  # BNNet seeds the global RNG
        net = dist_worker.BNNet()
    net.load_state_dict(state)
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False,
                               conventions=fxbackmatch.Conventions(variance="measured"))
    return plan.scale_tensor()


def _rank_mean(states: list[dict]) -> dict:
    """The ranks' common parameters with their running statistics averaged."""
    return {k: v if not v.is_floating_point() else torch.stack([s[k] for s in states]).mean(0)
            for k, v in states[0].items()}


def check_ddp_bn(r):
    """BN after an addition with variance="measured": the scales read running variances,
    which differ per rank; one all-reduce averages them, and the replicas stay bitwise
    identical. Oracle: one process on the ranks' averaged statistics. The all-reduce averages
    each statistic's atom (a mean of the variances, of their inverses), the oracle the variances
    themselves: equal to second order in the ranks' spread, which is well under the tolerance
    here while either rank's own statistics miss it by far more (so rank 0's statistics
    broadcast, or none shared, would fail)."""
    r0, r1 = r
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    for a, b in zip(r0["scales"], r1["scales"]):
        assert torch.equal(a, b)
    for step, (s0, s1, got) in enumerate(zip(r0["states"], r1["states"], r0["scales"], strict=True)):
        assert any(not torch.equal(s0[k], s1[k]) for k in s0 if "running_var" in k)  # the ranks' own
        oracle = _bn_scales(_rank_mean([s0, s1]))
        torch.testing.assert_close(got, oracle, rtol=5e-5, atol=0, msg=f"step {step}")  # seen: ≤ 1.1e-5
        own = [_bn_scales(s) for s in (s0, s1)]
        assert min(float(((o - oracle).abs() / oracle).max()) for o in own) > 2.5e-4, step  # seen: ≥ 5e-4


def check_ddp_bn_local_parts(r):
    """Without the all-reduce (each rank's own statistics) the replicas part, and each rank's
    scales are exactly the one-process scales of its own state (the oracle's construction
    checked where it must be exact)."""
    b0, b1 = r
    assert any(not torch.equal(b0["params"][n], b1["params"][n]) for n in b0["params"])
    for b in (b0, b1):
        for got, state in zip(b["scales"], b["states"], strict=True):
            torch.testing.assert_close(got, _bn_scales(state), rtol=1e-12, atol=0)


def _check(mode, r, single, single_length):
    {
        "ddp": lambda: check_ddp(r, single),
        "ddp-bn": lambda: check_ddp_bn(r),
        "ddp-bn-local": lambda: check_ddp_bn_local_parts(r),
        "fsdp": lambda: check_fsdp(r, single),
        "fsdp-local": lambda: check_fsdp_local_is_wrong(r, single),
        "fsdp+length": lambda: check_fsdp_length(r, single_length),
        "fsdp-after": lambda: check_fsdp_after(r),
        "ddp+fused": lambda: check_ddp(r, single),
        "fsdp+fused": lambda: check_fsdp(r, single),
    }[mode]()


def test_every_mode_in_one_process_group(single, single_length, tmp_path):
    """DDP, DDP with BatchNorm statistics, FSDP2 (gradient rescale and step-length mode),
    prepare-after-sharding, the two known failures that show the checks have teeth, and DDP and
    FSDP2 under ``compile_step`` as it runs on CUDA (the foreach step) against attach() in one
    process."""
    results = _spawn(dist_worker.MODES, tmp_path)
    for mode in dist_worker.MODES:
        _check(mode, results[mode], single, single_length)


@pytest.mark.slow
@pytest.mark.parametrize("mode", dist_worker.MODES)
def test_each_mode_in_its_own_process_group(mode, single, single_length, tmp_path):
    _check(mode, _spawn([mode], tmp_path)[mode], single, single_length)
