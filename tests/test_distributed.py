"""DDP and FSDP2 on 2 CPU processes (gloo, 127.0.0.1) against one process on the whole batch."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("dist_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(mode: str, world: int, tmp_path) -> str:
    out = str(tmp_path / mode)
    r = subprocess.run(
        [sys.executable, str(WORKER), mode, str(world), out, _port()],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = _run("single", 1, tmp_path_factory.mktemp("single"))
    return torch.load(f"{out}.0.pt", weights_only=True)


def test_ddp_ranks_agree_and_match_single_process(single, tmp_path):
    out = _run("ddp", 2, tmp_path)
    r0 = torch.load(f"{out}.0.pt", weights_only=True)
    r1 = torch.load(f"{out}.1.pt", weights_only=True)
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
        torch.testing.assert_close(r0["params"][n], single["params"][n], rtol=1e-5, atol=1e-5)
    for a, b in zip(r0["scales"], r1["scales"]):
        assert torch.equal(a, b)


def test_fsdp2_sharded_norms_match_single_process(single, tmp_path):
    out = _run("fsdp", 2, tmp_path)
    r0 = torch.load(f"{out}.0.pt", weights_only=True)
    assert r0["sharded"]
    for a, b in zip(r0["scales"], single["scales"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for n in r0["params"]:
        torch.testing.assert_close(r0["params"][n], single["params"][n], rtol=1e-5, atol=1e-5)
    # the same run with shard-local norms (no all-reduce) is measurably wrong: the test has teeth
    bad = torch.load(f"{_run('fsdp-local', 2, tmp_path)}.0.pt", weights_only=True)
    err = max(float(((a - b).abs() / b).max()) for a, b in zip(bad["scales"], single["scales"]))
    assert err > 1e-2


def test_fsdp2_prepare_after_sharding_refuses_and_leaves_model_working(tmp_path):
    out = _run("fsdp-after", 2, tmp_path)
    assert torch.load(f"{out}.0.pt", weights_only=True) == {"refused": True}


def test_fsdp2_length_mode_matches_single_process(tmp_path):
    """AdamW in the step-length mode under FSDP2: the update lengths and the first-moment
    norms are global (one all-reduce), so the sharded run equals one process."""
    one = torch.load(f"{_run('single+length', 1, tmp_path)}.0.pt", weights_only=True)
    r0 = torch.load(f"{_run('fsdp+length', 2, tmp_path)}.0.pt", weights_only=True)
    assert r0["sharded"]
    for n in r0["params"]:
        torch.testing.assert_close(r0["params"][n], one["params"][n], rtol=1e-5, atol=1e-5)


def test_ddp_batchnorm_statistics_are_averaged_so_ranks_stay_identical(tmp_path):
    """BN after an addition with variance="measured": the scales read running variances,
    which differ per rank; one all-reduce averages them, and the replicas stay bitwise
    identical. Without it (each rank's own statistics) they part."""
    out = _run("ddp-bn", 2, tmp_path)
    r0 = torch.load(f"{out}.0.pt", weights_only=True)
    r1 = torch.load(f"{out}.1.pt", weights_only=True)
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    for a, b in zip(r0["scales"], r1["scales"]):
        assert torch.equal(a, b)
    bad = _run("ddp-bn-local", 2, tmp_path)
    b0 = torch.load(f"{bad}.0.pt", weights_only=True)
    b1 = torch.load(f"{bad}.1.pt", weights_only=True)
    assert any(not torch.equal(b0["params"][n], b1["params"][n]) for n in b0["params"])
