"""How far a back-matching step moves each conv, and how much more its output moves than the
paper's isotropic-input model says (docs/zoo.md, Inception-v3).

One SGD-momentum step (lr 2e-3, the zoo's) with a default plan on a real CIFAR-10 batch of 16,
resized to ``--side``. Per conv (groups 1): ``rel`` = ‖ΔW‖/‖W‖, and the coherence

    ρ = ‖ΔW ∗ X‖² / (‖ΔW‖² · E[x²] · P)

where ``X`` is the conv's input on that batch and ``P`` the output positions times the batch:
1 where the inputs are isotropic (``E[xxᵀ] = E[x²]·I``, what the back-matching factors assume),
larger where the step lines up with the inputs' top directions — a gradient ``δXᵀ`` always does
some, most where one gradient is replicated over many positions (a global average pool). Then the
losses of three steps, with the scales of the weights of every conv/linear (``--at-one weights``)
or of every other parameter (``--at-one others``) set to 1, or each conv's divided by its ρ over
the median ρ (``--at-one rho``, measured on the plain gradient at init).

    python benchmarks/step_coherence.py --model inception_v3 --side 299
    python benchmarks/step_coherence.py --model inception_v3 --side 299 --at-one weights
    python benchmarks/step_coherence.py --model resnet50 --side 224
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from zoo_sweep import cifar_batches  # noqa: E402

import fxbackmatch  # noqa: E402
from fxbackmatch.zoo import build  # noqa: E402


def logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def coherence(model: nn.Module, plan, x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, float, str, tuple]]:
    """``(ρ, rel, conv, output map)`` per conv that moved, after one attached SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9)
    handle = plan.attach(opt)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in convs.items()]
    before = {n: m.weight.detach().clone() for n, m in convs.items()}
    F.cross_entropy(logits(model(x)), y).backward()
    opt.step()
    for h in hooks:
        h.remove()
    handle.remove()
    rows = []
    with torch.no_grad():
        for n, m in convs.items():
            dw, xin = m.weight - before[n], inputs[n]
            if not float(dw.norm()) > 0:
                continue  # no gradient reached it (an auxiliary head the loss does not read)
            dy = F.conv2d(xin, dw, None, m.stride, m.padding, m.dilation)
            positions = dy.shape[0] * dy.shape[2] * dy.shape[3]
            rho = float(dy.square().sum() / (dw.square().sum() * xin.square().mean() * positions))
            if math.isfinite(rho):
                rows.append((rho, float(dw.norm() / before[n].norm()), n, tuple(dy.shape[2:])))
    return sorted(rows, reverse=True)


def gradient_rho(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """ρ of each conv weight's plain gradient on ``(x, y)`` (the direction of its first step)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in convs.items()]
    model.zero_grad()
    F.cross_entropy(logits(model(x)), y).backward()
    for h in hooks:
        h.remove()
    out = {}
    with torch.no_grad():
        for n, m in convs.items():
            g = m.weight.grad
            if g is None or not float(g.norm()) > 0:
                continue
            dy = F.conv2d(inputs[n], g, None, m.stride, m.padding, m.dilation)
            rho = float(dy.square().sum() / (g.square().sum() * inputs[n].square().mean()
                                             * dy.shape[0] * dy.shape[2] * dy.shape[3]))
            if math.isfinite(rho) and rho > 0:
                out[f"{n}.weight"] = rho
    model.zero_grad()
    return out


def losses(model: nn.Module, plan, batches, at_one: str) -> list[float]:
    """Three SGD-momentum steps with the plan's scales, those of ``at_one`` set to 1 (``rho``:
    each conv weight's scale divided by its ρ at init over the median ρ)."""
    opt = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9)
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    params = dict(model.named_parameters())
    rho = gradient_rho(model, *batches[0]) if at_one == "rho" else {}
    median = sorted(rho.values())[len(rho) // 2] if rho else 1.0
    out = []
    for x, y in batches[:3]:
        opt.zero_grad()
        loss = F.cross_entropy(logits(model(x)), y)
        loss.backward()
        scales = plan.scales()
        with torch.no_grad():
            for n, s in scales.items():
                p = params.get(n)
                if p is None or p.grad is None:
                    continue
                one = (n in weights) if at_one == "weights" else (n not in weights) if at_one == "others" else False
                p.grad.mul_(1.0 if one else s * median / rho.get(n, median))
        opt.step()
        out.append(float(loss))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="inception_v3")
    ap.add_argument("--side", type=int, default=299)
    ap.add_argument("--at-one", choices=("none", "weights", "others", "rho"), default="none",
                    help="whose scales are 1 in the three steps (rho: each conv's divided by its ρ over the median)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.npz"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    batches = [(F.interpolate(x, size=args.side, mode="bilinear"), y) for x, y in cifar_batches(args.data)[:3]]
    print(f"# machine: {machine()}; {args.model} at {args.side}×{args.side}, batch {len(batches[0][1])}")
    model = build(args.model).train()
    plan = fxbackmatch.prepare(model, batches[0][0][:2])
    rows = coherence(model, plan, *batches[0])
    print(f"{len(rows)} convs moved; median ρ {rows[len(rows) // 2][0]:.1f}")
    for rho, rel, n, hw in sorted(rows, key=lambda r: -r[1])[:8]:
        print(f"  rel {rel:6.3f}  ρ {rho:7.1f}  {n}  map {hw[0]}×{hw[1]}")
    model = build(args.model).train()  # the same initial weights
    plan = fxbackmatch.prepare(model, batches[0][0][:2])
    what = "scales over ρ/median ρ" if args.at_one == "rho" else f"scales of '{args.at_one}' at 1"
    print(f"losses, {what}:", " → ".join(f"{v:.3f}" for v in losses(model, plan, batches, args.at_one)))


if __name__ == "__main__":
    main()
