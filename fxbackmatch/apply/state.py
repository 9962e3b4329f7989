"""A plan's state for resuming training: :func:`state_dict` (options and a fingerprint of the
graph and the parameter shapes — no code), :func:`load_state_dict` (checks a saved state
belongs to this model and plan), and what copying and pickling a plan do."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from ..errors import PlanMismatchError
from ..runtime.build import finish, need

if TYPE_CHECKING:
    from ..plan import Plan

STATE_VERSION = 1
#: the options a saved state must agree on, with the value states older than the option had
OPTIONS = {"rule": None, "adapt": None, "variance": None, "trust_coefficient": None, "gamma": "one",
           "relu": "paper", "unnormalized": "exact", "factors": "derived", "taps": "all", "token_mask": None,
           "moments": "derived", "span": "full"}
#: fields a copy does not share: the runtime is regenerated for the copied tensors
NOT_COPIED = ("_runtime", "_attached", "_generated", "_last_call", "_applied_grads", "_round", "_device_tables")
NO_PICKLE = (
    "a fxbackmatch Plan does not pickle (it holds the graph, the rule registry and "
    "compiled code).\n  What to do: save plan.state_dict() beside the model's and, after "
    "loading, call fxbackmatch.prepare(model, ...) and plan.load_state_dict(state) — it "
    "checks that the model and options match. torch.save(model) itself works: a waiting "
    "plan's hook is saved as a no-op."
)


def state_dict(plan: "Plan") -> dict[str, Any]:
    need(plan)
    state: dict[str, Any] = {"version": STATE_VERSION}
    state.update((key, getattr(plan, key)) for key in ("rule", "adapt", "variance", "gamma", "relu", "unnormalized",
                                                      "factors", "moments", "span", "taps", "token_mask",
                                                      "trust_coefficient", "fingerprint"))
    state["input_shapes"] = [list(s) for s in (plan.input_shapes or ())]
    state["targets"] = list(plan._targets)
    return state


def load_state_dict(plan: "Plan", state: dict[str, Any]) -> None:
    need(plan)
    if state.get("version") != STATE_VERSION:
        raise PlanMismatchError(f"plan state version {state.get('version')} is not {STATE_VERSION}")
    if state.get("fingerprint") != plan.fingerprint:
        raise PlanMismatchError(
            "this plan state was saved for a different model (its graph or parameter shapes "
            "differ).\n  What to do: load it into the model it was saved with, or start a "
            "new plan with fxbackmatch.prepare."
        )
    for key, default in OPTIONS.items():
        if state.get(key, default) != getattr(plan, key):
            raise PlanMismatchError(
                f"plan state has {key}={state.get(key)!r} but this plan has "
                f"{key}={getattr(plan, key)!r}; prepare with the same options to resume."
            )
    plan._state_loads += 1  # resumed: the weights were likely loaded too


def deepcopy_plan(plan: "Plan", memo: dict) -> "Plan":
    cls = plan.__class__
    new = cls.__new__(cls)
    memo[id(plan)] = new
    for k, v in plan.__dict__.items():
        if k not in NOT_COPIED:
            setattr(new, k, copy.deepcopy(v, memo))
    new._attached = []
    new._last_call = None
    new._applied_grads = new._round = None  # they name the original's gradients
    new._device_tables = {}
    if new._analysis is not None:
        if "_parameters" in new.model.__dict__:
            finish(new)
        else:  # copied from inside the model's own deepcopy (a hook holds the plan): the
            new._finish_pending = True  # model is half-built; finish on first use
    return new
