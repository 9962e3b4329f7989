"""The fused SGD step where launches, not bytes, bound it (CUDA).

Measured on an H200 (docs/benchmarks.md), inductor's fused update is bound by host work: a
kernel per parameter and dynamo's guards over every weight, gradient and buffer (ResNet-50,
batch 256: 4.5 ms, 1.66× a compiled SGD step and 11× torch's fused SGD step). This step has
the same contract with a few launches whatever the number of parameters:

1. the runtime's scales (:meth:`~fxbackmatch.runtime.chain.Runtime._scales`: one CUDA-graph
   replay that reads every weight, its BatchNorm statistics and the chain), then the plan's
   per-step multiplier and cap (``finish``);
2. compile_step's weight decay added to the gradients (one multi-tensor add), and the
   gradients multiplied by their scales (:meth:`~fxbackmatch.runtime.chain.Runtime.rescale_`:
   :func:`~fxbackmatch.runtime.spread.spread_mul_`, four launches);
3. torch's own fused SGD kernel per parameter group (``torch.optim.sgd.sgd(..., fused=True)``:
   multi-tensor launches per device and dtype), with the groups' learning rate, momentum and
   Nesterov read every step (schedulers need no rebuild).

So it is ``attach()`` followed by ``SGD(fused=True).step()`` without the optimizer's Python.
It reads each weight for its norm (inside the graph; bytes a GPU reads in microseconds)
instead of summing it as the update writes it, and, like ``attach()``, it leaves the scaled
gradients (weight decay included) in ``p.grad``. It runs on any device torch's fused SGD
takes (the tests run it on the CPU); :data:`~fxbackmatch.apply.fused.FOREACH_DEVICES` says
where the fused step uses it.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import torch
from torch.optim.sgd import sgd

from ..runtime.sharding import is_dtensor

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["SGDForeachStep"]

log = logging.getLogger(__name__)


class SGDForeachStep:
    """``step(consts, grads, bufs) -> scales`` for an SGD optimizer's parameters (``params``,
    in group order); ``finish(scales, consts)`` applies the plan's per-step multiplier; ``only``
    as ``Runtime.rescale_`` takes it (an optimizer of part of the model)."""

    def __init__(self, plan: "Plan", optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                 weight_decay: float, finish: Callable, only: set[int] | None) -> None:
        self.plan, self.optimizer, self.params = plan, optimizer, params
        #: the ids of the parameters whose gradients it scales, or None: every target's
        self.weight_decay, self.finish, self.only = weight_decay, finish, only
        self.sizes = [len(g["params"]) for g in optimizer.param_groups]
        #: per group, whether torch's fused kernel takes its tensors: not DTensors (FSDP2: it has
        #: no sharding strategy); on CUDA it requires every weight, gradient and buffer dense with
        #: equal strides and raises before launching anything otherwise (a buffer loaded in
        #: another memory format): such a group takes torch's foreach update from then on, the
        #: same arithmetic in more launches
        self.fused = [not any(map(is_dtensor, g["params"])) for g in optimizer.param_groups]

    def __call__(self, consts: dict, grads: list[torch.Tensor], bufs: list[torch.Tensor]) -> torch.Tensor:
        rt = self.plan._runtime
        scales = self.finish(rt._scales(), consts)
        if self.weight_decay:  # before the scale, as attach() and the compiled update add it
            torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
        rt.rescale_(self.only, scales)
        k = 0
        for gi, (group, n) in enumerate(zip(self.optimizer.param_groups, self.sizes)):
            ps, gs, bs = self.params[k:k + n], grads[k:k + n], bufs[k:k + n]
            k += n
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):  # the fused kernel reads a device lr as float32 there
                lr = lr.item() if lr.device.type == "cpu" else lr.to(ps[0].device, torch.float32)
            kw = dict(weight_decay=0.0, momentum=float(group["momentum"]), lr=lr, dampening=0.0,
                      nesterov=bool(group["nesterov"]), maximize=False)
            if self.fused[gi]:
                try:
                    sgd(ps, gs, bs, fused=True, **kw)
                    continue
                except RuntimeError as e:  # its layout check runs before any launch: nothing was written
                    self.fused[gi] = False
                    log.warning("fxbackmatch: torch's fused SGD kernel does not take parameter group %d "
                                "(%s); using torch's foreach update for it", gi, str(e).splitlines()[0])
            sgd(ps, gs, bs, foreach=True, **kw)
        return scales
