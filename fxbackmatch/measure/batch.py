"""What a plan reads from the live batch: the graph's inputs from a call's arguments
(:func:`flat_inputs`, :func:`fit_batch`), the per-step multipliers of ``token_mask`` and
``span="batch"`` (:func:`multiplier`), and the measured factors — :func:`refresh` every
``refresh`` steps, :func:`measure` on demand. Every function takes the plan."""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist

from ..analysis.span import batch_of, span_multiplier
from ..analysis.tokens import fill_token_stats, find_mask, token_multiplier
from ..analysis.expr import EPS
from ..analysis.gaps import local_ref, local_refs, parse_local_ref
from ..analysis.walk import MOMENT_PREFIX
from ..capture.shapes import shape_of
from ..errors import FxBackmatchError, PlanMismatchError
from ..runtime.build import MEASURED_PREFIX, atom_values, layer_records, measures, need
from ..runtime.reference import eval_mono
from ..runtime.transfer import kept, to_device
from .factors import measure_factors, measure_values

if TYPE_CHECKING:
    from ..plan import Plan

HOOKS_REFUSED = (
    "factors='measured' and moments='batch' need a graph that runs (torch.fx or "
    "torch.export); this plan was captured with hooks.\n  What to do: make the model "
    "traceable by torch.fx or torch.export (capture='fx' / 'export' say why it is not), "
    "or prepare without these options."
)


def refresh(plan: "Plan", inputs: Sequence[Any], kwargs: dict, probes: int | None = None,
            seed: int | None = None) -> dict[str, float]:
    """Measure every layer's ``m`` (and the moments ``E[a²]``, and the own factors of the ops
    no rule covers) on this batch and keep them."""
    a = need(plan)
    if not measures(plan):
        raise FxBackmatchError("refresh() needs prepare(..., factors='measured') or moments='batch' "
                               "(on a graph with pooling, means or attention)")
    if plan.capture == "hooks":
        raise FxBackmatchError(HOOKS_REFUSED)
    flat = fit_batch(plan, flat_inputs(plan, inputs, kwargs))
    devices = [p.device for p in plan._params.values() if p.device.type == "cuda"][:1]
    local = [parse_local_ref(r) for r in local_refs(a.atoms)]
    with torch.random.fork_rng(devices=devices):
        layers = [r.node for r in a.layers] if plan.factors == "measured" else []
        got = measure_factors(a.gm, plan.model, flat, a.output_nodes, layers,
                              a.moment_nodes, probes=probes or plan.probes,
                              seed=plan._steps if seed is None else seed, local=local)
    with torch.no_grad():
        for key, value in [(MOMENT_PREFIX + n, v) for n, v in got.moments.items()] + [
                (local_ref(op, inp), v) for (op, inp), v in got.local.items()]:
            t = plan._measured.get(key)
            if t is None:
                continue
            if value and value > 0:
                t.fill_(value)
                _note(a, f"'{key}' measured 0", drop=True)
            else:  # nothing to divide by: the last value stays, and the report says so
                _note(a, f"'{key}' measured 0 on the batch: its last value is kept (1 before any measurement)")
        _fill_layers(plan, a, got.m)
    return got.m


def _fill_layers(plan: "Plan", a, measured: dict[str, float]) -> None:
    """The layers' measured ``m``; where it is 0 (no gradient reaches the layer's output: a
    zero-initialized layer above, e.g. a ViT's head) the layer's derived ``m`` is used, and
    where that is degenerate too (it rests on a weight at zero) the last value is kept —
    each time with a note in the report."""
    late = [(r, measured.get(r.node)) for r in a.layers if MEASURED_PREFIX + r.node in plan._measured]
    vals = None
    for rec, value in late:
        t = plan._measured[MEASURED_PREFIX + rec.node]
        if value is not None and value > 0:
            t.fill_(value)
            _note(a, f"layer '{rec.name}': measured m is 0", drop=True)
            continue
        vals = vals if vals is not None else atom_values(plan)
        derived = eval_mono(rec.m_expr, vals)
        if math.isfinite(derived) and derived > 0 and all(vals[i] > EPS for i in rec.m_expr.atoms()):
            t.fill_(derived)
            _note(a, f"layer '{rec.name}': measured m is 0 on the batch (no gradient reaches its output, "
                     f"e.g. a zero-initialized layer above): its derived m is used until it is positive")
        else:
            _note(a, f"layer '{rec.name}': measured m is 0 on the batch and its derived m rests on a zero "
                     f"weight: its last value is kept (1 before any measurement)")


def _note(a, text: str, drop: bool = False) -> None:
    """Add ``text`` to the report's notes once; ``drop``: remove the notes it begins (the
    state they describe is over)."""
    if drop:
        a.notes[:] = [n for n in a.notes if not n.startswith(text)]
    elif text not in a.notes:
        a.notes.append(text)


def step_hook(plan: "Plan") -> None:
    """Called by the attached hooks before each rescale: refresh every ``refresh`` steps."""
    measuring = plan.__dict__.get("_measuring")  # set by build.finish; a waiting plan has none yet
    if measuring is None:
        measuring = measures(plan)
    if measuring and plan._last_call is not None and plan._steps % plan.refresh_every == 0:
        args, kwargs = plan._last_call
        try:
            plan.refresh(*args, **kwargs)
        except PlanMismatchError as e:  # e.g. an epoch's short last batch on an export graph
            warnings.warn(f"fxbackmatch: measured factors kept from the last refresh: {e}",
                          RuntimeWarning, stacklevel=4)
    plan._steps += 1


