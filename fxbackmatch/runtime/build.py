"""Building a :class:`~fxbackmatch.plan.Plan`: capture → analysis → scale expressions →
generated code → :class:`~.chain.Runtime`, and the checks that the model is still the one
the plan was built for. Every function takes the plan and fills in or reads its fields."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
import weakref
from operator import attrgetter, is_
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..analysis.expr import Mono
from ..analysis.gaps import local_refs
from ..analysis.guards import SCALE_RANGE, out_of_range, unnormalized_layers
from ..analysis.methods import METHODS, PUBLISHED, scale_of
from ..analysis.span import batch_of, span_table
from ..analysis.tokens import TOKEN_META, check_mask, find_mask, is_token_layer, position_of, token_stats, token_targets
from ..analysis.conventions import check_choice
from ..analysis.walk import MOMENT_PREFIX, Analysis, LayerRecord, analyze
from ..capture.graph import CAPTURES, capture
from ..capture.hooks import CallRecorder, LazyBuild
from ..errors import FxBackmatchError, PlanMismatchError, PlanNotReadyError, ScaleRangeWarning
from .chain import Runtime
from .transfer import kept, to_device
from .sharding import is_dtensor
from .codegen import GeneratedFactors, generate
from .explain import describe_uses
from .reference import atom_values as eval_atoms
from .reference import eval_mono

if TYPE_CHECKING:
    from ..plan import Plan

log = logging.getLogger("fxbackmatch.plan")

#: ``"derived"``: every layer's backward factor ``m`` from the rules (the paper's chain);
#: ``"measured"``: ``m`` measured on the live batch every ``refresh`` steps (``mean diag(JᵀJ)``
#: by autograd, :mod:`fxbackmatch.measure.factors`) — the rules still give ``s``, roles and the layers'
#: own normal-matrix factors
FACTORS = ("derived", "measured")
MEASURED_PREFIX = "fxbackmatch.measured:"
MEASURED_NOTE = "m measured"
NO_NORM_NOTE = "no norm above"
#: a layer whose s counts the real tokens of the last batch (``token_mask``)
TOKEN_NOTE = "s × real-token share"


def check_options(*, capture: str, adapt: str, rule: str, factors: str, refresh: int, probes: int,
                  token_mask: Any) -> None:
    """Raise :class:`ValueError` naming the first of ``prepare``'s options out of its range
    (the conventions check themselves: :class:`~fxbackmatch.analysis.conventions.Conventions`)."""
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if adapt not in ("all", "weights"):
        raise ValueError(f"adapt must be 'all' or 'weights', got {adapt!r}")
    if rule not in METHODS:
        raise ValueError(f"unknown rule {rule!r}; choose one of {sorted(METHODS)}")
    check_choice("factors", factors, FACTORS)
    if refresh < 1 or probes < 1:
        raise ValueError(f"refresh and probes must be ≥ 1, got {refresh} and {probes}")
    if token_mask is not None and not isinstance(token_mask, (str, int)):
        raise ValueError(f"token_mask must name a keyword input or give a positional index, got {token_mask!r}")


def build(plan: "Plan", example_inputs: Sequence[torch.Tensor], example_kwargs: dict | None = None) -> None:
    """Capture and analyze the model on the example inputs and complete the plan."""
    refuse_sharded(plan.model)
    if plan.token_mask is not None:  # before capture: a wrong name fails fast and clearly
        if isinstance(plan.token_mask, str):
            plan._mask_pos = position_of(plan.model, plan.token_mask)
        mask = find_mask(plan.token_mask, example_inputs, example_kwargs or {}, plan._mask_pos)
        plan._token_bt = check_mask(plan.token_mask, mask)
        plan._example_mask = mask.detach()
    reg = plan.registry
    gm, plan.capture = capture(
        plan.model, example_inputs, reg.has_module_rule, plan.leaf_modules, plan.capture_mode,
        example_kwargs=example_kwargs, has_rule=reg.has, lookup=reg.lookup,
    )
    plan.example_kwargs = {k: v for k, v in (example_kwargs or {}).items() if not isinstance(v, torch.Tensor)}
    if plan._token_bt is not None:  # the attention rules count the real keys (analysis/tokens.py)
        gm.meta[TOKEN_META] = plan._token_bt
    a = plan._analysis = analyze(
        gm, plan.model, reg, strict=plan.strict, variance=plan.variance,
        gamma=plan.gamma, outputs=plan.outputs, relu=plan.relu, unnormalized=plan.unnormalized,
        taps=plan.taps, moments="measured" if plan.factors == "measured" else plan.moments,
        activations=plan.conventions.activations, floor=plan.conventions.floor,
    )
    bare = unnormalized_layers(gm, reg, [r.node for r in a.layers])
    a.layers = [dataclasses.replace(r, notes=r.notes + (NO_NORM_NOTE,)) if r.node in bare else r for r in a.layers]
    if plan.factors == "measured":  # the report says which layers' m is measured
        a.layers = [dataclasses.replace(r, notes=r.notes + (MEASURED_NOTE,)) for r in a.layers]
    for n in gm.graph.nodes:  # keep shapes, drop the fake tensors
        n.meta.pop("val", None)
    if plan.capture == "hooks":
        a.notes.insert(
            0, "captured with hooks (torch.fx could not trace): modules in execution order, "
            "functional ops between them unseen, chain assumed"
        )
    plan.input_shapes = tuple(tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor))
    plan._example_batch = batch_of(list(example_inputs), dict(example_kwargs or {})) or 1
    if plan.token_mask is not None and batch_corrected(plan):
        a.layers = [dataclasses.replace(r, notes=r.notes + (TOKEN_NOTE,)) if is_token_layer(r, plan._token_bt)
                    else r for r in a.layers]
    finish(plan)
    if measures(plan):
        plan.refresh(*example_inputs, **(example_kwargs or {}))
    if measures(plan) or plan.token_mask is not None or plan.span == "batch":
        plan.wrapped.register_forward_pre_hook(CallRecorder(plan), with_kwargs=True)
    warn_range(plan)


def arm(plan: "Plan") -> None:
    """Complete the plan from the model's first forward call (a one-shot pre-hook)."""
    plan._hook = LazyBuild(plan)
    plan.wrapped.register_forward_pre_hook(plan._hook, with_kwargs=True)


