"""The per-step runtime around the generated factor function: run the (compiled) factors
(which read every weight once for its float64 squared norm), then multiply the gradients in
place with ``torch._foreach_mul_`` grouped by device and dtype. No ``.item()``, no host sync.
Gradients that are ``None`` are skipped outside the compiled region, so a changing set of
missing gradients never recompiles it.
"""
from __future__ import annotations

from collections import defaultdict
import torch
from torch import nn

from .codegen import GeneratedFactors

__all__ = ["Runtime"]


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
        grads = []
        for p in self.grad_params:
            g = p.grad
            grads.append(g if g is not None else torch.zeros_like(p))
        stats = [self.buffers[r] for r in self.stat_refs]
        consts = self._consts.get(dev)
        if consts is None:
            consts = self._consts[dev] = self.gen.constants_on(dev)
        return self.fn(self.weights, grads, stats, consts)

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
