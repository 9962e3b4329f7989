"""Adam and the step-length mode (issue 12): what each mode does to Adam's per-layer steps,
and what the mode costs per step.

Part 1 — trajectories. LeNet-BN, 30 steps on real CIFAR-10 batches (batch 64), from one
init, with: plain Adam (lr 1e-3); Adam with a gradient rescale (``attach()``, the default
mode — cancelled by Adam's normalization); Adam in the step-length mode (``mode="length"``)
at the same lr and at back-matching's SGD rate. Prints each layer's total change
``‖W₃₀ − W₀‖`` and its ratio to plain Adam's, beside the layer's scale at init.

Part 2 — cost. Median time of the mode's two hooks (snapshot before, rescale after)
against the Adam (foreach) step alone, same process, interleaved.

    python benchmarks/adaptive_mode.py
    python benchmarks/adaptive_mode.py --cost-models vgg16 resnet50
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timeit  # noqa: E402

import fxbackmatch  # noqa: E402
from fxbackmatch.models import lenet_bn, vgg_paper  # noqa: E402
from fxbackmatch.train.data import load_npz  # noqa: E402

STEPS, BATCH = 30, 64


def batches(path: str):
    data = load_npz(path, subset=STEPS * BATCH)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.train_y), generator=g)[: STEPS * BATCH].view(STEPS, BATCH)
    return [(data.normalize(data.train_x[i]), data.train_y[i]) for i in idx]


def trajectory(data, mode: str | None, lr: float, init) -> dict[str, float]:
    net = lenet_bn()
    net.load_state_dict(init)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    if mode is not None:
        plan = fxbackmatch.prepare(net, data[0][0][:2], compile=False, conventions="paper")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxbackmatch.AdaptiveOptimizerWarning)
            plan.attach(opt, mode=mode)
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    out = {n: float((p.detach() - w0[n]).double().norm()) for n, p in net.named_parameters()}
    out["loss"] = float(loss)
    return out


def part1(path: str) -> None:
    data = batches(path)
    torch.manual_seed(0)
    init = lenet_bn().state_dict()
    net = lenet_bn()
    net.load_state_dict(init)
    scales = fxbackmatch.prepare(net, data[0][0][:2], compile=False, conventions="paper").scales()
    runs = {
        "adam": trajectory(data, None, 1e-3, init),
        "grad": trajectory(data, "grad", 1e-3, init),
        "length@1e-3": trajectory(data, "length", 1e-3, init),
        "length@2e-2": trajectory(data, "length", 2e-2, init),
    }
    print(f"\nLeNet-BN, {STEPS} Adam steps, batch {BATCH}, real CIFAR-10; ‖W_T − W_0‖ and ratio to plain Adam")
    head = f"{'layer':10} {'scale@init':>10} {'adam':>9} " + " ".join(f"{k:>20}" for k in list(runs)[1:])
    print(head)
    for n in scales:
        base = runs["adam"][n]
        cells = " ".join(f"{runs[k][n]:9.4f} ({runs[k][n] / base:6.3f}×)" for k in list(runs)[1:])
        print(f"{n:10} {scales[n]:10.3f} {base:9.4f} {cells}")
    print("final loss: " + ", ".join(f"{k} {v['loss']:.3f}" for k, v in runs.items()))


def build(name: str):
    if name == "vgg16":
        return vgg_paper(16)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=10)


def part2(models: list[str], reps: int) -> None:
    print(f"\nCost of the step-length mode per step (median of {reps}), against Adam's foreach step alone")
    print(f"{'model':10} {'params M':>8} {'adam ms':>9} {'mode ms':>9} {'ratio':>6}")
    for name in models:
        torch.manual_seed(0)
        net = build(name)
        x = torch.randn(8, 3, 32, 32)
        plan = fxbackmatch.prepare(net, x[:2], conventions="paper")
        F.cross_entropy(net(x), torch.randint(0, 10, (8,))).backward()
        params = [p for p in net.parameters() if p.grad is not None]
        opt = torch.optim.Adam(params, lr=1e-9, foreach=True)
        opt.step()
        handle = plan.attach(torch.optim.Adam(params, lr=1e-9, foreach=True), mode="length")
        handle.optimizer.step()  # compile, state
        t_adam = timeit(opt.step, None, reps)

        def hooks():
            handle._pre_step(handle.optimizer, (handle.optimizer,), {})
            handle._post_step(handle.optimizer, (handle.optimizer,), {})

        t_mode = timeit(hooks, None, reps)
        n = sum(p.numel() for p in params) / 1e6
        print(f"{name:10} {n:8.1f} {t_adam * 1e3:9.1f} {t_mode * 1e3:9.1f} {t_mode / t_adam:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.npz"))
    ap.add_argument("--cost-models", nargs="*", default=["vgg16", "resnet50"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-trajectories", action="store_true")
    args = ap.parse_args()
    print(machine())
    if not args.skip_trajectories:
        part1(args.data)
    if args.cost_models:
        part2(args.cost_models, args.reps)


if __name__ == "__main__":
    main()
