"""Step-length mode: back-matching for optimizers that normalize the gradient (Adam & co).

A per-layer constant that multiplies the gradient is cancelled by Adam's second moment
(``m̂/√v̂`` is invariant to it). In this mode the optimizer keeps its *direction* and each
layer's *update* is rescaled to the length the method asks for — a trust ratio, as in LAMB,
with the method's target in place of LAMB's ``‖W‖``:

    u = W_after − W_before            (the optimizer's own step, decay included)
    W ← W_before + (T / ‖u‖) · u       (T: the layer's target length)

Targets (``docs/derivations.md``, "Step-length mode"):

* ``backmatch`` and every gradient-scale method: ``T = lr · scale · ‖ḡ‖``, the length of the
  step that method would take with SGD. ``ḡ`` is, by default (``target="momentum"``), the
  optimizer's first moment ``exp_avg / (1 − β₁)`` where it keeps one — exactly SGD-momentum's
  buffer ``Σ β₁^k g_{t−k}`` (momentum ``β₁``, no dampening) — and the raw gradient otherwise
  (Adagrad, RMSprop, ``β₁ = 0``); ``target="grad"`` always uses the raw gradient.
* ``lamb``: ``T = lr · ‖W‖`` — with Adam(W) this is LAMB (You et al. 2019, Algorithm 2)
  exactly; the trust ratio is 1 where ``‖W‖`` or ``‖u‖`` is 0.

``rescale_updates_`` is the functional core; :class:`LengthHandle` the step hooks around the
user's own optimizer (its ``state_dict``, schedulers, GradScaler and DDP keep working).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .norms import sumsq_many

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["LengthHandle", "rescale_updates_", "TARGETS", "is_adaptive"]

TARGETS = ("momentum", "grad")

#: Optimizers whose update a gradient rescale does not change (or barely): their
#: per-coordinate normalization absorbs a per-layer constant.
_ADAPTIVE_NAMES = ("adam", "adagrad", "adadelta", "rmsprop", "lamb", "adafactor", "lion", "sophia", "nadam", "radam")


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """True for Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, Adadelta, RMSprop, Adafactor and
    third-party optimizers named like them (timm's ``Lamb``, ``AdamP``, ...)."""
    name = type(optimizer).__name__.lower()
    return any(k in name for k in _ADAPTIVE_NAMES)


@torch.no_grad()
def rescale_updates_(
    params: Sequence[torch.Tensor],
    before: Sequence[torch.Tensor],
    targets: torch.Tensor,
) -> torch.Tensor:
    """Rescale each update ``params[i] − before[i]`` in place to length ``targets[i]``.

    ``targets`` is a float64 vector; an update of length 0, or a target that is not positive
    and finite, keeps the optimizer's own update (ratio 1). Returns the ratios applied.
    """
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    updates = torch._foreach_sub([p.detach() for p in params], list(before))
    lengths = torch.stack(sumsq_many(updates)).sqrt()
    targets = targets.to(lengths.device, torch.float64)
    ok = (lengths > 0) & (targets > 0) & torch.isfinite(targets)
    ratio = torch.where(ok, targets / torch.where(ok, lengths, torch.ones_like(lengths)), torch.ones_like(lengths))
    # W ← before + ratio·u  ==  lerp(W, before, 1 − ratio)
    for dev_dtype, idx in _groups(params).items():
        w = (1.0 - ratio).to(*dev_dtype).unbind(0)
        torch._foreach_lerp_([params[i].detach() for i in idx], [before[i] for i in idx], [w[i] for i in idx])
    return ratio


def _groups(tensors) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


class LengthHandle:
    """Step pre-/post-hooks of the step-length mode; ``remove()`` detaches it."""

    mode = "length"

    def __init__(self, plan: "Plan", optimizer: torch.optim.Optimizer, target: str = "momentum"):
        from .methods import length_unit

        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.plan = plan
        self.optimizer = optimizer
        self.target = target
        self.weight_decay = 0.0
        self.unit = length_unit(plan.rule)
        self._before: dict[int, torch.Tensor] = {}
        self._scales: torch.Tensor | None = None
        self._pre = optimizer.register_step_pre_hook(self._pre_step)
        self._post = optimizer.register_step_post_hook(self._post_step)
        self._last: tuple[list[str], torch.Tensor] = ([], torch.zeros(0))
        plan._attached.append(self)

    # ---------------------------------------------------------------- hooks
    def _pre_step(self, optimizer, args, kwargs):
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        self._snapshot()
        if closure is None:
            self._scales = self.plan.scale_tensor()
            return None

        def closure_then_scales():  # the scales may read gradients (LARS): after the backward
            loss = closure()
            self._scales = self.plan.scale_tensor()
            return loss

        if "closure" in kwargs:
            return args, dict(kwargs, closure=closure_then_scales)
        return (args[0], closure_then_scales) + tuple(args[2:]), kwargs

    @torch.no_grad()
    def _snapshot(self) -> None:
        params = self._params()
        keep = {id(p) for p in params}
        for k in [k for k in self._before if k not in keep]:
            del self._before[k]
        fresh = [p for p in params if id(p) not in self._before or self._before[id(p)].shape != p.shape]
        for p in fresh:
            self._before[id(p)] = torch.empty_like(p.detach())
        if params:
            torch._foreach_copy_([self._before[id(p)] for p in params], [p.detach() for p in params])

    def _params(self) -> list[torch.Tensor]:
        # every target: in a closure step the gradients do not exist yet at the pre-hook
        return [self.plan._params[n] for n in self.plan.targets]

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        scales, self._scales = self._scales, None
        if scales is None:  # the closure never ran
            return
        names = self.plan.targets
        live = [(i, n, self.plan._params[n]) for i, n in enumerate(names) if self.plan._params[n].grad is not None]
        if not live:
            return
        idx = torch.tensor([i for i, _, _ in live], device=scales.device)
        params = [p for _, _, p in live]
        before = [self._before[id(p)] for p in params]
        lr, refs = self._lr_and_refs(params, before)
        targets = lr * scales.index_select(0, idx).to(lr.device) * refs
        self._last = ([n for _, n, _ in live], rescale_updates_(params, before, targets))  # no host sync

    def _lr_and_refs(self, params, before) -> tuple[torch.Tensor, torch.Tensor]:
        """Per parameter: its group's learning rate and the norm the scale multiplies
        (``‖ḡ‖`` for gradient-scale methods, 1 for absolute ones such as LAMB)."""
        group_of = {}
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                group_of[id(p)] = g
        dev = params[0].device
        lr = torch.tensor([float(group_of[id(p)]["lr"]) for p in params], dtype=torch.float64, device=dev)
        if self.unit == "absolute":  # a zero weight keeps the optimizer's step (LAMB's guard)
            nonzero = torch.stack([n.to(dev) for n in sumsq_many(list(before))]) > 0
            return lr, nonzero.to(torch.float64)
        refs: list[torch.Tensor] = []
        factors: list[float] = []
        for p in params:
            g = group_of[id(p)]
            state = self.optimizer.state.get(p, {})
            beta1 = _beta1(g)
            if self.target == "momentum" and beta1 and "exp_avg" in state and beta1 < 1:
                refs.append(state["exp_avg"])
                factors.append(1.0 / (1.0 - beta1))
            else:
                refs.append(p.grad)
                factors.append(1.0)
        norms = torch.stack([n.to(dev) for n in sumsq_many(refs)]).sqrt()
        return lr, norms * torch.tensor(factors, dtype=torch.float64, device=dev)

    @property
    def last_ratios(self) -> dict[str, float]:
        """Parameter name -> the factor ``T/‖u‖`` the last step applied to the optimizer's update."""
        names, ratios = self._last
        return dict(zip(names, ratios.tolist()))

    def effective_lrs(self) -> list[dict[str, float]]:
        """Per parameter group: parameter name -> the last step's length ratio ``T/‖u‖``
        (the factor applied to the optimizer's own update); empty before the first step."""
        names = {id(p): n for n, p in self.plan.model.named_parameters()}
        last = self.last_ratios
        return [{names[id(p)]: last[names[id(p)]] for p in g["params"]
                 if names.get(id(p)) in last} for g in self.optimizer.param_groups]

    def remove(self) -> None:
        from .optim import _HANDLES

        for h in (self._pre, self._post):
            if h is not None:
                h.remove()
        self._pre = self._post = None
        if self in self.plan._attached:
            self.plan._attached.remove(self)
        live = _HANDLES.get(self.optimizer)
        if live is not None and self in live:
            live.remove(self)
        self._before.clear()


def _beta1(group: dict) -> float:
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and betas:
        b = betas[0]
        return float(b.item() if isinstance(b, torch.Tensor) else b)
    return 0.0