def warn_range(plan: "Plan") -> None:
    """Warn (once per prepare) about scales outside the documented range at these weights."""
    try:
        found = flags(plan)
    except FxBackmatchError:  # non-finite weights: reported when the scales are used
        return
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        warnings.warn(
            f"fxbackmatch: {len(found)} scale(s) of {type(plan.model).__name__} lie outside "
            f"{list(SCALE_RANGE)} at the current weights: " + "; ".join(found[:3]) + more
            + ".\n  What to do: check the report (plan.report()); pass conventions=fxbackmatch."
            "Conventions(cap=...) to prepare to bound the scales, or register a rule for the layer kind named.",
            ScaleRangeWarning, stacklevel=5,
        )


def flags(plan: "Plan") -> list[str]:
    """Scales outside ``SCALE_RANGE`` under the current weights, before any ``cap``."""
    a = need(plan)
    vals = atom_values(plan)
    raw = {n: eval_mono(e, vals) for n, e in plan._scale_expr.items()}
    mult = plan._runtime.multiplier() if plan._runtime is not None and plan._runtime.multiplier is not None else None
    if mult is not None:  # the step's batch span / token share, as the scales are applied
        for n, v in zip(plan._targets, mult.tolist()):
            if n in raw:
                raw[n] *= v
    return out_of_range(raw, a.layers)


def finish(plan: "Plan") -> None:
    """Scale expressions → generated code → runtime, for the model's current parameters."""
    a = plan._analysis
    params = dict(plan.model.named_parameters())
    plan._params = params
    opts = {"trust_coefficient": plan.trust_coefficient}
    plan._scale_expr = {}
    plan._roles = {}
    plan._measuring = measures(plan)  # read every step by measure.batch.step_hook
    if plan._measuring:
        measure_atoms(plan, a)
    for name in params:
        uses = a.uses.get(name)
        if not uses:
            continue
        if plan.factors == "measured":
            uses = [measured_use(a, u) for u in uses]
        plan._roles[name] = uses[0].role
        if plan.adapt == "weights" and uses[0].role != "weight":
            continue
        plan._scale_expr[name] = scale_of(plan.rule, a.atoms, name, uses, opts)
    targets = plan._targets = list(plan._scale_expr)
    plan._applied = None
    plan._owners = {n: owner(plan.model, n) for n in targets}
    plan._links = module_links(plan.model, targets)
    plan._shapes = {n: tuple(params[n].shape) for n in targets}
    plan._identity = identity_columns(plan)
    # a scale the batch multiplies (token_mask, span="batch") is capped once, after that
    # multiplier (Runtime.post_cap), as the eager scales are; every other in the generated code.
    # Both multipliers correct back-matching's s; the competitors are their published formulas
    per_step = batch_corrected(plan) and (plan._token_bt is not None or plan.span == "batch")
    plan._generated: GeneratedFactors = generate(
        a.atoms.atoms, [(n, plan._scale_expr[n]) for n in targets],
        title=f"{type(plan.model).__name__}, rule={plan.rule}, {len(targets)} scaled parameters",
        cap=None if per_step else plan.cap, chains=describe_uses(a),
    )
    if plan._token_bt is not None:  # attention statistics over the real tokens, refilled each step
        for ref, t in token_stats(a.atoms.atoms, plan._example_mask).items():
            plan._measured.setdefault(ref, t)
    buffers = dict(plan.model.named_buffers())
    buffers.update(plan._measured)
    plan._runtime = Runtime(plan._generated, params, buffers, targets, plan.compile)
    #: host tables on a device (measure.batch.multiplier), and applied_after's masks
    plan._device_tables = {}
    if plan._token_bt is not None:
        plan._token_flags = torch.tensor(token_targets(targets, a.uses, a.layers, plan._token_bt), dtype=torch.float64)
    if plan.span == "batch":
        plan._span_fan, plan._span_rows = span_table(targets, a.uses, a.layers, plan._shapes)
    if per_step:
        plan._runtime.multiplier = plan._multiplier
        plan._runtime.post_cap = plan.cap
    plan.fingerprint = fingerprint(a.gm, params)
    log.debug("fxbackmatch: prepared %s with %d layers", type(plan.model).__name__, len(a.layers))


