"""Time of ``prepare`` and of compiling the generated function (issues 2 and 7).

    python benchmarks/bench_prepare.py [--models vgg16-paper,vgg19,resnet152]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import fxbackmatch  # noqa: E402
from fxbackmatch.models import vgg_paper  # noqa: E402


def build(name: str):
    if name == "vgg16-paper":
        return vgg_paper(16), (128, 3, 32, 32)
    import torchvision

    return torchvision.models.get_model(name, weights=None), (2, 3, 224, 224)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vgg16-paper,vgg19,resnet152")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"# machine: {machine()}")
    for name in args.models.split(","):
        net, shape = build(name)
        x = torch.randn(shape)
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            plan = fxbackmatch.prepare(net, x, conventions="paper")  # as recorded in docs
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        plan.scale_tensor()  # first call compiles
        compile_s = time.perf_counter() - t
        n = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"{name:12s} {n:7.1f} M params, {len(plan.layers):4d} layers: prepare {statistics.median(times):.3f} s "
              f"(median of {args.reps}), compile {compile_s:.2f} s")


if __name__ == "__main__":
    main()
