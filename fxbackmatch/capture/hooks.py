"""The forward pre-hooks a plan puts on the user's model: :class:`LazyBuild` completes a plan
prepared without example inputs from the model's first call, :class:`CallRecorder` keeps the
last call's inputs (the batch measured factors, token masks and the batch span read).

Both are objects, not closures, so ``copy.deepcopy(model)`` hands the copy's hooks a copy of
the plan, and ``torch.save(model)`` saves them as no-ops. They reach the plan only through
its methods and fields (it is passed in), so this module imports no other stage.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from .graph import capturing

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["LazyBuild", "CallRecorder", "inert_hook", "inert_hook_factory"]


class LazyBuild:
    """The one-shot forward pre-hook of a plan prepared without example inputs."""

    def __init__(self, plan: "Plan") -> None:
        self.plan = plan

    def __call__(self, module, args, kwargs):
        keys = [k for k, h in list(module._forward_pre_hooks.items()) if h is self]
        for store in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
            hooks = getattr(module, store, {})
            for key in keys:
                hooks.pop(key, None)
        self.plan._hook = None
        self.plan._build(args, kwargs)

    def __deepcopy__(self, memo):
        new = LazyBuild.__new__(LazyBuild)
        memo[id(self)] = new
        new.plan = copy.deepcopy(self.plan, memo)
        return new

    def __reduce__(self):  # pickling (torch.save(model)): a no-op hook
        return (inert_hook_factory, ())


class CallRecorder:
    """Forward pre-hook of a plan that reads the batch: keeps a reference to the last call's
    inputs (the batch the next refresh measures on). Copies with its plan; saved as a no-op."""

    def __init__(self, plan: "Plan") -> None:
        self.plan = plan

    def __call__(self, module, args, kwargs):
        if not capturing():  # a prepare tracing this model runs it on proxies / fake tensors
            self.plan._last_call = (args, kwargs)

    def __deepcopy__(self, memo):
        new = CallRecorder.__new__(CallRecorder)
        memo[id(self)] = new
        new.plan = copy.deepcopy(self.plan, memo)
        return new

    def __reduce__(self):
        return (inert_hook_factory, ())


def inert_hook(module, args, kwargs=None):
    return None


def inert_hook_factory():
    return inert_hook