def measures(plan: "Plan") -> bool:
    """Whether the plan has atoms measured on the live batch (refreshed every K steps): the
    layers' ``m`` (``factors="measured"``), averaged moments (``moments="batch"``), or the
    own factors of ops no rule covers (:mod:`fxbackmatch.analysis.gaps`)."""
    a = plan._analysis
    return plan.factors == "measured" or bool(a and local_refs(a.atoms)) or (
        plan.moments == "batch" and bool(a and a.moment_nodes))


def measure_atoms(plan: "Plan", a: Analysis) -> None:
    layers = [MEASURED_PREFIX + rec.node for rec in a.layers] if plan.factors == "measured" else []
    for key in layers + [MOMENT_PREFIX + n for n in a.moment_nodes] + local_refs(a.atoms):
        if key not in plan._measured:
            plan._measured[key] = torch.ones((), dtype=torch.float64)
        a.atoms.stat(key)


def measured_use(a: Analysis, use):
    """The use with its layer's derived ``m`` replaced by the measured one (the layer's
    own factors — a weight's ``E[a²]``, a layer scale's — kept)."""
    rec = next(r for r in a.layers if r.node == use.node)
    m = Mono.atom(a.atoms.stat(MEASURED_PREFIX + rec.node))
    return dataclasses.replace(use, m=m * (use.m / rec.m_expr))


def need(plan: "Plan") -> Analysis:
    """The plan's analysis, or :class:`PlanNotReadyError` while it waits for a forward call."""
    if plan._analysis is None:
        raise PlanNotReadyError(
            f"this plan for {type(plan.model).__name__} was prepared without example inputs "
            f"and the model has not run yet.\n  What to do: run one forward pass first "
            f"(the plan completes itself from it), or call "
            f"fxbackmatch.prepare(model, example_inputs)."
        )
    return plan._analysis


def atom_values(plan: "Plan") -> list[float]:
    """Every atom's value under the current weights (eager, float64)."""
    a = need(plan)

    def tensor(ref: str) -> torch.Tensor:
        if ref in plan._params:
            return plan._params[ref]
        return plan._measured[ref] if ref in plan._measured else plan.model.get_buffer(ref)

    return eval_atoms(a.atoms.atoms, tensor, lambda ref: plan._params[ref].grad)


def layer_records(plan: "Plan") -> tuple[LayerRecord, ...]:
    """Per-layer records in forward order, with the ``m`` the scales use: the rule's under the
    current weights, or with ``factors="measured"`` the last measurement (the rule's ``m`` is
    ``plan.measure()``'s ``rule_m``)."""
    a = need(plan)
    vals = atom_values(plan)
    got = plan._measured if plan.factors == "measured" else {}
    recs = [r.with_m(float(got[MEASURED_PREFIX + r.node]) if MEASURED_PREFIX + r.node in got
                     else eval_mono(r.m_expr, vals)) for r in a.layers]
    order = {n.name: i for i, n in enumerate(a.gm.graph.nodes)}
    return tuple(sorted(recs, key=lambda r: order.get(r.node, 0)))


