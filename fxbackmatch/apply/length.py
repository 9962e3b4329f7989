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

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..runtime.spread import spread_foreach_
from ..runtime.graphs import may_capture
from ..runtime.norms import sumsq_many
from .handles import HANDLES
from ..runtime.sharding import local_part
from ..runtime.transfer import tensor_on

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["LengthHandle", "rescale_updates_", "update_sumsq", "TARGETS", "is_adaptive"]

TARGETS = ("momentum", "grad")

#: tensors below this many elements take the eager foreach path even when compiled
SMALL = 1 << 16
#: the eager path forms the updates whose norms it needs this many elements at a time (64 MiB
#: in float32), not all at once (a transient copy the size of the model)
UPDATE_CHUNK = 1 << 24

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
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """Rescale each update ``params[i] − before[i]`` in place to length ``targets[i]``.

    ``targets`` is a float64 vector; an update of length 0, or a target that is not positive
    and finite, keeps the optimizer's own update (ratio 1). ``reduce`` turns the local
    squared lengths into global ones (sharded tensors: one all-reduce). With ``cache`` (a
    dict kept across steps) each tensor's lerp weight is spread to its shape
    (:func:`~fxbackmatch.runtime.spread.spread_foreach_`), which keeps the lerp on foreach's fast
    path: a few launches for any number of tensors, where a list of 0-d weights launches a
    kernel per tensor (CUDA); the same arithmetic. Returns the ratios.
    """
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    sq = torch.stack(update_sumsq(params, before))
    lengths = (reduce(sq) if reduce is not None else sq).sqrt()
    ratio = _ratio(lengths, targets.to(lengths.device, torch.float64))
    # W ← before + ratio·u  ==  lerp(W, before, 1 − ratio)
    spread = cache is not None and may_capture()  # never inside a compiled region or a graph capture
    for dev_dtype, idx in _groups(params).items():
        w = (1.0 - ratio).to(*dev_dtype)
        ps, bs = [params[i].detach() for i in idx], [before[i] for i in idx]
        if spread:
            spread_foreach_(torch._foreach_lerp_, ps, w, idx, cache, others=(bs,))
        else:
            wv = w.unbind(0)  # views: no launch
            torch._foreach_lerp_(ps, bs, [wv[i] for i in idx])
    return ratio


