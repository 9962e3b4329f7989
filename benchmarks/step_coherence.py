"""How far a back-matching step moves each conv, and how much more its output moves than the
paper's isotropic-input model says (docs/zoo.md, Inception-v3).

One SGD-momentum step (lr 2e-3, the zoo's) with a default plan on a real CIFAR-10 batch of 16,
resized to ``--side``. Per conv (groups 1): ``rel`` = ‖ΔW‖/‖W‖, and the coherence

    ρ = ‖ΔW ∗ X‖² / (‖ΔW‖² · E[x²] · P)

where ``X`` is the conv's input on that batch and ``P`` the output positions times the batch:
1 where the inputs are isotropic (``E[xxᵀ] = E[x²]·I``, what the back-matching factors assume;
a little less on small maps, where zero padding empties taps), larger where the step lines up
with the inputs' top directions — a gradient ``δXᵀ`` always does some, most where one gradient
is replicated over many positions (a global average pool). Then the losses of ``--steps`` steps
(3; the zoo's test: 20) at ``--lr`` (2e-3) with the plan's scales as they are, or a
``--variant``: the conv/linear weights' at 1 (``weights-at-one``), every other parameter's at 1
(``others-at-one``), each conv weight's divided by its ρ at init over the median ρ (``rho``),
every scale below the head divided by the global pool's coherence χ = P·E[ȳ²]/E[y²] on the
step's batch (``pool``: 1 for P uncorrelated zero-mean positions, P for identical ones), or
every scale 1: plain SGD (``ones``).

    python benchmarks/step_coherence.py --model inception_v3 --side 299
    python benchmarks/step_coherence.py --model inception_v3 --side 299 --variant weights-at-one
    python benchmarks/step_coherence.py --model resnet18 --side 224 --variant pool --steps 20
    python benchmarks/step_coherence.py --model resnet50 --side 224
    python benchmarks/step_coherence.py --model inception_v3 --side 299 --variant ones --lr 0.1 --steps 20
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


@torch.no_grad()
def rho_of(conv: nn.Conv2d, direction: torch.Tensor, x: torch.Tensor) -> float:
    """ρ of moving ``conv``'s weight along ``direction`` on its input ``x`` (NaN for a zero one)."""
    dy = F.conv2d(x, direction, None, conv.stride, conv.padding, conv.dilation)
    positions = dy.shape[0] * dy.shape[2] * dy.shape[3]
    return float(dy.square().sum() / (direction.square().sum() * x.square().mean() * positions))