def rescale(plan: "Plan", only: set[int] | None = None) -> None:
    """``plan.rescale_grads_``: multiply the gradients, keep the scales applied (with ``only``,
    one optimizer's part: the other targets keep theirs) and, for a rule reading the
    gradients, which gradients it left. Several optimizers over one model step one after the
    other: each part takes the scales the round's first part computed, before any part moved,
    while its gradients are the ones they were computed with (else a later part would see the
    earlier parts' new weights in its factors, or LARS their rescaled gradients)."""
    check(plan)
    rt = plan._runtime
    if only is None:
        plan._round = None
        scales = rt.rescale_()
    else:
        r = plan._round
        if r is None or not same_grads(plan, r[0], only):
            r = plan._round = (grad_marks(plan), rt.scales())
        scales = rt.rescale_(only, r[1])
    plan._applied = applied_after(plan, scales, only)
    if plan._runtime.gen.grad_refs:
        plan._applied_grads = grad_marks(plan)


def applied_after(plan: "Plan", scales: torch.Tensor, only: set[int] | None) -> torch.Tensor:
    """What ``plan.applied_scales()`` holds after a step that scaled the targets whose ``id`` is
    in ``only`` (``None``: all) by ``scales``: theirs from ``scales``, the others' as another
    optimizer's last step left them."""
    prev = plan._applied
    if only is None or prev is None or prev.shape != scales.shape:
        return scales
    flags = tuple(id(p) in only for p in plan._runtime.targets)
    dev = scales.device  # the mask made on the device once per pattern: no host sync per step
    mine = kept(plan._device_tables, ("mine", flags, dev), lambda: to_device(torch.tensor(flags), dev))
    return torch.where(mine, scales, prev.to(dev))


def only_of(targets: list[torch.Tensor], params) -> set[int] | None:
    """The ids of ``params`` (one optimizer's), or ``None`` where they hold every target: what
    ``rescale_`` and :func:`applied_after` take as ``only``."""
    mine = {id(p) for p in params}
    return None if all(id(t) in mine for t in targets) else mine


def batch_corrected(plan: "Plan") -> bool:
    """Whether the batch's corrections of ``s`` (``span="batch"``, ``token_mask``) multiply the
    plan's scales: every method but the published competitors (:data:`PUBLISHED`)."""
    return plan.rule not in PUBLISHED


def grad_marks(plan: "Plan") -> list[tuple[weakref.ref, int] | None]:
    """Each target's gradient as it is now: the tensor (a weak reference: a new ``.grad`` may
    reuse a freed one's ``id``) and its version; ``None`` where absent. A plain loop: dynamo
    traces it inside a compiled step (a comprehension's assignment expression broke the graph)."""
    out: list = []
    for n in plan._targets:
        g = plan._params[n].grad
        out.append(None if g is None else (weakref.ref(g), g._version))
    return out


def same_grads(plan: "Plan", marks: list | None, only: set[int] | None = None) -> bool:
    """Whether every target's gradient (those of the parameters whose ``id`` is in ``only``,
    when given) is the one ``marks`` recorded, unchanged since."""
    if marks is None:
        return False
    for n, m in zip(plan._targets, marks):
        p = plan._params[n]
        if only is not None and id(p) not in only:
            continue
        g = p.grad
        if (g is None) != (m is None) or (g is not None and (m[0]() is not g or m[1] != g._version)):
            return False
    return True


def eager_scales(plan: "Plan") -> dict[str, float]:
    """Parameter name -> scale under the current weights (eager, float64; unscaled ones 1.0);
    for a gradient-reading rule, the applied scales while the gradients are the rescaled ones."""
    check(plan)
    if plan._runtime.gen.grad_refs and plan._applied is not None and same_grads(plan, plan._applied_grads):
        out = {n: 1.0 for n, p in plan._params.items() if p.requires_grad}
        out.update(zip(plan._targets, plan._applied.tolist()))
        return out
    mult = plan._runtime.multiplier() if plan._runtime.multiplier is not None else None  # first: per-step atoms
    vals = atom_values(plan)
    out = {n: 1.0 for n, p in plan._params.items() if p.requires_grad}
    mult = None if mult is None else dict(zip(plan._targets, mult.tolist()))
    for n, expr in plan._scale_expr.items():
        v = eval_mono(expr, vals) * (1.0 if mult is None else mult[n])
        out[n] = v if plan.cap is None else min(max(v, 1.0 / plan.cap), plan.cap)
    return out


def check(plan: "Plan") -> None:
    """The plan is ready and its parameters are still the model's (following FSDP2 sharding)."""
    if plan._analysis is None:
        need(plan)  # raises PlanNotReadyError
    if getattr(plan, "_finish_pending", False):  # a deepcopy made while the model was half-built
        del plan._finish_pending  # (getattr, not __dict__.pop: torch 2.11's dynamo traces only this)
        finish(plan)
    # the per-step fast path (C-level maps; dynamo traces check_identity's loops instead)
    if not torch.compiler.is_compiling() and same_identity(plan._identity):
        return
    try:
        check_identity(plan)
    except PlanMismatchError:
        if not follow_sharded(plan):
            raise