def measure(plan: "Plan", inputs: Sequence[Any], kwargs: dict, probes: int = 16, seed: int = 0,
            values: bool = False) -> list[dict[str, Any]]:
    """The rule's ``m`` beside the measured one per layer (per value with ``values=True``)."""
    a = need(plan)
    inputs = fit_batch(plan, flat_inputs(plan, inputs, kwargs))
    if plan.capture == "hooks":
        raise FxBackmatchError(
            f"plan.measure needs the traced graph; this plan of {type(plan.model).__name__} "
            f"was captured with hooks.\n  What to do: make the model traceable (or register "
            f"rules for the untraceable parts as leaf modules) and prepare with capture='fx'."
        )
    if values:
        picked = [(n.name, n.name, n.meta["fxbackmatch.m"], kind_of(n, a.gm)) for n in a.gm.graph.nodes
                  if "fxbackmatch.m" in n.meta]
    else:
        picked = [(r.name, r.node, r.m_expr, r.kind) for r in layer_records(plan)]
    measured = measure_values(a.gm, plan.model, inputs, a.output_nodes, [p[1] for p in picked],
                              probes=probes, seed=seed)
    vals = atom_values(plan)
    rows = []
    for name, node, expr, kind in picked:
        rule_m = eval_mono(expr, vals)
        got = measured.get(node)
        rows.append({"layer": name, "node": node, "kind": kind, "rule_m": rule_m, "measured_m": got,
                     "ratio": (rule_m / got) if got else None})
    return rows


def kind_of(node, gm) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


def flat_inputs(plan: "Plan", args: Sequence[Any], kwargs: dict) -> list[Any]:
    """The graph's placeholders from a call's arguments (export graphs take the
    flattened ``(args, kwargs)``; the example's non-tensor keywords fill in)."""
    if plan.capture != "export":
        return list(args)
    from torch.fx._pytree import tree_flatten_spec

    gm = plan._analysis.gm
    spec = gm.meta.get("fxbackmatch.in_spec")
    merged = {**getattr(plan, "example_kwargs", {}), **kwargs}
    flat = tree_flatten_spec((tuple(args), merged), spec) if spec is not None else list(args)
    n = sum(1 for x in gm.graph.nodes if x.op == "placeholder")
    return list(flat)[:n]


def fit_batch(plan: "Plan", flat: list[Any]) -> list[Any]:
    """An export graph is specialized to the example's shapes: a larger batch is measured
    on its first ``B`` samples (the example's batch); a smaller one cannot run it."""
    if plan.capture != "export":
        return flat
    out = []
    places = [x for x in plan._analysis.gm.graph.nodes if x.op == "placeholder"]
    for node, x in zip(places, flat):
        want = shape_of(node)
        if isinstance(x, torch.Tensor) and want is not None and tuple(x.shape) != tuple(want):
            if x.dim() != len(want) or not want or tuple(x.shape[1:]) != tuple(want[1:]) or x.shape[0] < want[0]:
                raise PlanMismatchError(
                    f"input '{node.name}' has shape {tuple(x.shape)}; the torch.export graph of "
                    f"{type(plan.model).__name__} was captured at {tuple(want)} and runs only "
                    f"there (or on the first {want[0]} samples of a larger batch).\n  What to "
                    f"do: prepare with example inputs of the smallest batch you train with."
                )
            x = x[: want[0]]
        out.append(x)
    return out


def multiplier(plan: "Plan") -> torch.Tensor | None:
    """The per-target multipliers of this step: the token share and the batch span, on the
    runtime's device (the token share: the mask's) and made there without a host sync — the
    span's alone, which depends on the batch size only, kept per size and device. Callers
    must not write into it."""
    mask = current_mask(plan) if plan._token_bt is not None else None
    out = None
    if isinstance(mask, torch.Tensor):
        fill_token_stats(plan._measured, mask)  # before the scales read them
        out = token_multiplier(mask, _table(plan, "flags", plan._token_flags, mask.device))
    if plan.span == "batch":
        batch = batch_of(*plan._last_call) if plan._last_call is not None else None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        # data-parallel ranks average their gradients: the normal matrix spans all their rows
        rows_of = (batch or plan._example_batch) * world
        if out is None:
            dev = plan._runtime.device()
            return kept(plan._device_tables, ("span", rows_of, dev),
                        lambda: to_device(span_multiplier(rows_of, plan._span_fan, plan._span_rows), dev))
        # token-wise layers share their weight over the real tokens only: out = 1/f on those
        rows = _table(plan, "rows", plan._span_rows, out.device) / out
        out = out * span_multiplier(rows_of, _table(plan, "fan", plan._span_fan, out.device), rows)
    return out


def _table(plan: "Plan", name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A constant host table of the plan on ``device``, copied there once."""
    return kept(plan._device_tables, (name, device), lambda: to_device(t, device))


def current_mask(plan: "Plan") -> torch.Tensor | None:
    mask = plan._example_mask
    if plan._last_call is not None:
        mask = find_mask(plan.token_mask, *plan._last_call, plan._mask_pos)
    return mask if isinstance(mask, torch.Tensor) else None
