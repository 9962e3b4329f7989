"""Sweep torchvision's classification models through ``prepare`` (the zoo table)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .api import prepare
from .errors import FxBackmatchError

__all__ = ["ZooResult", "sweep_model", "INPUT_SIZE"]

#: input side per model family (others: 64); weights are never downloaded
INPUT_SIZE = {"inception_v3": 299, "maxvit_t": 224, "vit": 224, "swin": 64}


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


def _input_side(name: str) -> int:
    for key, side in INPUT_SIZE.items():
        if name.startswith(key):
            return side
    return 64


def build(name: str) -> nn.Module:
    """The model with ``weights=None`` and torchvision's own initialization."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None)


def sweep_model(name: str) -> ZooResult:
    model = build(name)
    side = _input_side(name)
    total = sum(1 for p in model.parameters() if p.requires_grad)
    n_m = sum(p.numel() for p in model.parameters()) / 1e6
    t = time.perf_counter()
    try:
        plan = prepare(model, torch.randn(2, 3, side, side), compile=False)
    except FxBackmatchError as e:
        dt = time.perf_counter() - t
        lenient = prepare(model, torch.randn(2, 3, side, side), compile=False, strict=False)
        _check_scales(name, lenient)
        return ZooResult(
            name, type(e).__name__, str(e).splitlines()[0], 0, total, False, dt, n_m, len(lenient.targets)
        )
    dt = time.perf_counter() - t
    _check_scales(name, plan)
    names = {id(p): n for n, p in model.named_parameters()}
    conv_lin = {names[id(m.weight)] for mn, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight.requires_grad}
    return ZooResult(
        name, "ok", "", len(plan.targets), total, conv_lin <= set(plan.targets), dt, n_m
    )


def _check_scales(name: str, plan) -> None:
    scales = plan.scales()
    bad = [n for n in plan.targets if not (math.isfinite(scales[n]) and scales[n] > 0)]
    if bad:
        raise AssertionError(f"{name}: non-finite or non-positive scales for {bad[:5]}")