def backward_with_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
    """The convs (groups 1) by name, and each one's input on ``(x, y)``, after the loss's backward."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in convs.items()]
    try:
        F.cross_entropy(logits(model(x)), y).backward()
    finally:
        for h in hooks:
            h.remove()
    return convs, inputs


def coherence(model: nn.Module, plan, x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, float, str, tuple]]:
    """``(ρ, rel, conv, output map)`` per conv that moved, after one attached SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9)
    handle = plan.attach(opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    convs, inputs = backward_with_inputs(model, x, y)
    opt.step()
    handle.remove()
    rows = []
    for n, m in convs.items():
        w0 = before[f"{n}.weight"]
        dw = m.weight.detach() - w0
        if not float(dw.norm()) > 0:
            continue  # no gradient reached it (an auxiliary head the loss does not read)
        rho = rho_of(m, dw, inputs[n])
        if math.isfinite(rho):
            out_hw = F.conv2d(inputs[n][:1], dw, None, m.stride, m.padding, m.dilation).shape[2:]
            rows.append((rho, float(dw.norm() / w0.norm()), n, tuple(out_hw)))
    return sorted(rows, reverse=True)


def gradient_rho(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """ρ of each conv weight's plain gradient on ``(x, y)`` (the direction of its first step)."""
    model.zero_grad()
    convs, inputs = backward_with_inputs(model, x, y)
    out = {}
    for n, m in convs.items():
        g = m.weight.grad
        rho = rho_of(m, g, inputs[n]) if g is not None else math.nan
        if math.isfinite(rho) and rho > 0:
            out[f"{n}.weight"] = rho
    model.zero_grad()
    return out


class PoolCoherence:
    """``χ = P·E[ȳ²]/E[y²]`` at the model's last global average pool (an ``AdaptiveAvgPool2d``
    to 1×1, the one under the head in torchvision's models) on each forward: 1 for ``P``
    uncorrelated zero-mean positions, ``P`` for identical ones; 1 without such a pool."""

    def __init__(self, model: nn.Module):
        self.chi = 1.0
        pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
        if pools:
            pools[-1].register_forward_hook(self._hook)

    def _hook(self, mod, args, out) -> None:
        y = args[0].detach()
        self.chi = y.shape[2] * y.shape[3] * float(out.detach().square().mean() / y.square().mean().clamp_min(1e-30))


VARIANTS = ("plan", "weights-at-one", "others-at-one", "rho", "pool", "ones")


def losses(model: nn.Module, plan, batches, variant: str, lr: float = 2e-3) -> tuple[list[float], tuple[float, str], float]:
    """SGD-momentum steps at ``lr`` over ``batches`` with the plan's scales as ``variant`` says:
    as they are; the conv/linear weights' at 1; every other parameter's at 1; each conv
    weight's divided by its ρ at init over the median ρ (``rho``); every scale but the
    ``nn.Linear`` layers' divided by the step's pool coherence χ (``pool``: for nets whose only
    Linear layers are the head, as ResNet's and Inception's; a Linear in the trunk, ConvNeXt's
    or Swin's, would wrongly keep its scale); every scale 1, plain SGD (``ones``).
    Returns the losses, the step-1 largest ‖ΔW‖/‖W‖ of a conv/linear weight and step 1's χ."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    params = dict(model.named_parameters())
    rho = gradient_rho(model, *batches[0]) if variant == "rho" else {}
    median = sorted(rho.values())[len(rho) // 2] if rho else 1.0
    pools = PoolCoherence(model)
    head = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    head = {f"{n}.{k}" for n in head for k in ("weight", "bias")} if variant == "pool" else set()
    out, worst, chi = [], (0.0, ""), 1.0
    for step, (x, y) in enumerate(batches):
        first = {n: params[n].detach().clone() for n in weights if n in params} if step == 0 else None
        opt.zero_grad()
        loss = F.cross_entropy(logits(model(x)), y)
        loss.backward()
        scales = plan.scales()
        with torch.no_grad():
            for n, s in scales.items():
                p = params.get(n)
                if p is None or p.grad is None:
                    continue
                if (variant == "ones" or variant == "weights-at-one" and n in weights
                        or variant == "others-at-one" and n not in weights):
                    s = 1.0
                elif variant == "rho":
                    s = s * median / rho.get(n, median)
                elif variant == "pool" and n not in head:
                    s = s / pools.chi
                p.grad.mul_(s)
        opt.step()
        out.append(float(loss))
        if first is not None:
            chi = pools.chi
            worst = max((float((params[n] - w).norm() / w.norm()), n) for n, w in first.items() if float(w.norm()) > 0)
    return out, worst, chi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="inception_v3")
    ap.add_argument("--side", type=int, default=299)
    ap.add_argument("--variant", choices=VARIANTS, default="plan", help="the scales of the loss run (see losses())")
    ap.add_argument("--steps", type=int, default=3, help="steps of the loss run (the zoo's test: 20)")
    ap.add_argument("--lr", type=float, default=2e-3, help="the loss run's rate (the zoo's: 2e-3)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.npz"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    batches = [(F.interpolate(x, size=args.side, mode="bilinear"), y) for x, y in cifar_batches(args.data)[:args.steps]]
    print(f"# machine: {machine()}; {args.model} at {args.side}×{args.side}, batch {len(batches[0][1])}")
    model = build(args.model).train()
    plan = fxbackmatch.prepare(model, batches[0][0][:2])
    rows = coherence(model, plan, *batches[0])
    print(f"{len(rows)} convs moved; median ρ {rows[len(rows) // 2][0]:.1f}")
    for rho, rel, n, hw in sorted(rows, key=lambda r: -r[1])[:8]:
        print(f"  rel {rel:6.3f}  ρ {rho:7.1f}  {n}  map {hw[0]}×{hw[1]}")
    model = build(args.model).train()  # the same initial weights
    plan = fxbackmatch.prepare(model, batches[0][0][:2])
    values, worst, chi = losses(model, plan, batches, args.variant, args.lr)
    print(f"variant '{args.variant}', lr {args.lr:g}: step-1 χ {chi:.1f}, largest move {worst[0]:.3f} ({worst[1]}); losses",
          " → ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
