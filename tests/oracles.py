"""Independent oracles for the tests: the paper's closed forms and a plain per-layer loop."""
from __future__ import annotations

import torch
from torch import nn


def rown(w: torch.Tensor, floor: bool = False) -> float:
    """||W||²_{2,μ}: mean squared row norm (rows = output units); with ``floor``, ``sum(W²)``
    counts at least ``out/3`` (the default conventions' ``floor="init"``)."""
    w = w.detach().double()
    sq = float(w.pow(2).sum())
    return (max(sq, w.shape[0] / 3) if floor else sq) / w.shape[0]


def coln(w: torch.Tensor, groups: int = 1, floor: bool = False) -> float:
    """||Wᵀ||²_{2,μ}: mean squared column norm (columns = input units / channels); ``floor`` as
    in :func:`rown`."""
    w = w.detach().double()
    sq = float(w.pow(2).sum())
    return (max(sq, w.shape[0] / 3) if floor else sq) / (w.shape[1] * groups)


def lenet_closed_form(net: nn.Sequential) -> dict[str, float]:
    """Supplementary material (with ERRATA item 2) for LeNet-BN on 32×32 input."""
    cv1, cv2, fc1, fc2, fc3 = net[0].weight, net[4].weight, net[9].weight, net[12].weight, net[15].weight
    return {
        "15.weight": 1.0,
        "12.weight": rown(fc2) / coln(fc3),
        "9.weight": rown(fc2) * rown(fc1) / (coln(fc3) * coln(fc2)),
        "4.weight": rown(fc2) * rown(fc1) * rown(cv2) / (25 * coln(fc3) * coln(fc2) * coln(fc1)),
        "0.weight": rown(fc2) * rown(fc1) * rown(cv2) * rown(cv1)
        / (25 * coln(fc3) * coln(fc2) * coln(fc1) * coln(cv2)),
    }


def lenet_closed_form_m(net: nn.Sequential) -> dict[str, float]:
    """The backward factor ``m`` at each weighted layer's output of LeNet-BN, as the
    supplementary material prints it step by step (``m ← m·‖Wᵀ‖²`` through a layer,
    ``m ← m/‖W_below‖²`` through a BN, ``/c`` with ``c = 196/25`` through cv2)."""
    cv2, fc1, fc2, fc3 = net[4].weight, net[9].weight, net[12].weight, net[15].weight
    at_cv2 = coln(fc3) * coln(fc2) * coln(fc1) / (rown(fc2) * rown(fc1) * rown(cv2))
    return {
        "15": 1.0,
        "12": coln(fc3) / rown(fc2),
        "9": coln(fc3) * coln(fc2) / (rown(fc2) * rown(fc1)),
        "4": at_cv2,
        "0": at_cv2 * coln(cv2) / (196 / 25) / rown(net[0].weight),
    }


def sequential_loop(net: nn.Sequential, hw: int) -> dict[str, float]:
    """Algorithm 1 by hand for a Sequential of conv3×3(pad 1)/BN/ReLU/MaxPool2d(2)/Flatten/Linear
    on hw×hw input: a forward sweep records spatial sizes, a backward sweep the factors."""
    mods = list(net.named_children())
    # forward sweep: spatial size at each module's output
    size = hw
    out_size = {}
    for name, m in mods:
        if isinstance(m, nn.MaxPool2d):
            size //= 2
        out_size[name] = size
    # for each conv: locations carrying gradient = spatial size after the pools that follow
    # before the next weighted layer
    s = {}
    for i, (name, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            loc = out_size[name]
            for name2, m2 in mods[i + 1:]:
                if isinstance(m2, (nn.Conv2d, nn.Linear)):
                    break
                if isinstance(m2, nn.MaxPool2d):
                    loc = out_size[name2]
            s[name] = loc * loc
        elif isinstance(m, nn.Linear):
            s[name] = 1
    in_size = {}
    size = hw
    for name, m in mods:
        in_size[name] = size
        size = out_size[name]
    m_fac = 1.0
    scales = {}
    for i in range(len(mods) - 1, -1, -1):
        name, m = mods[i]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            scales[f"{name}.weight"] = 1.0 / (m_fac * s[name])
            if isinstance(m, nn.Linear):
                m_fac *= coln(m.weight)
            else:
                c = in_size[name] ** 2 / s[name]
                m_fac *= coln(m.weight) / c
        elif isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.BatchNorm1d):
            below = next(mm for _, mm in reversed(mods[:i]) if isinstance(mm, (nn.Conv2d, nn.Linear)))
            m_fac /= rown(below.weight)
    return scales
