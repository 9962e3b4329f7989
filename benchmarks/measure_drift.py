"""Rule ``m`` against measured ``m`` (mean diag JᵀJ by autograd) on real networks at init.

    python benchmarks/measure_drift.py [--probes 16] [--batch 128]

For each net: the ratio rule/measured at every weighted layer's output, bottom → top, in
four settings that take the paper's approximations apart:

* ``default``   — the rules as shipped, real ReLUs, train-mode BN;
* ``measured``  — ``variance="measured"``: BN's Var[a] from running_var (warmed on 20 batches),
  i.e. the variance approximation Var[a] ≈ ||W||²row·E[a²] taken out;
* ``linear``    — every ReLU replaced by the identity (the paper's own linearization: its
  ReLU rule is the identity), default rules;
* ``linear+measured`` — both;
* ``relu=exact``— the rules with ``relu="exact"`` (half of the units carry gradient,
  ``Var[relu(z)] = (1/2 − 1/2π)``), real ReLUs.

Writes nothing; prints a markdown table per net for docs/derivations.md.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import fxbackmatch  # noqa: E402
from fxbackmatch import Conventions  # noqa: E402
from fxbackmatch.models import lenet_bn, vgg_paper  # noqa: E402


def resnet50_paper():
    import torchvision

    net = torchvision.models.resnet50(weights=None, num_classes=10)
    return net


def linearize(net: nn.Module) -> nn.Module:
    net = copy.deepcopy(net)
    for mod in list(net.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, (nn.ReLU, nn.SiLU)):
                setattr(mod, name, nn.Identity())
    return net


def warm(net: nn.Module, batches) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for x in batches:
            net(x)


def ratios(net, x, probes, **kw) -> list[tuple[str, float]]:
    kw.setdefault("conventions", "paper")  # docs/derivations.md's drift tables: the paper's set unless told
    plan = fxbackmatch.prepare(net, x[:2], compile=False, **kw)
    return [(r["layer"], r["ratio"]) for r in plan.measure(x, probes=probes)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.npz"))
    ap.add_argument("--nets", default="lenet,vgg16,resnet50,efficientnet_b0")
    ap.add_argument("--columns", default="default,measured,linear,linear+measured,relu=exact")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    pass  # threads: OMP_NUM_THREADS
    from fxbackmatch.train.data import load_npz

    data = load_npz(args.data, subset=21 * args.batch)
    xs = [data.normalize(data.train_x[i * args.batch:(i + 1) * args.batch]) for i in range(21)]
    x = xs[-1]
    import torchvision

    builders = {"lenet": lenet_bn, "vgg16": lambda: vgg_paper(16), "resnet50": resnet50_paper,
                "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10)}
    print(f"# {machine()}, batch {args.batch}, {args.probes} Rademacher probes, CIFAR-10 training images")
    for name in args.nets.split(","):
        torch.manual_seed(0)
        net = builders[name]()
        lin = linearize(net)
        warm(net, xs[:20])
        warm(lin, xs[:20])
        settings = {
            "default": lambda: ratios(net, x, args.probes),
            "measured": lambda: ratios(net, x, args.probes, conventions=Conventions(variance="measured")),
            "linear": lambda: ratios(lin, x, args.probes),
            "linear+measured": lambda: ratios(lin, x, args.probes, conventions=Conventions(variance="measured")),
            "relu=exact": lambda: ratios(net, x, args.probes, conventions=Conventions(relu="exact")),
        }
        cols = {c: settings[c]() for c in args.columns.split(",")}
        print(f"\n## {name}: rule m / measured m at each weighted layer, bottom → top\n")
        print("| layer | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        layers = [l for l, _ in next(iter(cols.values()))]
        for i, l in enumerate(layers):
            print(f"| {l} | " + " | ".join(f"{cols[c][i][1]:.3g}" for c in cols) + " |")
        geo = {c: math.exp(sum(math.log(r) for _, r in v) / len(v)) for c, v in cols.items()}
        print("| geometric mean | " + " | ".join(f"{geo[c]:.3g}" for c in cols) + " |")


if __name__ == "__main__":
    main()
