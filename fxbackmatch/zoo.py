"""Sweep torchvision's classification models through ``prepare`` (the zoo table)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .analysis.conventions import Conventions
from .api import prepare
from .errors import FxBackmatchError

__all__ = ["ZooResult", "sweep_model", "scale_stats", "trains", "INPUT_SIZE", "BLOWUP"]

#: input side per model family (others: CIFAR's 32; AlexNet's pools need 63, inception_v3's
#: auxiliary head its own 299, MaxViT's partitions 224); weights are never downloaded. ViTs are
#: built for CIFAR's size (``image_size=32``: 4 patches of 16, 1 of 32; ViT-H/14 at 28: 4 of 14)
INPUT_SIZE = {"inception_v3": 299, "maxvit_t": 224, "vit_h_14": 28, "vit": 32, "swin": 64, "alexnet": 64}


@dataclass
class ZooResult:
    name: str
    outcome: str  # "ok" or the error class
    message: str
    covered: int
    total: int
    conv_linear_covered: bool
    prepare_s: float
    n_params_m: float
    lenient_covered: int | None = None  # scaled tensors with strict=False, when strict failed
    scale_min: float | None = None
    scale_median: float | None = None
    scale_max: float | None = None
    trains: str | None = None  # "ok" or why not (see :func:`trains`)
    seconds: float | None = None  # wall time of the whole sweep entry


def scale_stats(plan) -> tuple[float, float, float]:
    """Min, median and max of the plan's scales (scaled parameters only)."""
    vals = sorted(v for n, v in plan.scales().items() if n in plan.targets)
    return vals[0], vals[len(vals) // 2], vals[-1]


#: a loss this many times the first one means the run is diverging, not training
BLOWUP = 3.0


def trains(model: nn.Module, plan, batches, *, lr: float = 2e-3, momentum: float = 0.9) -> str:
    """20 (``len(batches)``) SGD-momentum steps with the plan attached: ``"ok"`` when every
    loss is finite, no loss exceeds :data:`BLOWUP` times the first, and no conv/linear weight
    moves more than its own norm in the first step (a zero-initialized weight — ViT's head —
    has no norm to compare with and is left out); otherwise what went wrong. ``batches`` are
    ``(x, y)`` pairs; the model is trained in place."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    handle = plan.attach(opt)
    watched = {n: m.weight for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight.requires_grad
               and bool(m.weight.detach().norm() > 0)}
    try:
        for step, (x, y) in enumerate(batches):
            before = {n: w.detach().clone() for n, w in watched.items()} if step == 0 else None
            opt.zero_grad(set_to_none=True)
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            elif not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
                out = out.logits
            loss = nn.functional.cross_entropy(out, y)
            if not torch.isfinite(loss):
                return f"loss {float(loss):.3g} at step {step + 1}"
            value = float(loss.detach())
            first = value if step == 0 else first
            if value > BLOWUP * first:
                return f"loss rose from {first:.3g} to {value:.3g} at step {step + 1}"
            loss.backward()
            opt.step()
            if before is not None:
                worst = max(
                    ((float((w - before[n]).norm() / before[n].norm().clamp_min(1e-12)), n) for n, w in watched.items()),
                    default=(0.0, ""),
                )
                if not worst[0] <= 1.0:
                    return f"'{worst[1]}' moved {worst[0]:.3g}× its norm in step 1"
    finally:
        handle.remove()
    return "ok"


def _input_side(name: str) -> int:
    for key, side in INPUT_SIZE.items():
        if name.startswith(key):
            return side
    return 32


#: extra builder arguments of zoo entries that are variants of a torchvision model
VARIANTS = {"resnet18(zero_init_residual=True)": ("resnet18", {"zero_init_residual": True})}


def build(name: str, num_classes: int = 10) -> nn.Module:
    """The model with ``weights=None`` and torchvision's own initialization (a ``num_classes``
    head: CIFAR-10's by default)."""
    import torchvision

    base, kw = VARIANTS.get(name, (name, {}))
    if base.startswith("vit"):
        kw = {**kw, "image_size": _input_side(base)}
    torch.manual_seed(0)
    return torchvision.models.get_model(base, weights=None, num_classes=num_classes, **kw)


def sweep_model(name: str, batches=None, conventions: str | Conventions = "default", *, model: nn.Module | None = None,
                side: int | None = None, **options) -> ZooResult:
    """Prepare ``name`` (torchvision's, or ``model`` at ``side``×``side`` if given; as
    ``options`` say, then with ``strict=False`` if that fails; ``conventions`` and ``options``
    go to ``prepare``), its scale statistics, and with ``batches`` (CIFAR-10 ``(x, y)`` pairs)
    whether it trains (:func:`trains`)."""
    model = build(name) if model is None else model
    side = _input_side(name) if side is None else side
    total = sum(1 for p in model.parameters() if p.requires_grad)
    n_m = sum(p.numel() for p in model.parameters()) / 1e6
    t = time.perf_counter()
    try:
        plan = prepare(model, torch.randn(2, 3, side, side), compile=False, conventions=conventions, **options)
    except FxBackmatchError as e:
        dt = time.perf_counter() - t
        lenient = prepare(model, torch.randn(2, 3, side, side), compile=False, strict=False, **options)
        _check_scales(name, lenient)
        return ZooResult(
            name, type(e).__name__, str(e).splitlines()[0], 0, total, False, dt, n_m, len(lenient.targets)
        )
    dt = time.perf_counter() - t
    _check_scales(name, plan)
    names = {id(p): n for n, p in model.named_parameters()}
    conv_lin = {names[id(m.weight)] for mn, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight.requires_grad}
    lo, med, hi = scale_stats(plan)
    how = None
    if batches is not None:
        if side != 32:
            batches = [(nn.functional.interpolate(x, size=(side, side), mode="bilinear"), y) for x, y in batches]
        how = trains(model, plan, batches)
    return ZooResult(
        name, "ok", "", len(plan.targets), total, conv_lin <= set(plan.targets), dt, n_m,
        scale_min=lo, scale_median=med, scale_max=hi, trains=how,
    )


def _check_scales(name: str, plan) -> None:
    scales = plan.scales()
    bad = [n for n in plan.targets if not (math.isfinite(scales[n]) and scales[n] > 0)]
    if bad:
        raise AssertionError(f"{name}: non-finite or non-positive scales for {bad[:5]}")
