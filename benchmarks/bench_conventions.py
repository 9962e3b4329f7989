"""What the default conventions cost per training step, against the paper's set and plain SGD:
forward, backward, ``optimizer.step()`` with the plan attached (``attach``), interleaved in one
process. The default set measures averaged moments on the live batch every ``refresh`` steps
(one extra forward) and multiplies the scales by the batch's span each step; the paper's set
does neither.

    python benchmarks/bench_conventions.py                      # ResNet-18 (CIFAR), batch 64
    python benchmarks/bench_conventions.py --models resnet18,vit --steps 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import fxbackmatch  # noqa: E402


def build(name: str):
    import torchvision

    if name == "vit":
        return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=4,
                                                    hidden_dim=128, mlp_dim=256, num_classes=10)
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def bench(name: str, batch: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    runs = {}
    for kind in ("sgd", "paper", "default"):
        torch.manual_seed(0)
        net = build(name)
        opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
        if kind != "sgd":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = fxbackmatch.prepare(net, x[:2], conventions=kind)
            plan.attach(opt)
        runs[kind] = (net, opt)

    def step(kind: str) -> float:
        net, opt = runs[kind]
        t = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    for kind in runs:  # compile, first refresh
        step(kind)
        step(kind)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(steps):  # interleaved: one step of each, `steps` times
        for kind in runs:
            times[kind].append(step(kind))
    # the mean, not the median: a refresh every K steps is part of the cost
    return {k: statistics.fmean(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="interleaved steps of each (a multiple of refresh=10)")
    args = ap.parse_args()
    print(f"# machine: {machine()}, batch {args.batch}, {args.steps} interleaved steps each, mean per step")
    for name in args.models.split(","):
        r = bench(name, args.batch, args.steps)
        print(f"\n## {name}")
        for k, v in r.items():
            print(f"{k:8s} {v * 1e3:8.1f} ms")
        print(f"paper / sgd   : {r['paper'] / r['sgd']:.3f}")
        print(f"default / sgd : {r['default'] / r['sgd']:.3f}")
        print(f"default / paper: {r['default'] / r['paper']:.3f}")


if __name__ == "__main__":
    main()