def update_sumsq(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``sum((params[i] − before[i])²)`` of each pair as float64, the differences formed
    :data:`UPDATE_CHUNK` elements at a time (a multi-tensor subtract, then norms, per chunk):
    the step's transient memory stays bounded whatever the model's size."""
    out: list[torch.Tensor] = []
    start, n = 0, len(params)
    while start < n:
        stop, size = start + 1, params[start].numel()
        while stop < n and size + params[stop].numel() <= UPDATE_CHUNK:
            size += params[stop].numel()
            stop += 1
        out += sumsq_many(torch._foreach_sub([p.detach() for p in params[start:stop]], list(before[start:stop])))
        start = stop
    return out


def _ratio(lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    ok = (lengths > 0) & (targets > 0) & torch.isfinite(targets)
    return torch.where(ok, targets / torch.where(ok, lengths, torch.ones_like(lengths)), torch.ones_like(lengths))


def _step_one(p: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, coef: torch.Tensor, absolute: bool) -> torch.Tensor:
    """One flattened tensor, fused when compiled: the target ``coef·‖ref‖`` (absolute methods:
    ``coef·[ref ≠ 0]``), the length ``‖p − b‖``, and ``p ← b + ratio·(p − b)``."""
    r = ref.to(torch.float64).square().sum()
    target = coef * (r > 0).to(torch.float64) if absolute else coef * r.sqrt()
    length = (p - b).to(torch.float64).square().sum().sqrt()
    ratio = _ratio(length, target)
    p.copy_(b + ratio.to(p.dtype) * (p - b))
    return ratio


_COMPILED: list = []


def _compiled_step_one():
    """One compiled kernel for every tensor (flattened, dynamic size): compile time does not
    grow with the model. While dynamo traces a caller, the function itself (as
    :attr:`Runtime.fn <fxbackmatch.runtime.chain.Runtime.fn>` does)."""
    if not _COMPILED:
        if torch.compiler.is_compiling():
            return _step_one
        _COMPILED.append(torch.compile(_step_one, dynamic=True, fullgraph=True))
    return _COMPILED[0]


def _groups(tensors) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


class LengthHandle:
    """Step pre-/post-hooks of the step-length mode; ``remove()`` detaches it."""

    mode = "length"

    def __init__(self, plan: "Plan", optimizer: torch.optim.Optimizer, target: str = "momentum"):
        from ..analysis.methods import length_unit

        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if any("lr" not in g for g in optimizer.param_groups):
            raise ValueError(
                f"mode='length' reads each parameter group's 'lr', and {type(optimizer).__name__}'s "
                f"groups have none (an optimizer container?).\n  What to do: attach the plan to "
                f"each inner optimizer — each scales its own parameters."
            )
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
        #: the step as the few-launch foreach core (spread lerp weights), never the compiled
        #: per-tensor kernel; None: on CUDA, where launches and guards, not bytes, cost most
        self.flat: bool | None = None
        self._spread: dict = {}  # the spread lerp weights' layouts (runtime.spread.spread_foreach_)
        plan._attached.append(self)

    # ---------------------------------------------------------------- hooks
    def _pre_step(self, optimizer, args, kwargs):
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        self.plan._check()  # follows parameters FSDP2 replaced by shards, before the snapshot
        self._snapshot()
        if closure is None:
            self.plan._step_hook()
            self._scales = self.plan.scale_tensor()
            return None

        def closure_then_scales():  # the scales may read gradients (LARS): after the backward
            loss = closure()
            self.plan._step_hook()
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
        local = [local_part(p.detach())[0] for p in params]  # FSDP2: the rank's own shard
        for p, lp in zip(params, local):
            b = self._before.get(id(p))
            if b is None or b.shape != lp.shape or b.stride() != lp.stride():
                self._before[id(p)] = torch.empty_like(lp)
        if params:
            torch._foreach_copy_([self._before[id(p)] for p in params], local)

    def _params(self) -> list[torch.Tensor]:
        # every target this optimizer steps: in a closure step the gradients do not exist yet
        mine = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return [p for p in (self.plan._params[n] for n in self.plan.targets) if id(p) in mine]

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        scales, self._scales = self._scales, None
        if scales is None:  # the closure never ran
            return
        mine = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        live = [(i, n, self.plan._params[n]) for i, n in enumerate(self.plan.targets)
                if self.plan._params[n].grad is not None and id(self.plan._params[n]) in mine]
        if not live:
            return
        params = [p for _, _, p in live]
        before = [self._before[id(p)] for p in params]
        coefs, refs = self._coefs_and_refs(params, before)
        dev = coefs.device
        coefs = coefs * scales.to(dev).index_select(0, tensor_on([i for i, _, _ in live], torch.long, dev))
        flat = self.flat if self.flat is not None else dev.type == "cuda"
        cache = self._spread if flat else None
        if self.plan._runtime.sharded:
            ratios = self._sharded(params, before, refs, coefs, cache)
        elif self.plan.compile and not flat:
            ratios = self._compiled(params, before, refs, coefs)
        else:
            ratios = self._eager(params, before, refs, coefs, cache)
        self._last = ([n for _, n, _ in live], ratios)  # kept as a tensor: no host sync

    def _eager(self, params, before, refs, coefs, cache: dict | None = None) -> torch.Tensor:
        dev = coefs.device
        ref_sq = torch.stack([t.to(dev) for t in sumsq_many([r.detach() for r in refs])])
        return rescale_updates_(params, before, coefs * self._target_of(ref_sq), cache=cache)

    def _compiled(self, params, before, refs, coefs) -> torch.Tensor:
        """Large contiguous tensors: the compiled per-tensor kernel (two reads of ``p`` and
        ``b``); small or strided ones: the eager foreach core in one go (a call per tiny
        BatchNorm vector would cost more than its bytes)."""
        step, absolute = _compiled_step_one(), self.unit == "absolute"
        ratios: list = [None] * len(params)
        small = []
        for i, (p, b, r, c) in enumerate(zip(params, before, refs, coefs.unbind(0))):
            if p.numel() >= SMALL and p.is_contiguous() and b.is_contiguous():
                ratios[i] = step(p.detach().view(-1), b.view(-1), r.detach().reshape(-1), c, absolute)
            else:
                small.append(i)
        if small:
            got = self._eager([params[i] for i in small], [before[i] for i in small],
                              [refs[i] for i in small], coefs[small])
            for i, r in zip(small, got.unbind(0)):
                ratios[i] = r
        return torch.stack(ratios)

    def _target_of(self, ref_sumsq: torch.Tensor) -> torch.Tensor:
        if self.unit == "absolute":  # a zero weight keeps the optimizer's step (LAMB's guard)
            return (ref_sumsq > 0).to(torch.float64)
        return ref_sumsq.sqrt()

    def _sharded(self, params, before, refs, coefs, cache: dict | None = None) -> torch.Tensor:
        """FSDP2 / DTensor: local shards; one all-reduce adds every partial sum of squares
        (references and updates together). Replicated tensors count ``1/world`` per rank."""
        import torch.distributed as dist

        from ..runtime.sharding import group_of

        local, shares, group, world = [], [], None, 1
        for p in params:
            lp, shards = local_part(p.detach())
            if shards > 1 and group is None:
                group, world = group_of(p)
            local.append(lp)
            shares.append(shards)
        if group is None:
            world = dist.get_world_size() if dist.is_initialized() else 1
        dev = coefs.device
        share = tensor_on([1.0 if n > 1 else 1.0 / world for n in shares], torch.float64, dev)
        ref_sq = torch.stack([t.to(dev) for t in sumsq_many([local_part(r.detach())[0] for r in refs])])
        upd_sq = torch.stack([t.to(dev) for t in update_sumsq(local, before)])
        both = torch.cat([ref_sq, upd_sq]) * share.repeat(2)
        if dist.is_initialized():
            dist.all_reduce(both, group=group)  # the one collective of the mode
        k = len(params)
        return rescale_updates_(local, before, coefs * self._target_of(both[:k]), reduce=lambda _: both[k:],
                                cache=cache)

    def _coefs_and_refs(self, params, before) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per parameter: ``lr`` (over ``1 − β₁`` where the reference is the first moment) and
        the tensor whose norm the scale multiplies — Adam's first moment or the gradient; for
        absolute methods (LAMB) the weight itself, read only for the zero guard."""
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        coefs: list[float] = []
        refs: list[torch.Tensor] = []
        for p, b in zip(params, before):
            g = group_of[id(p)]
            lr = float(g["lr"])
            beta1 = _beta1(g)
            if self.unit == "absolute":
                refs.append(b)
                coefs.append(lr)
            elif self.target == "momentum" and 0 < beta1 < 1 and "exp_avg" in self.optimizer.state.get(p, {}):
                refs.append(self.optimizer.state[p]["exp_avg"])
                coefs.append(lr / (1.0 - beta1))
            else:
                refs.append(p.grad)
                coefs.append(lr)
        return tensor_on(coefs, torch.float64, local_part(params[0])[0].device), refs

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
        for h in (self._pre, self._post):
            if h is not None:
                h.remove()
        self._pre = self._post = None
        if self in self.plan._attached:
            self.plan._attached.remove(self)
        live = HANDLES.get(self.optimizer)
        if live is not None and self in live:
            live.remove(self)
        self._before.clear()
        self._spread.clear()


def _beta1(group: dict) -> float:
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and betas:
        b = betas[0]
        return float(b.item() if isinstance(b, torch.Tensor) else b)
    return 0.0

