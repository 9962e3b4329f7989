"""Worker for the distributed tests: trains a small net with back-matching through DDP or
FSDP2 on 2 CPU processes (gloo), or in one process on the whole batch (the oracle)."""
from __future__ import annotations

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


def train(net, plan, rank: int, world: int, scales_log: list, length: bool = False) -> None:
    if length:  # the step-length mode on AdamW
        opt = torch.optim.AdamW(net.parameters(), lr=0.02, weight_decay=0.01)
        plan.attach(opt, mode="length")
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        plan.attach(opt)
    per = BATCH // world
    for x, y in data():
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        opt.step()
        scales_log.append(plan.scale_tensor().cpu())


def full_params(net) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in net.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[n] = t.clone()
    return out


def main(rank: int, world: int, mode: str, out: str, port: str) -> None:
    torch.set_num_threads(1)
    length = mode.endswith("+length")
    mode = mode.removesuffix("+length")
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    net = BNNet() if mode.startswith("ddp-bn") else make_net()
    log: list = []
    if mode.startswith("ddp-bn"):  # per-rank BatchNorm statistics enter the scales
        if mode == "ddp-bn-local":  # the known failure: each rank's own statistics
            import fxbackmatch.runtime as rt

            rt._data_parallel_world = lambda: 1
        ddp = nn.parallel.DistributedDataParallel(net)
        plan = fxbackmatch.prepare(ddp, torch.randn(2, 3, 8, 8), compile=False, variance="measured")
        assert plan._analysis.atoms and plan._runtime.stat_refs
        train(ddp, plan, rank, world, log)
    elif mode == "ddp":
        ddp = nn.parallel.DistributedDataParallel(net)
        plan = fxbackmatch.prepare(ddp, torch.randn(2, 3, 8, 8), compile=False)
        train(ddp, plan, rank, world, log, length)
    elif mode == "fsdp-after":  # prepare on the already sharded model
        from torch.distributed.fsdp import fully_shard

        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fully_shard(m)
        fully_shard(net)
        try:
            fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False)
        except fxbackmatch.PlanMismatchError as e:
            assert "before fully_shard" in str(e)
        else:
            raise AssertionError("prepare on a sharded model must refuse")
        # the refused prepare left FSDP's state alone: the sharded model still trains
        x, y = data()[0]
        F.cross_entropy(net(x), y).backward()
        if rank == 0:
            torch.save({"refused": True}, f"{out}.0.pt")
        dist.barrier()
        dist.destroy_process_group()
        return
    elif mode in ("fsdp", "fsdp-local"):
        from torch.distributed.fsdp import fully_shard

        if mode == "fsdp-local":  # the known LARS-style failure: norms of the local shard only
            import fxbackmatch.runtime as rt

            rt.dist.all_reduce = lambda *a, **k: None

        plan = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False)  # before sharding
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fully_shard(m)
        fully_shard(net)
        train(net, plan, rank, world, log, length)
    else:
        plan = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False)
        train(net, plan, 0, 1, log, length)
    params = full_params(net)
    if rank == 0 or mode.startswith("ddp"):
        torch.save({"params": params, "scales": log, "sharded": plan._runtime.sharded}, f"{out}.{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, world, out, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if world == 1:
        main(0, 1, mode, out, port)
    else:
        import torch.multiprocessing as mp

        mp.spawn(main, args=(world, mode, out, port), nprocs=world, join=True)
