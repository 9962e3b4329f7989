"""Graph capture: ``torch.fx`` symbolic tracing first, ``torch.export`` (non-strict) where
tracing fails (data-dependent control flow, Hugging Face models), and — only when asked
for with ``capture="hooks"`` — a hook-recording fallback for chains.

``torch.export`` graphs are ATen-level; :func:`~fxbackmatch.capture.aten.lower_aten` rewrites them
into the torch-level calls the rules know, and every lifted parameter and buffer is a
``get_attr`` of the user's own qualified name (``ExportedProgram.module()``), so the walk and
the plan read the user's tensors. Outputs keep their structure (a Hugging Face
``ModelOutput`` becomes a dict), so ``outputs="logits"`` names the loss output.

The fallback runs the model once on the example inputs — on detached parameters and
*copies* of the buffers, so nothing of the model changes — with forward hooks on every
module that has a rule, and records the modules in execution order. Inputs are linked to
the module that produced them (tensor identity); where a module's input was made by
functional code between modules (``x.view``, ``F.relu``, an addition), the chain
assumption links it to the previously executed module. The report says which capture was
used; ``capture="fx"`` refuses the fallback.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..errors import ShapePropagationError, TraceError
from .shapes import SHAPE_KEY, propagate_shapes
from .tracing import trace

__all__ = ["capture", "capture_with_export", "capture_with_hooks", "CAPTURES", "capturing"]

_depth = 0  # > 0 while a capture runs the model (traced, fake or recorded calls)


def capturing() -> bool:
    """Whether a capture is running the model now: forward hooks that keep the last batch
    (measured factors, token masks) must not keep its traced or fake inputs."""
    return _depth > 0

CAPTURES = ("auto", "fx", "export", "hooks")

log = logging.getLogger(__name__)


def _marks_capturing(fn):
    """:func:`capturing` is true while ``fn`` runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _depth
        _depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth -= 1

    return wrapper


@_marks_capturing
def capture(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    is_rule_leaf: Callable[[nn.Module], bool],
    leaf_modules: Sequence = (),
    mode: str = "auto",
    example_kwargs: dict | None = None,
    has_rule: Callable[[str, object], bool] | None = None,
    lookup: Callable[[fx.Node, fx.GraphModule], object] | None = None,
) -> tuple[fx.GraphModule, str]:
    """Return the graph (shapes in ``node.meta``) and the capture used: ``"fx"``,
    ``"export"`` or ``"hooks"``. ``"auto"`` tries symbolic tracing, then ``torch.export`` —
    also when the traced graph keeps an opaque op on a gradient path that no rule knows
    (``nn.MultiheadAttention``, a ``torch.fx.wrap``-ped function) and export sees into it."""
    if mode not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {mode!r}")
    example_kwargs = dict(example_kwargs or {})
    if mode in ("auto", "fx") and not example_kwargs:
        try:
            gm = trace(model, is_rule_leaf, leaf_modules)
        except TraceError as e:
            if mode == "fx":
                raise
            log.info("fxbackmatch: torch.fx cannot trace %s (%s); capturing with torch.export",
                     type(model).__name__, str(e).splitlines()[0])
        else:
            try:
                propagate_shapes(gm, example_inputs)
            except ShapePropagationError as e:
                # symbolic tracing took a branch the inputs do not take (``labels=None``
                # defaults): export runs the real control flow; else the shape error stands
                if mode == "fx":
                    raise
                try:
                    return capture_with_export(model, example_inputs, example_kwargs, has_rule), "export"
                except TraceError:
                    raise e from None
            unknown = _unknown_ops(gm, model, lookup) if mode == "auto" and lookup is not None else []
            if not unknown:
                return gm, "fx"
            try:
                egm = capture_with_export(model, example_inputs, example_kwargs, has_rule)
            except TraceError:
                return gm, "fx"
            if len(_unknown_ops(egm, model, lookup)) < len(unknown):
                log.info("fxbackmatch: %s traced with opaque ops (%s); captured with torch.export",
                         type(model).__name__, ", ".join(unknown[:3]))
                return egm, "export"
            return gm, "fx"
    if mode == "fx":
        raise TraceError(
            "capture='fx' cannot take keyword example inputs (symbolic tracing binds positional "
            "placeholders only).\n  What to do: pass capture='auto' or 'export'."
        )
    if mode == "hooks":
        return capture_with_hooks(model, example_inputs, is_rule_leaf), "hooks"
    return capture_with_export(model, example_inputs, example_kwargs, has_rule), "export"


def _unknown_ops(gm: fx.GraphModule, model: nn.Module, lookup) -> list[str]:
    """Ops on a gradient path (depending on a trainable parameter) that no rule knows."""
    from .topology import live_nodes

    live = live_nodes(gm, model)
    return [n.name for n in gm.graph.nodes if n.op.startswith("call") and n in live and lookup(n, gm) is None]


