"""Worker for the distributed tests: trains a small net with back-matching through DDP or
FSDP2 on 2 CPU processes (gloo, file-store rendezvous), or in one process on the whole batch
(the oracle: ``single_run``, called in the test process itself).

``python dist_worker.py MODES WORLD OUTDIR STORE``: one process group of ``WORLD`` ranks runs
every mode of the comma-separated ``MODES`` in turn (a fresh net and plan each, barriers
between), and writes ``OUTDIR/MODE.RANK.pt``. A mode that patches the package to show a known
failure (``-local``) undoes its patch before the next mode runs."""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxbackmatch  # noqa: E402

STEPS = 3
BATCH = 16
#: every distributed mode: the fast test runs them all in one process group
MODES = ("ddp", "ddp-bn", "ddp-bn-local", "fsdp", "fsdp-local", "fsdp+length", "fsdp-after", "ddp+fused", "fsdp+fused")


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10, bias=False),
    )


class BNNet(nn.Module):
    """BatchNorm whose statistics enter the scales: BN after a residual addition, and the
    plan prepared with variance="measured" (running variances instead of weight norms)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = self.b2(h + self.c2(h))  # BN after an addition
        return self.fc(torch.nn.functional.max_pool2d(torch.relu(h), 2).flatten(1))


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(STEPS)]


def train(net, plan, rank: int, world: int, scales_log: list, length: bool = False, states: list | None = None,
          fused: bool = False) -> None:
    """A few steps on this rank's share of each batch; after each step, the plan's scales (and,
    with ``states``, this rank's parameters and buffers they were computed from). ``fused``:
    ``plan.compile_step`` as it runs on CUDA (the foreach step: rescale, then torch's fused
    SGD kernel) instead of attach()."""
    step = None
    if length:  # the step-length mode on AdamW
        opt = torch.optim.AdamW(net.parameters(), lr=0.02, weight_decay=0.01)
        handle = plan.attach(opt, mode="length")
    elif fused:
        from fxbackmatch.apply import fused as fused_mod

        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        handle, step = None, plan.compile_step(opt)
        fused_mod.FOREACH_DEVICES.add("cpu")
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        handle = plan.attach(opt)
    per = BATCH // world
    for x, y in data():
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        step() if step is not None else opt.step()
        if step is not None:
            from fxbackmatch.apply.cuda_update import SGDForeachStep

            # torch's fused SGD kernel where it applies; FSDP2's DTensors take its foreach update
            assert isinstance(step._fn, SGDForeachStep) and step._fn.fused == [not plan._runtime.sharded]
        scales_log.append(plan.scale_tensor().cpu())
        if states is not None:
            module = net.module if hasattr(net, "module") else net
            states.append({k: v.detach().clone() for k, v in module.state_dict().items()})
    if handle is not None:
        handle.remove()
    if fused:
        fused_mod.FOREACH_DEVICES.discard("cpu")


def full_params(net) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in net.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[n] = t.clone()
    return out


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def single_run(length: bool = False) -> dict:
    """The oracle: one process, no process group, the whole batch."""
    net = make_net()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False)
    log: list = []
    train(net, plan, 0, 1, log, length)
    return {"params": full_params(net), "scales": log, "sharded": plan._runtime.sharded}


def _shard(net: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fully_shard(m)
    fully_shard(net)


def run_mode(mode: str, rank: int, world: int) -> dict:
    import fxbackmatch.runtime.chain as rt

    length, fused = mode.endswith("+length"), mode.endswith("+fused")
    mode = mode.removesuffix("+length").removesuffix("+fused")
    log: list = []
    states: list = []  # ddp-bn: each rank's parameters and statistics after each step
    if mode.startswith("ddp-bn"):  # per-rank BatchNorm statistics enter the scales
        # "-local": the known failure, each rank's own statistics
        patch = patched(rt, "_data_parallel_world", lambda: 1) if mode == "ddp-bn-local" else contextlib.nullcontext()
        with patch:
            ddp = nn.parallel.DistributedDataParallel(BNNet())
            plan = fxbackmatch.prepare(ddp, torch.randn(2, 3, 8, 8), compile=False, conventions=fxbackmatch.Conventions(variance="measured"))
            assert plan._analysis.atoms and plan._runtime.stat_refs
            train(ddp, plan, rank, world, log, states=states)
        net = ddp
    elif mode == "ddp":
        net = nn.parallel.DistributedDataParallel(make_net())
        plan = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False)
        train(net, plan, rank, world, log, length, fused=fused)
    elif mode == "fsdp-after":  # prepare on the already sharded model
        net = make_net()
        _shard(net)
        try:
            fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False)
        except fxbackmatch.PlanMismatchError as e:
            refused = "before fully_shard" in str(e)
        else:
            refused = False
        # the refused prepare left FSDP's state alone: the sharded model still trains
        x, y = data()[0]
        F.cross_entropy(net(x), y).backward()
        return {"refused": refused, "grads": all(p.grad is not None for p in net.parameters())}
    elif mode in ("fsdp", "fsdp-local"):
        # "-local": the known LARS-style failure, norms of the local shard only
        patch = patched(rt.dist, "all_reduce", lambda *a, **k: None) if mode == "fsdp-local" else contextlib.nullcontext()
        with patch:
            net = make_net()
            plan = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False)  # before sharding
            _shard(net)
            train(net, plan, rank, world, log, length, fused=fused)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return {"params": full_params(net.module if hasattr(net, "module") else net), "scales": log,
            "sharded": plan._runtime.sharded, "states": states}


def main(rank: int, world: int, modes: list[str], out: str, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for mode in modes:
            torch.save(run_mode(mode, rank, world), os.path.join(out, f"{mode}.{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every result is saved and every collective has finished: leave without the interpreter's
    # finalization, where gloo's worker threads (or work a DDP reducer still holds) can abort
    # the process after the fact ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    modes, world, out, store = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import torch.multiprocessing as mp

    mp.spawn(main, args=(world, modes, out, store), nprocs=world, join=True)
