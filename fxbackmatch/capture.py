"""Graph capture: ``torch.fx`` symbolic tracing, and a hook-recording fallback for models
that symbolic tracing cannot handle (data-dependent control flow, as in MaxViT).

The fallback runs the model once on the example inputs — on detached parameters and
*copies* of the buffers, so nothing of the model changes — with forward hooks on every
module that has a rule, and records the modules in execution order. Inputs are linked to
the module that produced them (tensor identity); where a module's input was made by
functional code between modules (``x.view``, ``F.relu``, an addition), the chain
assumption links it to the previously executed module. The report says which capture was
used; ``capture="fx"`` refuses the fallback.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError
from .shapes import SHAPE_KEY, propagate_shapes
from .tracing import trace

__all__ = ["capture", "capture_with_hooks"]

log = logging.getLogger(__name__)


def capture(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    is_rule_leaf: Callable[[nn.Module], bool],
    leaf_modules: Sequence = (),
    mode: str = "auto",
) -> tuple[fx.GraphModule, str]:
    """Return the graph (shapes in ``node.meta``) and the capture used: ``"fx"`` or ``"hooks"``."""
    if mode not in ("auto", "fx", "hooks"):
        raise ValueError(f"capture must be 'auto', 'fx' or 'hooks', got {mode!r}")
    if mode != "hooks":
        try:
            gm = trace(model, is_rule_leaf, leaf_modules)
        except TraceError:
            if mode == "fx":
                raise
            log.warning("fxbackmatch: torch.fx cannot trace %s; capturing with hooks", type(model).__name__)
        else:
            propagate_shapes(gm, example_inputs)
            return gm, "fx"
    return capture_with_hooks(model, example_inputs, is_rule_leaf), "hooks"


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