def capture_with_export(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    example_kwargs: dict | None = None,
    has_rule: Callable[[str, object], bool] | None = None,
) -> fx.GraphModule:
    """``torch.export.export(model, args, kwargs, strict=False)``, unlifted (parameters and
    buffers as ``get_attr`` of the user's names), lowered to torch-level calls, with shapes.
    The model is left as it was: export runs on fake tensors, and the buffers are checked."""
    from .aten import lower_aten

    import logging as _logging

    before = {k: v.detach().clone() for k, v in model.named_buffers()}
    training = {m: m.training for m in model.modules()}
    quiet = [_logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch.export", "torch._export")]
    levels = [q.level for q in quiet]
    for q in quiet:  # they log each failing op with a traceback; the error below says it once
        q.setLevel(_logging.CRITICAL)
    try:
        ep = torch.export.export(model, tuple(example_inputs), dict(example_kwargs or {}), strict=False)
        gm = ep.module()
    except Exception as e:
        raise TraceError(
            f"{type(model).__name__} could be captured neither by torch.fx symbolic tracing nor by "
            f"torch.export: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
            f"  What to do: check example_inputs / example_kwargs (e.g. use_cache=False for a "
            f"Hugging Face decoder); make the forward exportable (data-dependent `if`s on tensor "
            f"values are the usual cause: torch.cond, or keep that submodule opaque with "
            f"leaf_modules= and a registered rule); or, for a plain chain of modules, "
            f"capture='hooks' records module calls in order."
        ) from e
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in before and not torch.equal(v, before[k]):
                    v.copy_(before[k])
        for m, t in training.items():
            m.training = t
    _restructure_output(gm)
    for n in list(gm.graph.nodes):  # export's input guards: not part of the computation
        if n.op == "call_module" and n.target == "_guards_fn":
            gm.graph.erase_node(n)
    left = lower_aten(gm, has_rule or (lambda kind, target: False))
    if left:
        log.debug("fxbackmatch: ATen ops kept as they are: %s", ", ".join(left))
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        n.meta[SHAPE_KEY] = tuple(val.shape) if isinstance(val, torch.Tensor) else None
    gm.meta["fxbackmatch.capture"] = "export"
    return gm


def _restructure_output(gm: fx.GraphModule) -> None:
    """Give the output node the model's own output structure (dicts for ``ModelOutput``s and
    dataclasses, tuples kept), so ``outputs=`` can name an element."""
    from torch.utils import _pytree as pytree

    spec = getattr(gm, "_out_spec", None)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0]
    if spec is None or not isinstance(flat, (tuple, list)):
        return
    try:
        tree = pytree.tree_unflatten(list(flat), spec)
    except Exception:  # noqa: BLE001 — keep the flat outputs
        return

    def plain(x):
        if isinstance(x, fx.Node) or x is None:
            return x
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(plain(v) for v in x) if type(x) in (tuple, list) else tuple(plain(v) for v in x)
        if hasattr(x, "__dataclass_fields__"):
            return {k: plain(getattr(x, k)) for k in x.__dataclass_fields__ if getattr(x, k) is not None}
        return x

    out.args = (plain(tree),)
    gm.meta["fxbackmatch.in_spec"] = getattr(gm, "_in_spec", None)
    gm.graph._codegen = fx.graph.CodeGen()  # flat inputs, the structured output as it is


def capture_with_hooks(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], is_rule_leaf: Callable[[nn.Module], bool]
) -> fx.GraphModule:
    leaves = _rule_leaves(model, is_rule_leaf)
    records: list[tuple[str, list[torch.Tensor], torch.Tensor]] = []
    handles = []
    for name, mod in leaves:
        def hook(m, args, out, name=name):
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            if isinstance(out, torch.Tensor):
                records.append((name, ins, out))
        handles.append(mod.register_forward_hook(hook))
    state = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    state.update({n: b.clone() for n, b in model.named_buffers(remove_duplicate=False)})
    try:
        with torch.no_grad():
            result = torch.func.functional_call(model, state, tuple(example_inputs), tie_weights=True)
    except Exception as e:
        raise TraceError(
            f"{type(model).__name__} could neither be traced by torch.fx nor run with recording "
            f"hooks: {type(e).__name__}: {e}\n  What to do: check example_inputs, or make the "
            f"forward traceable / pass leaf_modules= with a registered rule."
        ) from e
    finally:
        for h in handles:
            h.remove()
    if not records:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}, and no module with a rule ran in "
            f"its forward.\n  What to do: make the forward traceable, or register rules for its "
            f"layers (fxbackmatch.register_rule)."
        )
    graph = fx.Graph()
    producers: dict[int, fx.Node] = {}
    placeholders = []
    for i, x in enumerate(example_inputs):
        p = graph.placeholder(f"input_{i}")
        _set_meta(p, x)
        placeholders.append(p)
        if isinstance(x, torch.Tensor):
            producers[id(x)] = p
    last = placeholders[0] if placeholders else None
    for name, ins, out in records:
        args = []
        for t in ins[:1]:
            src = producers.get(id(t), last)
            args.append(src)
        node = graph.call_module(name, tuple(args))
        _set_meta(node, out)
        producers[id(out)] = node
        last = node
    outs = result if isinstance(result, (tuple, list)) else (result,)
    out_nodes = [producers.get(id(o), last) for o in outs if isinstance(o, torch.Tensor)]
    graph.output(out_nodes[0] if len(out_nodes) == 1 else tuple(out_nodes))
    gm = fx.GraphModule(model, graph, type(model).__name__)
    return gm


def _set_meta(node: fx.Node, t) -> None:
    if isinstance(t, torch.Tensor):
        node.meta["val"] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        node.meta[SHAPE_KEY] = tuple(t.shape)
    else:
        node.meta[SHAPE_KEY] = None


def _rule_leaves(model: nn.Module, is_rule_leaf) -> list[tuple[str, nn.Module]]:
    out = []
    skip: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        if is_rule_leaf(mod):
            out.append((name, mod))
            skip.append(name)
    return out