def follow_sharded(plan: "Plan") -> bool:
    """Follow parameters that ``fully_shard`` replaced by DTensors of the same global
    shape (a plan prepared before sharding); anything else stays an error."""
    params = dict(plan.model.named_parameters())
    changed = False
    for n in plan._targets:
        cur = params.get(n)
        if cur is None or tuple(cur.shape) != plan._shapes[n]:
            return False
        if cur is not plan._params.get(n):
            if not is_dtensor(cur):
                return False
            changed = True
    if not changed:
        return False
    finish(plan)
    log.info("fxbackmatch: plan follows %s into its sharded parameters", type(plan.model).__name__)
    return True


_SHAPE = attrgetter("shape")


def identity_columns(plan: "Plan") -> tuple[list, ...] | None:
    """What :func:`same_identity` compares every step, as columns: each module on the way to
    a target (parent's ``_modules``, key, module), each target (owner's ``_parameters``, key,
    parameter) and its prepared shape; ``None`` where a module keeps its own mapping type."""
    links = [(parent._modules, key, child) for parent, key, child in plan._links]
    owners = [(mod._parameters, attr, p, torch.Size(plan._shapes[n])) for n, (mod, attr, p) in plan._owners.items()]
    if not all(isinstance(t[0], dict) for t in links + owners):
        return None  # check_identity's loops decide, every step
    return tuple([t[i] for t in links] for i in range(3)) + tuple([t[i] for t in owners] for i in range(4))


def same_identity(columns: tuple[list, ...] | None) -> bool:
    """Every prepared module and target is still where it was, same shape: C-level loops (``map``)
    over the columns of :func:`identity_columns`, the per-step cost of every rescale."""
    if columns is None:
        return False
    dicts, keys, children, owners, attrs, params, shapes = columns
    return (all(map(is_, map(dict.get, dicts, keys), children))
            and all(map(is_, map(dict.get, owners, attrs), params)) and list(map(_SHAPE, params)) == shapes)


def check_identity(plan: "Plan") -> None:
    """Every submodule on the way to a target and every target is the one prepared, same shape
    (the loops behind :func:`same_identity`, which say what changed)."""
    for parent, key, child in plan._links:
        if parent._modules.get(key) is not child:
            raise PlanMismatchError(
                f"submodule '{key}' of {type(parent).__name__} was replaced after prepare.\n"
                f"  What to do: call fxbackmatch.prepare(model, ...) again for the changed model."
            )
    for n in plan._targets:
        mod, attr, p = plan._owners[n]
        cur = mod._parameters.get(attr)
        if cur is not p or tuple(cur.shape) != plan._shapes[n]:
            raise PlanMismatchError(
                f"parameter '{n}' was replaced or resized after prepare "
                f"(was {plan._shapes[n]}, now "
                f"{None if cur is None else tuple(cur.shape)}).\n  What to do: call "
                f"fxbackmatch.prepare(model, ...) again for the changed model."
            )


def refuse_sharded(model: nn.Module) -> None:
    """FSDP2 modules run lazy initialization and collectives on any forward call, so tracing
    a sharded model would change it: prepare before ``fully_shard`` (the plan follows)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule):
            raise PlanMismatchError(
                f"module '{name or type(model).__name__}' is already sharded by fully_shard; "
                f"preparing it would run FSDP's forward hooks and change its state.\n  What to "
                f"do: call fxbackmatch.prepare(model, ...) before fully_shard — the plan follows "
                f"the parameters into their sharded form at the next rescale."
            )


def owner(model: nn.Module, name: str):
    path, _, attr = name.rpartition(".")
    mod = model.get_submodule(path) if path else model
    return mod, attr, mod._parameters[attr]


def module_links(model: nn.Module, names) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every (parent, child name, child) link on the paths to the targets' owners."""
    links: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
    for name in names:
        mod = model
        for key in name.split(".")[:-1]:
            child = mod._modules[key]
            links[(id(mod), key)] = (mod, key, child)
            mod = child
    return list(links.values())


def fingerprint(gm, params: dict[str, nn.Parameter]) -> str:
    h = hashlib.sha256()
    h.update(gm.code.encode())
    for n, p in params.items():
        h.update(f"{n}:{tuple(p.shape)}:{p.requires_grad};".encode())
    return h.hexdigest()[:16]
