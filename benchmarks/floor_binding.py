"""How often the reference floor binds while the paper's nets train (issue 21).

    python benchmarks/floor_binding.py [--model lenet-bn] [--epochs 3] [--subset 10000]

Trains with the default conventions (back-matching, SGD-momentum, the paper's rate and weight
decay) and, at every step, compares each floored weight's ``sum(W²)`` with its floor
(``numel·v₀``: ``shape[0]/3`` for Linear/Conv). Prints, per layer, the share of steps where the
floor binds and how far below it the weight was (``sum(W²)/floor``, min over the run), and how
much the binding moved the scales (max ratio floored / unfloored scale).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import fxbackmatch  # noqa: E402
from fxbackmatch.train.config import build_model  # noqa: E402
from fxbackmatch.train.data import load_npz  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet-bn")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.npz"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = load_npz(args.data, subset=args.subset)
    net = build_model(args.model, 10, args.width)
    x0 = data.normalize(data.train_x[:2])
    plan = fxbackmatch.prepare(net, x0, compile=False)  # the default conventions: floor="init"
    nofloor = fxbackmatch.prepare(net, x0, compile=False, conventions=plan.conventions.replace(floor="none"))
    gen = plan._runtime.gen
    lo = gen.constants["lo"][: len(gen.weight_refs)].tolist()
    params = dict(net.named_parameters())
    floors = {r: f for r, f in zip(gen.weight_refs, lo) if f > 1e-11}
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    plan.attach(opt, weight_decay=args.wd)
    bind = {r: 0 for r in floors}
    worst = {r: float("inf") for r in floors}
    moved = 1.0
    steps, t0 = 0, time.perf_counter()
    n = len(data.train_y)
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n - 127, 128):
            idx = perm[i:i + 128]
            x, y = data.normalize(data.train_x[idx]), data.train_y[idx]
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            for r, f in floors.items():
                q = float(params[r].detach().double().square().sum()) / f
                worst[r] = min(worst[r], q)
                bind[r] += q < 1.0
            if steps % 20 == 0:
                a, b = plan.scale_tensor(), nofloor.scale_tensor()
                moved = max(moved, float((a / b).max()), float((b / a).max()))
            opt.step()
            steps += 1
    print(f"# {args.model}, {args.epochs} epochs × {n} images, batch 128, lr {args.lr}, wd {args.wd}, "
          f"{steps} steps, {time.perf_counter() - t0:.0f} s, {machine()}")
    print("| weight | floor (shape[0]/3) | steps where it binds | min sum(W²)/floor |")
    print("|---|---:|---:|---:|")
    for r, f in floors.items():
        print(f"| {r} | {f:.3g} | {bind[r] / steps:.1%} | {worst[r]:.3f} |")
    print(f"largest change of any scale by the floor (every 20 steps): {moved:.4f}×")


if __name__ == "__main__":
    main()
