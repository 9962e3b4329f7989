"""What each optimizer step did to each layer: the relative update ``‖ΔW‖/‖W‖``.

``plan.track_updates(optimizer)`` snapshots the parameters the optimizer holds before each
step (one copy of them: a diagnostic, not for every run) and, after the step, stores each
parameter's ``‖W_after − W_before‖ / ‖W_before‖`` as a float64 0-d tensor (no host sync);
``plan.last_updates()`` reads them and the report shows them in a column. It works with
any optimizer, attached plan or not — plain SGD's updates are the baseline to compare with.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..analysis.expr import EPS
from ..runtime.norms import sumsq_many

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["UpdateTracker"]


class UpdateTracker:
    """Step pre/post hooks on ``optimizer`` that record the last step's relative updates
    into ``plan``; ``remove()`` takes them off."""

    def __init__(self, plan: "Plan", optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"track_updates needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.plan = plan
        self.optimizer = optimizer
        self._names = {id(p): n for n, p in plan.model.named_parameters()}
        self._snap: tuple[list[str], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._hooks = [optimizer.register_step_pre_hook(self._before),
                       optimizer.register_step_post_hook(self._after)]

    @torch.no_grad()
    def _before(self, optimizer, args, kwargs) -> None:
        named = [(self._names[id(p)], p) for g in optimizer.param_groups for p in g["params"]
                 if id(p) in self._names and p.requires_grad]
        names = [n for n, _ in named]
        params = [p.detach() for _, p in named]
        self._snap = (names, params, [p.clone() for p in params])

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        if self._snap is None:
            return
        names, params, before = self._snap
        self._snap = None
        if not params:
            return
        moved = sumsq_many(torch._foreach_sub(params, before))
        size = sumsq_many(before)
        for n, num, den in zip(names, moved, size):
            self.plan._last_updates[n] = (num / den.clamp_min(EPS)).sqrt()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._snap = None
