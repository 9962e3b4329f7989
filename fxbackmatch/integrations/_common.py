"""What the trainer callbacks share: finding the torch optimizer, choosing the mode, attaching."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Iterable

import torch

from ..apply.length import is_adaptive
from ..apply.optim import MODES

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["unwrap_optimizer", "resolve_mode", "attach_all"]

#: attributes under which trainers keep the optimizer they wrap: accelerate's
#: AcceleratedOptimizer (``optimizer``), Lightning's LightningOptimizer (``_optimizer``)
_WRAPPED = ("optimizer", "_optimizer")


def _inner(opt: object) -> object | None:
    """The optimizer ``opt`` wraps, read from its own ``__dict__`` (LightningOptimizer forwards
    every other attribute to the optimizer it wraps, hooks included)."""
    own = getattr(opt, "__dict__", {})
    return next((own[a] for a in _WRAPPED if own.get(a) is not None and own.get(a) is not opt), None)


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` whose ``step()`` runs the hooks, below trainer wrappers.

    accelerate's ``AcceleratedOptimizer`` keeps the real one in ``.optimizer`` (it subclasses
    ``Optimizer`` without initializing it: no step hooks of its own); Lightning's
    ``LightningOptimizer`` in ``._optimizer``. A container that calls ``Optimizer.__init__``
    itself and keeps its parts elsewhere (torchtitan's ``OptimizersContainer``) stays as it is.
    """
    opt = optimizer
    for _ in range(8):
        inner = _inner(opt)
        if inner is None:
            break
        opt = inner
    if not (isinstance(opt, torch.optim.Optimizer) and "_optimizer_step_pre_hooks" in vars(opt)):
        raise TypeError(
            f"fxbackmatch needs a torch.optim.Optimizer (or a wrapper that keeps one in "
            f"`.optimizer`), got {type(optimizer).__name__}.\n  What to do: pass the torch "
            f"optimizer itself, or call plan.attach(the_torch_optimizer) by hand."
        )
    return opt


def resolve_mode(optimizer: torch.optim.Optimizer, mode: str | None) -> str:
    """``mode`` as given, or where it is ``None``: ``"length"`` for adaptive optimizers (Adam,
    AdamW, RMSprop, ... — :func:`fxbackmatch.apply.length.is_adaptive`), ``"grad"`` otherwise."""
    if mode is None:
        return "length" if is_adaptive(optimizer) else "grad"
    if mode not in MODES:
        raise ValueError(f"mode must be None (automatic) or one of {MODES}, got {mode!r}")
    return mode


def attach_all(
    plan: "Plan", optimizers: Iterable[object], *, weight_decay: float, mode: str | None, target: str,
) -> list:
    """Attach ``plan`` to each optimizer that holds one of its model's parameters.

    Returns the handles. Warns when the plan's parameters are split over several optimizers:
    each attached ``step()`` rescales the gradients of *all* of the plan's parameters, so two
    steps after one backward would scale some gradients twice.
    """
    mine = {id(p) for p in plan.model.parameters()}
    chosen = []
    for o in optimizers:
        opt = unwrap_optimizer(o)
        if any(id(p) in mine for g in opt.param_groups for p in g["params"]):
            chosen.append(opt)
    if not chosen:
        raise ValueError(
            f"no optimizer holds a parameter of {type(plan.model).__name__}: nothing to rescale.\n"
            f"  What to do: build the optimizer over this model's parameters, or prepare the "
            f"plan for the module the optimizer trains."
        )
    if len(chosen) > 1:
        warnings.warn(
            f"fxbackmatch: {type(plan.model).__name__}'s parameters are split over "
            f"{len(chosen)} optimizers; each one's step() rescales the gradients of all of them. "
            f"Right when each step follows its own backward with the other gradients zeroed "
            f"(Lightning's multi-optimizer pattern); wrong when several steps follow one "
            f"backward.\n  What to do: in that case use one optimizer (or one container) per "
            f"plan, or one plan per module each optimizer trains.",
            UserWarning, stacklevel=3,
        )
    handles = []
    try:
        for opt in chosen:
            m = resolve_mode(opt, mode)
            handles.append(plan.attach(opt, weight_decay, mode=m, **({"target": target} if m == "length" else {})))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles
