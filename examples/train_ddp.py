"""Back-matching with DistributedDataParallel (CPU/gloo or CUDA/nccl).

    torchrun --nproc-per-node 2 examples/train_ddp.py --steps 20

Every rank computes the same scales from the same (replicated) weights, so nothing extra is
communicated: the plan sees through the DDP wrapper to the user's parameter names.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.models import lenet_bn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.02)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # same initial weights on every rank
    net = lenet_bn().to(dev)
    if world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if cuda else net
    model = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if cuda else None)
    plan = fxbackmatch.prepare(model)  # completes on the first forward call
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    plan.attach(opt, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1234 + rank)  # each rank its own shard of synthetic data
    for step in range(args.steps):
        x = torch.randn(32, 3, 32, 32, generator=g).to(dev)
        y = torch.randint(0, 10, (32,), generator=g).to(dev)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if rank == 0:
        print(plan)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
