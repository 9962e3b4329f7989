"""Optimizer integration: a step pre-hook on the user's own ``torch.optim.Optimizer``.

Unlike wrappers that hide the optimizer (apex LARC, torchlars), the optimizer stays the
user's: LR schedulers, ``state_dict`` and other hooks keep working. With a GradScaler,
``scaler.step(opt)`` unscales first and skips ``opt.step()`` on inf/NaN, so the hook sees
unscaled gradients and a skipped step stays skipped.
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["AttachHandle", "attach"]


class AttachHandle:
    """Returned by :meth:`Plan.attach`; ``remove()`` detaches the plan from the optimizer."""

    def __init__(self, plan: "Plan", optimizer: torch.optim.Optimizer, weight_decay: float):
        self.plan = plan
        self.optimizer = optimizer
        self.weight_decay = float(weight_decay)
        self._hook = optimizer.register_step_pre_hook(self._pre_step)
        plan._attached.append(self)

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self.weight_decay:
            groups = defaultdict(lambda: ([], []))
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        g, w = groups[(p.grad.device, p.grad.dtype)]
                        g.append(p.grad)
                        w.append(p)
            for g, w in groups.values():
                torch._foreach_add_(g, w, alpha=self.weight_decay)
        self.plan.rescale_grads_()

    def effective_lrs(self) -> list[dict[str, float]]:
        """Per parameter group: parameter name -> ``lr · scale`` under the current weights."""
        scales = self.plan.scales()
        names = {id(p): n for n, p in self.plan.model.named_parameters()}
        out = []
        for group in self.optimizer.param_groups:
            lr = float(group.get("lr", 0.0))
            out.append({names[id(p)]: lr * scales.get(names[id(p)], 1.0) for p in group["params"] if id(p) in names})
        return out

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            if self in self.plan._attached:
                self.plan._attached.remove(self)


def attach(plan: "Plan", optimizer: torch.optim.Optimizer, weight_decay: float = 0.0) -> AttachHandle:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return AttachHandle(plan, optimizer, weight_decay)
