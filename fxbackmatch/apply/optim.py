"""Optimizer integration: a step pre-hook on the user's own ``torch.optim.Optimizer``.

Unlike wrappers that hide the optimizer (apex LARC, torchlars), the optimizer stays the
user's: LR schedulers, ``state_dict`` and other hooks keep working. With a GradScaler,
``scaler.step(opt)`` unscales first and skips ``opt.step()`` on inf/NaN, so the hook sees
unscaled gradients and a skipped step stays skipped.

Closure-style steps (``opt.step(closure)``: LBFGS, Lightning's automatic optimization) run
step pre-hooks *before* the closure computes the gradients; the hook then wraps the closure
so that weight decay and the rescale follow each of its backward passes.

One optimizer takes one plan per parameter: attaching a plan twice, or two plans that scale
the same parameter, raises (the scales would multiply).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from ..errors import AdaptiveOptimizerWarning, AlreadyAttachedError
from .handles import HANDLES
from ..runtime.build import only_of

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["AttachHandle", "attach", "MODES"]

#: ``grad``: rescale the gradient (SGD and its momentum variants); ``length``: keep the
#: optimizer's direction and set each layer's step length (Adam & co; :mod:`.length`).
MODES = ("grad", "length")



class AttachHandle:
    """Returned by :meth:`Plan.attach`; ``remove()`` detaches the plan from the optimizer."""

    mode = "grad"

    def __init__(self, plan: "Plan", optimizer: torch.optim.Optimizer, weight_decay: float):
        self.plan = plan
        self.optimizer = optimizer
        self.weight_decay = float(weight_decay)
        self._owned: tuple | None = None  # (param-group key, ids this optimizer scales or None: all)
        self._hook = optimizer.register_step_pre_hook(self._pre_step)
        plan._attached.append(self)
        HANDLES.setdefault(optimizer, []).append(self)

    def _pre_step(self, optimizer, args, kwargs):
        # args are step()'s positional arguments, the optimizer itself first
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._apply(optimizer)
            return None

        def closure_then_rescale():
            loss = closure()
            self._apply(optimizer)
            return loss

        if "closure" in kwargs:
            return args, dict(kwargs, closure=closure_then_rescale)
        return (args[0], closure_then_rescale) + tuple(args[2:]), kwargs

    @torch.no_grad()
    def _apply(self, optimizer) -> None:
        if not self.plan.ready:
            self.plan._check()  # PlanNotReadyError: waiting for the first forward
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
        self.plan._step_hook()
        # an optimizer holding part of the model (one of a container's) scales its own part
        # only; the id set is rebuilt only when the groups change (add_param_group)
        key = (id(self.plan._params), tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups))
        if self._owned is None or self._owned[0] != key:
            params = (p for g in optimizer.param_groups for p in g["params"])
            self._owned = (key, only_of([self.plan._params[n] for n in self.plan.targets], params))
        self.plan.rescale_grads_(self._owned[1])

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
            live = HANDLES.get(self.optimizer)
            if live is not None and self in live:
                live.remove(self)


def _scaled_ids(plan: "Plan") -> set[int]:
    """Ids of the parameters a plan scales (all of its model's while it waits for a forward)."""
    if not plan.ready:
        return {id(p) for p in plan.model.parameters()}
    return {id(plan._params[n]) for n in plan.targets}


def attach(
    plan: "Plan", optimizer: torch.optim.Optimizer, weight_decay: float = 0.0, *,
    mode: str = "grad", target: str = "momentum",
):
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    from .length import LengthHandle, is_adaptive
    from ..analysis.methods import length_unit

    opt_name = type(optimizer).__name__
    if mode == "grad" and length_unit(plan.rule) == "absolute":
        raise ValueError(
            f"rule {plan.rule!r} sets step lengths, not gradient scales.\n  What to do: "
            f"plan.attach(optimizer, mode='length') (with Adam/AdamW this is {plan.rule.upper()})."
        )
    if mode == "length" and weight_decay:
        raise ValueError(
            "weight_decay= adds decay to the gradient before a rescale (mode='grad'); in "
            "mode='length' the optimizer's own weight_decay is part of the update whose length "
            "is set.\n  What to do: pass weight_decay to the optimizer (AdamW) instead."
        )
    if mode == "grad" and is_adaptive(optimizer):
        warnings.warn(
            f"fxbackmatch: {opt_name} normalizes each coordinate by its gradient's running "
            f"magnitude, which cancels a per-layer gradient rescale (measured: < 1 % change in "
            f"each layer's update).\n  What to do: plan.attach(optimizer, mode='length') keeps "
            f"{opt_name}'s direction and gives each layer's update back-matching's length.",
            AdaptiveOptimizerWarning, stacklevel=3,
        )
    mine = _scaled_ids(plan)
    for other in HANDLES.get(optimizer, []):
        theirs = _scaled_ids(other.plan)
        if mine & theirs:
            what = "this plan is" if other.plan is plan else f"another plan ({other.plan!r}) is"
            raise AlreadyAttachedError(
                f"{what} already attached to this {type(optimizer).__name__} and scales "
                f"{len(mine & theirs)} of the same parameters: their scales would multiply.\n"
                f"  What to do: keep one attachment — call .remove() on the handle the first "
                f"attach() returned before attaching again."
            )
    handle = LengthHandle(plan, optimizer, target) if mode == "length" else AttachHandle(plan, optimizer, weight_decay)
    if mode == "length":
        HANDLES.setdefault(optimizer, []).append(handle)
    return handle
