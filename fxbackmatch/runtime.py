"""The per-step runtime around the generated factor function: read the norms (one
``torch._foreach_norm`` per group), run the (compiled) factors, multiply the gradients in
place (``torch._foreach_mul_`` grouped by device and dtype). No ``.item()``, no host sync.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import nn

from .codegen import GeneratedFactors

__all__ = ["Runtime"]


def _sq_norms(tensors: Sequence[torch.Tensor], device: torch.device, ord: int = 2) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    if len(groups) == 1:
        norms = torch._foreach_norm(list(tensors), ord)
        out = torch.stack(norms).to(device=device, dtype=torch.float64)
    else:
        out = torch.empty(len(tensors), dtype=torch.float64, device=device)
        for idx in groups.values():
            norms = torch._foreach_norm([tensors[i] for i in idx], ord)
            out[torch.tensor(idx, device=device)] = torch.stack(norms).to(device=device, dtype=torch.float64)
    return out * out if ord == 2 else out


class Runtime:
    """Holds references (never copies) to the tensors the generated function reads."""

    def __init__(
        self,
        gen: GeneratedFactors,
        params: dict[str, nn.Parameter],
        buffers: dict[str, torch.Tensor],
        targets: list[str],
        compile: bool,
    ) -> None:
        self.gen = gen
        self.compile = compile
        self.weights = [params[r] for r in gen.weight_refs]
        self.grad_params = [params[r] for r in gen.grad_refs]
        self.stat_refs = list(gen.stat_refs)
        self.buffers = buffers
        self.targets = [params[t] for t in targets]
        self._fn = None
        self._consts: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def fn(self):
        if self._fn is None:
            if self.compile:
                self._fn = torch.compile(self.gen.fn, fullgraph=True, dynamic=False)
            else:
                self._fn = self.gen.fn
        return self._fn

    def device(self) -> torch.device:
        for t in self.targets or self.weights:
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def scales(self) -> torch.Tensor:
        """float64 scales of the targets, on the parameters' device."""
        dev = self.device()
        wsq = _sq_norms(self.weights, dev)
        zero = torch.zeros((), device=dev)
        grads = [p.grad if p.grad is not None else zero for p in self.grad_params]
        gsq = _sq_norms(grads, dev)
        stats = [self.buffers[r] for r in self.stat_refs]
        if stats:
            sums = _sq_norms(stats, dev, ord=1)  # running_var ≥ 0: L1 norm is the sum
            numel = torch.tensor([float(s.numel()) for s in stats], dtype=torch.float64, device=dev)
            st = sums / numel
        else:
            st = torch.zeros(0, dtype=torch.float64, device=dev)
        consts = self._consts.get(dev)
        if consts is None:
            consts = self._consts[dev] = self.gen.constants_on(dev)
        return self.fn(wsq, gsq, st, consts)

    @torch.no_grad()
    def rescale_(self) -> torch.Tensor:
        scales = self.scales()
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(self.targets):
            g = p.grad
            if g is not None:
                groups[(g.device, g.dtype)].append(i)
        for (dev, dtype), idx in groups.items():
            sc = scales.to(device=dev, dtype=dtype).unbind(0)
            torch._foreach_mul_([self.targets[i].grad for i in idx], [sc[i] for i in idx])
        return scales
